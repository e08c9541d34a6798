"""Full fine-tuning with a KL term under ZeRO-3: the frozen reference policy is a second,
partitioned DeepSpeed engine without optimizer; with sequence parallelism and parameters and
optimizer state offloaded to CPU (`parallel.offload`) it matches one process."""
from __future__ import annotations

import pytest

# Four optimizer steps per iteration: after the first, the policy has left the reference, so
# the later steps carry a non-zero KL computed by the reference engine.
COMMON = ("train.iterations=1", "model.lora=false", "algorithm.kl_beta=0.1", "train.micro_batch_size=2",
          "train.grad_accum=1", "train.lr=1e-2")


@pytest.mark.slow
def test_full_finetune_kl_zero3_sp2_offload_matches_one_process(tmp_path, tiny_wan_dir, megaflow_launch):
    L = megaflow_launch
    L.run(L.train_command(1, L.tiny_args(tiny_wan_dir, tmp_path / "one", *COMMON)))
    L.run(L.train_command(2, L.tiny_args(tiny_wan_dir, tmp_path / "sp2", *COMMON, "parallel.zero_stage=3",
                                         "parallel.sp_size=2", "parallel.offload=true")))
    (ref,), (got,) = L.metrics(tmp_path / "one"), L.metrics(tmp_path / "sp2")
    assert got["policy/ratio_max_dev"] == 0.0
    assert got["nfe/train_per_sample"] == ref["nfe/train_per_sample"] == 10  # 5 trained steps + reference
    assert got["optim/steps"] == ref["optim/steps"] == 4
    assert ref["loss/kl"] > 0
    # The reference engine's transformer is built in the run's dtype like the policy's, so both
    # rollouts are bit-identical; what is left is the order of the cross-rank gradient sums.
    assert got["reward/mean"] == pytest.approx(ref["reward/mean"], rel=1e-6)
    assert got["reward/std"] == pytest.approx(ref["reward/std"], rel=1e-6)
    for key in ("loss/kl", "optim/grad_norm", "loss/total", "loss/policy"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), key
