"""Step plans: which denoising steps are stochastic and which are trained (ALGORITHMS.md §3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    """The plan of one iteration.

    `sde[i]`: step i (σ_i → σ_{i+1}) is stochastic. `trained[s]`: the sorted step indices whose
    transitions sample s trains on; every sample trains the same number of steps, so every
    rank runs the same number of update forwards.
    """

    sde: tuple[bool, ...]
    trained: tuple[tuple[int, ...], ...]

    @property
    def num_steps(self) -> int:
        return len(self.sde)

    @property
    def steps_per_sample(self) -> int:
        return len(self.trained[0]) if self.trained else 0

    def __post_init__(self) -> None:
        counts = {len(t) for t in self.trained}
        if len(counts) > 1:
            raise ValueError(f"every sample must train the same number of steps, got {sorted(counts)}")
        for steps in self.trained:
            for i in steps:
                if not 0 <= i < len(self.sde) or not self.sde[i]:
                    raise ValueError(f"trained step {i} is not a stochastic step of this plan")


def leading_steps(num_steps: int, fraction: float) -> tuple[int, ...]:
    """Flow-GRPO: steps `0 .. int(N·fraction)−1` (at least one)."""
    _check_fraction(fraction)
    return tuple(range(max(1, int(num_steps * fraction))))


def random_steps(num_steps: int, fraction: float, generator: torch.Generator) -> tuple[int, ...]:
    """DanceGRPO: a random `int((N−1)·fraction)` (at least one) of steps `0 .. N−2`, sorted."""
    _check_fraction(fraction)
    if num_steps < 2:
        raise ValueError("random step selection needs at least 2 steps (the last one is never trained)")
    k = max(1, int((num_steps - 1) * fraction))
    perm = torch.randperm(num_steps - 1, generator=generator)[:k]
    return tuple(sorted(int(i) for i in perm))


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {fraction}")
