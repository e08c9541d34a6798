"""Rewards: the protocol, the registry, `RewardSet` and the built-in rewards (registered on import).

Rewards with heavy imports register lazily: their module is imported when one is first built.
"""
from megaflow.rewards import builtin
from megaflow.rewards.base import (
    Reward,
    RewardScores,
    RewardSet,
    available_rewards,
    build_reward,
    register_lazy,
    register_reward,
    validate_videos,
)
from megaflow.rewards.builtin import luminance

__all__ = [
    "Reward",
    "RewardScores",
    "RewardSet",
    "available_rewards",
    "build_reward",
    "builtin",
    "register_lazy",
    "luminance",
    "register_reward",
    "validate_videos",
]

#: Reward name -> the module that registers it (imported when the reward is first built).
LAZY_REWARDS = {
    "imagereward": "megaflow.rewards.imagereward",
    "aesthetic": "megaflow.rewards.clip",
    "clipscore": "megaflow.rewards.clip",
    "hpsv2": "megaflow.rewards.clip",
    "pickscore": "megaflow.rewards.clip",
    "shapes": "megaflow.demo.verifier",
    "vlm_judge": "megaflow.rewards.judge",
    "remote": "megaflow.rewards.server",
    "videoalign": "megaflow.rewards.videoalign",
    "videoalign_vq": "megaflow.rewards.videoalign",
    "videoalign_mq": "megaflow.rewards.videoalign",
    "videoalign_ta": "megaflow.rewards.videoalign",
}
for _name, _module in LAZY_REWARDS.items():
    register_lazy(_name, _module)
