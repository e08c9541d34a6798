"""Step plans: the σ grid of one iteration, the solver of each step and which steps each sample
trains (ALGORITHMS.md §3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: `ode`: Euler; `sde`: the run's stochastic step kind (it has a log-probability);
#: `dpm2`: DPM-Solver++(2M), data prediction, deterministic.
SOLVERS = ("ode", "sde", "dpm2")


@dataclass(frozen=True)
class StepPlan:
    """The plan of one iteration.

    `sigmas [N+1]`: the grid, 1 → 0 (it may change from one iteration to the next: MixGRPO-Flash
    compresses it after the window). `solvers[i]`: how step i (σ_i → σ_{i+1}) is solved.
    `trained[s]`: the sorted step indices whose transitions sample s trains on; every sample
    trains the same number of steps, so every rank runs the same number of update forwards.
    """

    sigmas: torch.Tensor
    solvers: tuple[str, ...]
    trained: tuple[tuple[int, ...], ...]

    @property
    def num_steps(self) -> int:
        return len(self.solvers)

    @property
    def sde(self) -> tuple[bool, ...]:
        """Per step: stochastic."""
        return tuple(s == "sde" for s in self.solvers)

    @property
    def steps_per_sample(self) -> int:
        return len(self.trained[0]) if self.trained else 0

    def select(self, indices: Sequence[int]) -> StepPlan:
        """The same plan for a subset of the samples (a rank's share)."""
        return StepPlan(self.sigmas, self.solvers, tuple(self.trained[i] for i in indices))

    def __post_init__(self) -> None:
        if self.sigmas.dim() != 1 or self.sigmas.numel() != len(self.solvers) + 1:
            raise ValueError(f"a plan of {len(self.solvers)} steps needs {len(self.solvers) + 1} sigmas, "
                             f"got shape {tuple(self.sigmas.shape)}")
        if float(self.sigmas[0]) != 1.0 or float(self.sigmas[-1]) != 0.0 or bool((self.sigmas[1:] >= self.sigmas[:-1]).any()):
            raise ValueError("a plan's sigmas must decrease strictly from exactly 1 to exactly 0")
        unknown = sorted(set(self.solvers) - set(SOLVERS))
        if unknown:
            raise ValueError(f"unknown solver(s) {unknown}; choose from {', '.join(SOLVERS)}")
        counts = {len(t) for t in self.trained}
        if len(counts) > 1:
            raise ValueError(f"every sample must train the same number of steps, got {sorted(counts)}")
        for steps in self.trained:
            for i in steps:
                if not 0 <= i < len(self.solvers) or self.solvers[i] != "sde":
                    raise ValueError(f"trained step {i} is not a stochastic step of this plan")


def uniform_plan(sigmas: torch.Tensor, sde_steps: Sequence[int], trained: Sequence[Sequence[int]]) -> StepPlan:
    """A plan on `sigmas` with SDE steps `sde_steps` and Euler (ODE) everywhere else."""
    sde = set(sde_steps)
    solvers = tuple("sde" if i in sde else "ode" for i in range(sigmas.numel() - 1))
    return StepPlan(sigmas, solvers, tuple(tuple(t) for t in trained))


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


def granular_indices(num_steps: int, branch_step: int, granularity: int) -> list[int]:
    """G²RPO: the grid indices a branch from step k is finished on at ODE stride λ:
    `k+1, k+2, k+2+λ, …` (the first step after the branch is a fine one), always ending at
    N (σ = 0), which the published grids miss when λ does not divide N−k−2."""
    if not 0 <= branch_step <= num_steps - 2 or granularity < 1:
        raise ValueError(f"a branch step must be in 0..{num_steps - 2} and a granularity >= 1, "
                         f"got {branch_step} and {granularity}")
    indices = [branch_step + 1] + list(range(branch_step + 2, num_steps, granularity))
    return indices + [num_steps]
