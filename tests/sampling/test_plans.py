import pytest
import torch

from megaflow.algorithms.registry import ALGORITHMS
from megaflow.sampling.plans import StepPlan, leading_steps, random_steps
from megaflow.sampling.schedule import flow_sigmas, shift_sigmas


def test_flow_sigmas_grid_and_shift():
    s = flow_sigmas(4, shift=1.0)
    assert torch.equal(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = flow_sigmas(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and bool((shifted[1:] < shifted[:-1]).all())
    torch.testing.assert_close(shifted[2], torch.tensor(1.5 / 2.0))  # 3*0.5/(1+2*0.5)
    with pytest.raises(ValueError):
        shift_sigmas(s, 0.0)


def test_leading_and_random_fractions():
    assert leading_steps(10, 0.99) == tuple(range(9))
    assert leading_steps(16, 0.6) == tuple(range(9))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    steps = random_steps(20, 0.6, g1)
    assert steps == random_steps(20, 0.6, g2)
    assert len(steps) == int(19 * 0.6) and max(steps) <= 18 and list(steps) == sorted(set(steps))
    with pytest.raises(ValueError):
        leading_steps(10, 0.0)


def test_dance_plan_is_per_sample_and_layout_invariant():
    keys = [(p, g) for p in range(2) for g in range(4)]
    plan = ALGORITHMS["dance_grpo"].build_plan(16, 0.6, sample_keys=keys, seed=7, iteration=3)
    again = ALGORITHMS["dance_grpo"].build_plan(16, 0.6, sample_keys=keys[::-1], seed=7, iteration=3)
    assert plan.trained == again.trained[::-1]
    assert len(set(plan.trained)) > 1 and plan.steps_per_sample == 9
    assert all(15 not in t for t in plan.trained)


def test_plan_rejects_unequal_or_deterministic_trained_steps():
    with pytest.raises(ValueError, match="same number"):
        StepPlan(sde=(True, True, True), trained=((0,), (0, 1)))
    with pytest.raises(ValueError, match="not a stochastic step"):
        StepPlan(sde=(True, False, True), trained=((1,),))
