"""Rewards: the protocol, the registry, `RewardSet` and the built-in rewards (registered on import)."""
from megaflow.rewards import builtin, shapes
from megaflow.rewards.base import (
    Reward,
    RewardSet,
    available_rewards,
    build_reward,
    register_reward,
    validate_videos,
)
from megaflow.rewards.builtin import luminance

__all__ = [
    "Reward",
    "RewardSet",
    "available_rewards",
    "build_reward",
    "builtin",
    "shapes",
    "luminance",
    "register_reward",
    "validate_videos",
]
