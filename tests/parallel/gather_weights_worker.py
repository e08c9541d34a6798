"""Worker for test_gather_weights: counts ZeRO-3 parameter fetches during the rollouts of
iterations with per-layer gathers and with `rollout.gather_weights` (2 ranks)."""
from __future__ import annotations

import json
import sys

import torch.distributed as dist

import megaflow.trainer.loop as loop
from megaflow.config import load_config


def main(model_dir: str, output_dir: str, ds_config: str) -> None:
    cfg = load_config("tiny", ["train.iterations=4", "train.sample_every=0", "parallel.zero_stage=3",
                               f"parallel.ds_config={ds_config}", "parallel.hpz_partition_size=2", f"model.path={model_dir}", f"output_dir={output_dir}"])
    trainer = loop.Trainer(cfg, show_progress=False)
    hpz = trainer.engine.config["zero_optimization"]["zero_hpz_partition_size"]
    count = {"n": 0, "rollout": []}
    # ZeRO-3 fetches partitioned parameters through `param.all_gather_coalesced(params)` (on the
    # first of the parameters it fetches together); count those fetches.
    for param in trainer.adapter.transformer.parameters():
        def counting(*args, _orig=param.all_gather_coalesced, **kwargs):
            count["n"] += 1
            return _orig(*args, **kwargs)
        param.all_gather_coalesced = counting
    rollout = loop.run_program

    def counted_rollout(*args, **kwargs):
        count["n"] = 0
        out = rollout(*args, **kwargs)
        count["rollout"].append(count["n"])
        return out

    loop.run_program = counted_rollout
    results = []
    for iteration, gather in enumerate((False, True, False, True)):
        cfg.rollout.gather_weights = gather
        metrics = trainer.run_iteration(iteration)
        results.append({"hpz": hpz, "gather_weights": gather, "fetches": count["rollout"][-1],
                        "ratio_max_dev": metrics["policy/ratio_max_dev"], "grad_norm": metrics["optim/grad_norm"]})
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
