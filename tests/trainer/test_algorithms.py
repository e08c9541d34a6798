"""Every algorithm of ALGORITHMS.md §3 and §5 runs through the one loop on the tiny model: its first
update is exactly on-policy, its NFE accounting is what its plan says, and G²RPO's tree has the
structure §6 describes."""
import pytest
import torch

import megaflow.trainer.loop as loop
from megaflow.config import load_config
from megaflow.trainer.loop import Trainer
from megaflow.trainer.rollout import step_noise, tree_nfe_per_sample


def make_trainer(tmp_path, model_dir, *overrides):
    cfg = load_config("tiny", [f"output_dir={tmp_path}", f"model.path={model_dir}", "train.iterations=1",
                               "train.sample_every=0", *overrides])
    return Trainer(cfg, show_progress=False)


ROWS = {
    "flow_grpo_fast": (["algorithm.name=flow_grpo_fast", "algorithm.sde_window_size=2"], 6.0),
    "cps": (["algorithm.sde_kind=cps", "algorithm.clip_range=1e-5"], 6.0),
    "mix_grpo": (["algorithm.name=mix_grpo", "algorithm.window_size=2"], 6.0),
    # 10 steps, window 0..1, r 0.5: int((10 − 1)·0.5) = 4 grid points after the window → 3 DPM steps.
    "mix_grpo_flash": (["algorithm.name=mix_grpo_flash", "algorithm.window_size=2", "sampling.num_steps=10",
                        "algorithm.flash_compression=0.5"], 5.0),
    "g2rpo": (["algorithm.name=g2rpo", "algorithm.branch_steps=[0,2]"], tree_nfe_per_sample(6, [0, 2], [1, 2])),
    "grpo_guard": (["algorithm.loss=grpo_guard", "algorithm.clip_range=4e-6"], 6.0),
    "linear_noise": (["algorithm.noise_schedule=linear"], 6.0),
    "best_of": (["algorithm.name=dance_grpo", "rollout.best_of=2"], 6.0),
    "best_of_renormalized": (["algorithm.name=dance_grpo", "rollout.best_of=2", "rollout.best_of_renormalize=true"], 6.0),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_every_algorithm_is_on_policy_at_its_first_update(tmp_path, tiny_wan_dir, row):
    overrides, nfe = ROWS[row]
    trainer = make_trainer(tmp_path, tiny_wan_dir, *overrides)
    m = trainer.run_iteration(0)
    assert m["policy/ratio_max_dev"] == 0.0
    assert m["optim/grad_norm"] > 0 and torch.isfinite(torch.tensor(m["loss/total"]))
    assert m["nfe/rollout_per_sample"] == pytest.approx(nfe)
    if row.startswith("best_of"):
        assert m["advantage/trained_fraction"] == 0.5  # 2 of each group of 4


def test_tree_branches_share_the_anchor_and_differ_only_by_the_branch_noise(tmp_path, tiny_wan_dir, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_wan_dir, "algorithm.name=g2rpo", "algorithm.branch_steps=[0,3]",
                           "algorithm.loss=grpo_guard")
    seen = {}
    run_program = loop.run_program

    def recording(*args, **kwargs):
        seen["rollout"] = run_program(*args, **kwargs)
        return seen["rollout"]

    advantages = trainer.advantages

    def recording_adv(components, groups):
        seen["components"], seen["groups"] = components, groups
        return advantages(components, groups)

    monkeypatch.setattr(loop, "run_program", recording)
    trainer.advantages = recording_adv
    m = trainer.run_iteration(0)
    r = seen["rollout"]
    keys = trainer.algorithm.sample_keys(2, 4, trainer.cfg.algorithm, 6)
    assert r.x.shape[:2] == (16, 1) and r.trained_steps.flatten().tolist() == ([0] * 4 + [3] * 4) * 2
    for g0 in range(0, 16, 4):
        group = slice(g0, g0 + 4)
        k = int(r.trained_steps[g0, 0])
        assert bool((r.x[group] == r.x[g0]).all())  # one shared ODE anchor x_k per (prompt, k)
        assert torch.equal(r.mean_old[group], r.mean_old[g0:g0 + 1].expand_as(r.mean_old[group]))
        eps = step_noise(keys[group], tuple(r.x.shape[2:]), seed=0, iteration=0, step_index=k)
        std = float(torch.as_tensor(trainer.settings.sigmas[k + 1] - trainer.settings.sigmas[k]).abs().sqrt()
                    * 0.7 * (trainer.settings.sigmas[k] / (1 - (trainer.settings.sigmas[1] if k == 0 else
                                                             trainer.settings.sigmas[k]))).sqrt())
        torch.testing.assert_close(r.x_next[group, 0] - r.mean_old[group, 0], std * eps, rtol=1e-5, atol=1e-5)
    assert not torch.equal(r.x[0], r.x[4])  # k = 0 and k = 3 anchors differ
    # one group per (prompt, k); each branch scored once per granularity
    assert seen["groups"].tolist() == [g for g in range(4) for _ in range(4)]
    comps = seen["components"]["brightness"]
    assert comps.shape == (16, 2) and not torch.equal(comps[:, 0], comps[:, 1])
    assert m["policy/ratio_max_dev"] == 0.0


def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path, tiny_wan_dir):
    """MixGRPO's window position, the optimizer-step count and the EMA come back from the checkpoint:
    2 iterations + resume + 2 equals 4 straight (window starts 0, 1, 2, 0 with τ = 1)."""
    from safetensors.torch import load_file

    opts = ["algorithm.name=mix_grpo", "algorithm.window_size=2", "algorithm.window_shift_interval=1",
            "train.ema_decay=0.5", "train.ema_every=2", "train.grad_accum=1", "train.micro_batch_size=2",
            "rollout.chunk_size=4", "train.iterations=4"]

    def run(out, iterations, resume=None):
        cfg = load_config("tiny", [f"output_dir={out}", f"model.path={tiny_wan_dir}", "train.sample_every=0", *opts,
                                   f"train.iterations={iterations}"])
        trainer = Trainer(cfg, show_progress=False, resume=resume)
        return trainer, trainer.train()

    _, straight = run(tmp_path / "straight", 4)
    run(tmp_path / "split", 2)
    resumed, rest = run(tmp_path / "split", 4, resume="auto")
    assert resumed.start_iteration == 2 and resumed.optimizer_steps == 4 * 4
    assert [m["plan/first_trained_step"] for m in straight] == [0.0, 1.0, 2.0, 0.0]
    assert [m["plan/first_trained_step"] for m in rest] == [2.0, 0.0]
    for a, b in zip(straight[2:], rest):
        assert a["reward/mean"] == b["reward/mean"] and a["loss/total"] == b["loss/total"]
    final = "checkpoints/iteration_000004"
    for name in ("trainable.safetensors", "ema.safetensors"):
        ours, theirs = load_file(str(tmp_path / "split" / final / name)), load_file(str(tmp_path / "straight" / final / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_the_loop_names_no_algorithm():
    """Algorithms are compositions the loop runs through the registry, never branches in it."""
    import re
    from pathlib import Path

    from megaflow.algorithms.registry import ALGORITHMS

    names = "|".join(sorted({*ALGORITHMS, "mix", "flash", "g2rpo", "guard", "dance"}))
    source = (Path(loop.__file__)).read_text().splitlines()
    found = [f"{n}: {line.strip()}" for n, line in enumerate(source, start=1)
             if re.search(rf"(?<![a-z0-9_])({names})(?![a-z0-9])", line, re.IGNORECASE)]
    assert found == []
