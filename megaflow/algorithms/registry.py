"""Named algorithms as compositions of a step kind, a step plan and defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


from megaflow.sampling.plans import StepPlan, leading_steps, random_steps
from megaflow.seeds import generator

PlanBuilder = Callable[..., StepPlan]


@dataclass(frozen=True)
class Algorithm:
    """A GRPO variant: its SDE kind, default noise level / trained fraction, and plan builder."""

    name: str
    sde_kind: str
    noise_level: float
    timestep_fraction: float
    build_plan: PlanBuilder


def _flow_grpo_plan(num_steps: int, fraction: float, *, sample_keys: list[tuple[int, int]],
                    seed: int, iteration: int) -> StepPlan:
    steps = leading_steps(num_steps, fraction)
    return StepPlan(sde=(True,) * num_steps, trained=tuple(steps for _ in sample_keys))


def _dance_grpo_plan(num_steps: int, fraction: float, *, sample_keys: list[tuple[int, int]],
                     seed: int, iteration: int) -> StepPlan:
    trained = tuple(
        random_steps(num_steps, fraction, generator(seed, "trained-steps", iteration, prompt, sample))
        for prompt, sample in sample_keys
    )
    return StepPlan(sde=(True,) * num_steps, trained=trained)


ALGORITHMS: dict[str, Algorithm] = {
    "flow_grpo": Algorithm("flow_grpo", "flow_grpo", 0.7, 0.99, _flow_grpo_plan),
    "dance_grpo": Algorithm("dance_grpo", "dance", 0.3, 0.6, _dance_grpo_plan),
}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise KeyError(name)
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm"]
