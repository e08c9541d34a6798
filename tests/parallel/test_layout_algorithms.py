"""Layout invariance of the algorithms with their own rollout shape: MixGRPO-Flash (a per-iteration
grid with DPM-Solver++ steps) and G²RPO (the tree: every rank builds every prompt's anchor, and
under ZeRO-3 ranks whose branches finished early still join every model call). One process vs
dp=2 × sp=2 with ZeRO-3 on 4 ranks, one iteration, the tolerances of test_layout.py."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

COMMON = ("train.iterations=1", "train.keep_checkpoints=0", "train.precision=fp32", "train.adam_eps=1e-3")
ALGORITHMS = {
    "mix_grpo_flash": ("algorithm.name=mix_grpo_flash", "algorithm.window_size=2", "sampling.num_steps=10",
                       "algorithm.flash_compression=0.5"),
    "g2rpo": ("algorithm.name=g2rpo", "algorithm.branch_steps=[0,2]"),
}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_one_process_and_dp2_sp2_zero3_agree(tmp_path, tiny_wan_dir, megaflow_launch, algorithm):
    L = megaflow_launch
    single, dp2sp2 = tmp_path / "single", tmp_path / "dp2sp2"
    options = (*COMMON, *ALGORITHMS[algorithm])
    L.run(L.train_command(1, L.tiny_args(tiny_wan_dir, single, *options)))
    L.run(L.train_command(4, L.tiny_args(tiny_wan_dir, dp2sp2, *options, "parallel.zero_stage=3",
                                         "parallel.sp_size=2")), timeout=600)
    got, base = L.metrics(dp2sp2)[0], L.metrics(single)[0]
    assert got["policy/ratio_max_dev"] == 0.0 and base["policy/ratio_max_dev"] == 0.0
    assert _rel(got["reward/mean"], base["reward/mean"]) <= 1e-6
    assert _rel(got["reward/std"], base["reward/std"]) <= 1e-6
    assert _rel(got["loss/total"], base["loss/total"]) <= 1e-5
    assert _rel(got["optim/grad_norm"], base["optim/grad_norm"]) <= 1e-5 and base["optim/grad_norm"] > 0
    assert got["nfe/rollout_per_sample"] == base["nfe/rollout_per_sample"]
    path = "checkpoints/iteration_000001/pytorch_lora_weights.safetensors"
    ours, theirs = load_file(str(dp2sp2 / path)), load_file(str(single / path))
    for key, w in theirs.items():
        assert float((ours[key] - w).abs().max()) <= 1e-5 * float(w.abs().max()), key
