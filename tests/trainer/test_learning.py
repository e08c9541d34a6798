"""The trainer learns: GRPO raises a reward it can move (brightness of the tiny Wan model's videos)."""
import pytest

from megaflow.config import load_config
from megaflow.trainer.loop import Trainer


@pytest.mark.slow
def test_full_finetune_raises_brightness_reward(tmp_path, tiny_wan_dir):
    # Measured on 2 CPU cores, seeds 0-4, 10 iterations: mean of the last 3 minus the first 3 was
    # +0.041/+0.028/+0.019/+0.021/+0.019 with lr 1e-2, and within ±0.002 with lr 0 (the noise floor).
    cfg = load_config("tiny", [
        f"output_dir={tmp_path}", f"model.path={tiny_wan_dir}", "seed=0", "train.iterations=10", "train.lr=1e-2",
        "algorithm.clip_range=0.2", "model.lora=false", "reward.options={brightness: {target: 1.0}}",
        "train.sample_every=0",
    ])
    history = Trainer(cfg, show_progress=False).train()
    rewards = [m["reward/mean"] for m in history]
    rise = sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3
    assert rise > 0.01, rewards
    assert all(m["policy/ratio_max_dev"] == 0.0 for m in history)
