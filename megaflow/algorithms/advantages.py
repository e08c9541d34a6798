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
                       drop_zero_std: bool = False, keep: torch.Tensor | None = None) -> Advantages:
    """Aggregate reward components into clipped advantages (ALGORITHMS.md §4).

    Components are `[N]`, or `[N, V]` when each sample is scored V times (G²RPO's granularities):
    the advantage is then the sum over the V columns of each column's aggregate, clipped after
    the sum. A group whose total reward is constant counts as zero-variance; with `drop_zero_std`
    its samples get loss weight 0. `keep` (bool `[N]`): only these samples are normalised
    together and trained (best-of-n after renormalising); the others get advantage and weight 0.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown reward aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    cols = {name: (c if c.dim() == 2 else c[:, None]).float() for name, c in components.items()}
    n = groups.shape[0]
    keep = torch.ones(n, dtype=torch.bool) if keep is None else keep
    idx = keep.nonzero().flatten()
    kept_groups = groups[idx]
    adv = torch.zeros(n)
    num_cols = next(iter(cols.values())).shape[1]
    adv[idx] = sum(AGGREGATIONS[aggregation]({k: c[idx, v] for k, c in cols.items()}, weights, kept_groups,
                                             eps=eps, global_std=global_std) for v in range(num_cols))
    adv = adv.clamp(-clip_max, clip_max)
    total = sum(weights[name] * c.sum(1) for name, c in cols.items())
    flat = zero_std_groups(total[idx], kept_groups)
    n_flat = int(torch.unique(kept_groups[flat]).numel())
    sample_weights = keep.float()
    if drop_zero_std:
        sample_weights[idx[flat]] = 0.0
    return Advantages(values=adv, weights=sample_weights, zero_std_groups=n_flat)


def best_of(advantages: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """DanceGRPO's best-of-n: bool `[N]`, the top n/2 and bottom n/2 samples of each group by
    advantage (ties broken by position)."""
    if n < 2 or n % 2:
        raise ValueError(f"best-of-n keeps n/2 best and n/2 worst samples; n must be even and >= 2, got {n}")
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for g in torch.unique(groups):
        members = (groups == g).nonzero().flatten()
        if members.numel() < n:
            raise ValueError(f"best-of-{n} needs groups of at least {n} samples, got {members.numel()}")
        order = members[torch.argsort(advantages[members], stable=True)]
        keep[order[: n // 2]] = True
        keep[order[-(n // 2):]] = True
    return keep
