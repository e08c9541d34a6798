"""Advantage estimators (ALGORITHMS.md §4): small pure functions over a flat batch of samples.

Samples are identified by a group id (the prompt they were generated for); statistics are
always taken over whole groups, wherever their members were generated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def group_zscore(rewards: torch.Tensor, groups: torch.Tensor, *, eps: float = 1e-6,
                 global_std: bool = False) -> torch.Tensor:
    """`(r − mean_group) / (std + eps)`: `rewards [N]`, `groups [N]` (long) → `[N]` float32.

    `std` is the group's (unbiased=False) or, with `global_std`, that of all N rewards.
    """
    r = rewards.float()
    _, inverse = torch.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(n_groups).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(n_groups).index_add_(0, inverse, r) / counts
    centred = r - mean[inverse]
    if global_std:
        std = r.std(unbiased=False).expand_as(r)
    else:
        var = torch.zeros(n_groups).index_add_(0, inverse, centred**2) / counts
        std = var.sqrt()[inverse]
    return centred / (std + eps)


def zero_std_groups(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Boolean `[N]`: the sample's group has all-equal rewards (no learning signal)."""
    _, inverse = torch.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    big = torch.finfo(torch.float32).max
    lo = torch.full((n_groups,), big).scatter_reduce(0, inverse, rewards.float(), "amin")
    hi = torch.full((n_groups,), -big).scatter_reduce(0, inverse, rewards.float(), "amax")
    return (hi == lo)[inverse]


Aggregator = Callable[..., torch.Tensor]
AGGREGATIONS: dict[str, Aggregator] = {}


def register_aggregation(name: str) -> Callable[[Aggregator], Aggregator]:
    def wrap(fn: Aggregator) -> Aggregator:
        AGGREGATIONS[name] = fn
        return fn
    return wrap


@register_aggregation("reward_aggr")
def reward_aggregation(components: dict[str, torch.Tensor], weights: dict[str, float],
                       groups: torch.Tensor, *, eps: float, global_std: bool) -> torch.Tensor:
    """Weighted sum of the raw rewards, then one z-score."""
    total = sum(weights[name] * components[name].float() for name in components)
    return group_zscore(total, groups, eps=eps, global_std=global_std)


@register_aggregation("advantage_aggr")
def advantage_aggregation(components: dict[str, torch.Tensor], weights: dict[str, float],
                          groups: torch.Tensor, *, eps: float, global_std: bool) -> torch.Tensor:
    """Each reward z-scored on its own, then summed with weights normalised to 1 (MixGRPO)."""
    norm = sum(weights[name] for name in components)
    if norm <= 0:
        raise ValueError("advantage_aggr needs reward weights with a positive sum")
    return sum(weights[name] / norm * group_zscore(components[name], groups, eps=eps, global_std=global_std)
               for name in components)


@dataclass
class Advantages:
    """Per-sample advantages `[N]`, the weight of each sample in the loss `[N]`, and stats."""

    values: torch.Tensor
    weights: torch.Tensor
    zero_std_groups: int


def compute_advantages(components: dict[str, torch.Tensor], weights: dict[str, float],
                       groups: torch.Tensor, *, aggregation: str = "reward_aggr", eps: float = 1e-6,
                       global_std: bool = False, clip_max: float = 5.0,
                       drop_zero_std: bool = False) -> Advantages:
    """Aggregate reward components into clipped advantages (ALGORITHMS.md §4).

    A group whose aggregated reward is constant counts as zero-variance; with `drop_zero_std`
    its samples get loss weight 0.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown reward aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    adv = AGGREGATIONS[aggregation](components, weights, groups, eps=eps, global_std=global_std)
    adv = adv.clamp(-clip_max, clip_max)
    total = sum(weights[name] * components[name].float() for name in components)
    flat = zero_std_groups(total, groups)
    n_flat = int(torch.unique(groups[flat]).numel())
    sample_weights = (~flat).float() if drop_zero_std else torch.ones_like(adv)
    return Advantages(values=adv, weights=sample_weights, zero_std_groups=n_flat)
