"""Noise is a function of (seed, iteration, slot, sample, step) only; failing rewards stop the iteration."""
import pytest
import torch

from megaflow.config import load_config
from megaflow.errors import RewardError
from megaflow.rewards import register_reward
from megaflow.rewards.base import _REGISTRY
from megaflow.trainer.loop import Trainer
from megaflow.trainer.rollout import initial_noise, step_noise


def test_initial_noise_shared_within_a_group_only_when_asked():
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]
    shared = initial_noise(keys, (2, 3), seed=5, iteration=2, share_noise=True)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[2], shared[3])
    assert not torch.equal(shared[0], shared[2])
    own = initial_noise(keys, (2, 3), seed=5, iteration=2, share_noise=False)
    assert len({tuple(n.flatten().tolist()) for n in own}) == 4
    assert torch.equal(own[0], shared[0])  # sample 0 of a group draws the group's noise
    assert torch.equal(initial_noise(keys[2:], (2, 3), seed=5, iteration=2, share_noise=False), own[2:])
    assert not torch.equal(initial_noise(keys, (2, 3), seed=5, iteration=3, share_noise=False), own)


def test_step_noise_differs_per_sample_and_step_and_ignores_batch_layout():
    keys = [(0, 0), (0, 1), (1, 0)]
    a = step_noise(keys, (4,), seed=0, iteration=0, step_index=1)
    b = step_noise(keys, (4,), seed=0, iteration=0, step_index=2)
    assert not torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert torch.equal(step_noise(keys[1:2], (4,), seed=0, iteration=0, step_index=1)[0], a[1])


@pytest.fixture
def broken_reward():
    @register_reward("test_nan_after_first")
    class NanReward:
        def __call__(self, videos, prompts, metadata):
            return torch.full((videos.shape[0],), float("nan"))

    yield "test_nan_after_first"
    _REGISTRY.pop("test_nan_after_first")


def test_nan_reward_fails_the_iteration_with_a_clear_error(tmp_path, tiny_wan_dir, broken_reward):
    cfg = load_config("tiny", [f"output_dir={tmp_path}", f"model.path={tiny_wan_dir}",
                               f"reward.components={{{broken_reward}: 1.0}}", "reward.options={}"])
    trainer = Trainer(cfg, show_progress=False)
    with pytest.raises(RewardError, match=f"iteration 0: reward '{broken_reward}' returned non-finite"):
        trainer.run_iteration(0)
