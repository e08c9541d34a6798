"""ZeRO-3 builds the transformer in the dtypes a one-process `from_pretrained` gives: float32 for
an fp32 run (DeepSpeed's CPU accelerator once turned it into bf16), and under bf16 diffusers'
keep-in-fp32 modules and the rotary tables in fp32. A bf16 ZeRO-3 rollout then equals a plain
bf16 rollout to the bit."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megaflow.parallel.topology import free_port


@pytest.mark.slow
def test_zero3_parameters_have_the_plain_dtypes_and_bf16_rollouts_match(tmp_path, tiny_wan_dir, megaflow_launch):
    L = megaflow_launch
    L.run(L.train_command(1, L.tiny_args(tiny_wan_dir, tmp_path / "plain", "train.iterations=1",
                                         "train.precision=bf16")))
    worker = Path(__file__).with_name("zero3_dtype_worker.py")
    proc = L.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                  str(worker), str(tiny_wan_dir), str(tmp_path)])
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    fp32, bf16 = res["fp32"], res["bf16"]
    assert fp32["params"] > 0 and fp32["fp32_params"] == fp32["params"]  # every ZeRO-3 partition is float32
    for report in (fp32, bf16):
        assert report["dtype_mismatch"] == [] and report["value_mismatch"] == [] and report["buffer_mismatch"] == []
    # Under bf16 the keep-in-fp32 modules (time embedder, scale-shift tables, affine norms) stay fp32.
    assert 0 < bf16["fp32_params"] == bf16["plain_fp32_params"] < bf16["params"]
    # Measured: the bf16 ZeRO-3 rollout equals the plain one exactly (before the dtype fix and with
    # DeepSpeed's memory-efficient linear, reward/mean differed by 7e-5 relative).
    (plain,) = L.metrics(tmp_path / "plain")
    for key in ("reward/mean", "reward/std"):
        assert res["bf16_metrics"][key] == plain[key], key
