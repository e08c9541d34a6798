"""`rollout.gather_weights`: under ZeRO-3 the whole transformer is gathered once per rollout
instead of layer by layer at every denoising step (here with hpZ secondary partitions on)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megaflow.parallel.topology import free_port


@pytest.mark.slow
def test_gather_weights_gathers_once_per_rollout(tmp_path, tiny_wan_dir, megaflow_launch):
    # A user DeepSpeed file (its "auto" values filled from the recipe) that keeps no gathered
    # parameter alive between uses, as for a model far larger than one GPU.
    config = json.loads((Path(__file__).parents[2] / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"].update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0,
                                       stage3_prefetch_bucket_size=0)
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps(config))
    worker = Path(__file__).with_name("gather_weights_worker.py")
    proc = megaflow_launch.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                f"--master_port={free_port()}", str(worker), str(tiny_wan_dir), str(tmp_path),
                                str(ds_config)])
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    runs = json.loads(line[len("RESULT "):])
    for per_layer, once in (runs[0:2], runs[2:4]):
        # Layer by layer, the 6 denoising steps fetch both transformer blocks (ZeRO-3 leaf modules)
        # again and again; with gather_weights the parameters are gathered once before the
        # rollout and no module fetches anything during it.
        assert per_layer["fetches"] >= 6 * 2
        assert once["fetches"] == 0
        assert once["hpz"] == per_layer["hpz"] == 2  # parallel.hpz_partition_size filled the "auto"
        assert once["ratio_max_dev"] == per_layer["ratio_max_dev"] == 0.0
        assert once["grad_norm"] > 0
