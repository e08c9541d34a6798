import pytest
import torch

from megaflow.algorithms.registry import ALGORITHMS, PlanContext
from megaflow.config import AlgorithmConfig
from megaflow.sampling.plans import StepPlan, granular_indices, leading_steps, random_steps, uniform_plan
from megaflow.sampling.schedule import flow_sigmas, shift_sigmas


def ctx(name: str, *, num_steps: int = 16, keys=None, iteration: int = 3, group_size: int = 4, **options) -> PlanContext:
    keys = keys if keys is not None else [(p, g) for p in range(2) for g in range(group_size)]
    return PlanContext(num_steps=num_steps, shift=3.0, fraction=ALGORITHMS[name].timestep_fraction,
                       options=AlgorithmConfig(name=name, **options), sample_keys=keys, group_size=group_size,
                       seed=7, iteration=iteration)


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
    plan = ALGORITHMS["dance_grpo"].build_plan(ctx("dance_grpo", keys=keys), {})
    again = ALGORITHMS["dance_grpo"].build_plan(ctx("dance_grpo", keys=keys[::-1]), {})
    assert plan.trained == again.trained[::-1]
    assert len(set(plan.trained)) > 1 and plan.steps_per_sample == 9
    assert all(15 not in t for t in plan.trained)
    assert plan.solvers == ("sde",) * 16


def test_plan_rejects_bad_grids_unequal_or_deterministic_trained_steps():
    grid = flow_sigmas(3)
    with pytest.raises(ValueError, match="same number"):
        uniform_plan(grid, range(3), [(0,), (0, 1)])
    with pytest.raises(ValueError, match="not a stochastic step"):
        uniform_plan(grid, (0, 2), [(1,)])
    with pytest.raises(ValueError, match="needs 4 sigmas"):
        StepPlan(flow_sigmas(4), ("sde",) * 3, ((0,),))
    with pytest.raises(ValueError, match="exactly 1 to exactly 0"):
        StepPlan(torch.tensor([1.0, 0.5, 0.1]), ("sde", "ode"), ((0,),))
    with pytest.raises(ValueError, match="unknown solver"):
        StepPlan(grid, ("sde", "rk4", "ode"), ((0,),))


def test_fast_plan_window_inside_its_range_and_ode_elsewhere():
    starts = set()
    for it in range(40):
        plan = ALGORITHMS["flow_grpo_fast"].build_plan(ctx("flow_grpo_fast", iteration=it), {})
        window = [i for i, s in enumerate(plan.solvers) if s == "sde"]
        assert len(window) == 2 and window[1] == window[0] + 1 and 0 <= window[0] and window[1] < 8
        assert all(t == tuple(window) for t in plan.trained)
        starts.add(window[0])
    assert starts == set(range(7))  # uniform over 0 .. N/2 − w


def test_mix_flash_plan_layout():
    state = {"start": 5, "held": 0}
    plan = ALGORITHMS["mix_grpo_flash"].build_plan(ctx("mix_grpo_flash", num_steps=25, window_size=4), state)
    # Euler before the window, SDE on steps 5..8, DPM-Solver++ on the compressed tail.
    n = int((25 - 8) * 0.4)
    assert plan.solvers == ("ode",) * 5 + ("sde",) * 4 + ("dpm2",) * (n - 1)
    assert plan.sigmas.numel() == 8 + 1 + n and float(plan.sigmas[-1]) == 0.0
    assert torch.equal(plan.sigmas[:10], flow_sigmas(25, 3.0)[:10])
    assert all(t == (5, 6, 7, 8) for t in plan.trained)


def test_g2rpo_plan_branches_and_groups():
    from megaflow.algorithms.registry import group_ids

    alg = ALGORITHMS["g2rpo"]
    opts = AlgorithmConfig(name="g2rpo", branch_steps=[0, 3, 5])
    keys = alg.sample_keys(2, 4, opts, 16)
    assert len(keys) == 2 * 3 * 4
    plan = alg.build_plan(ctx("g2rpo", keys=keys, branch_steps=[0, 3, 5]), {})
    assert [t[0] for t in plan.trained[:12]] == [0] * 4 + [3] * 4 + [5] * 4
    assert plan.solvers[0] == plan.solvers[3] == plan.solvers[5] == "sde" and plan.solvers[1] == "ode"
    groups = group_ids(keys, 4)
    assert groups.tolist() == [g for g in range(6) for _ in range(4)]  # one group per (prompt, k)


@pytest.mark.parametrize("lam", [1, 2, 3])
def test_granular_grids_end_at_zero_with_a_fine_first_step(lam):
    n = 16
    for k in range(n - 1):
        idx = granular_indices(n, k, lam)
        assert idx[0] == k + 1 and idx[-1] == n and idx == sorted(set(idx))
        if k + 2 < n:
            assert idx[1] == k + 2
        assert all(b - a <= lam for a, b in zip(idx[1:], idx[2:]))
        assert len(idx) - 1 == 1 + -(-(n - k - 2) // lam)
        if (n - k - 2) % lam == 0:  # where the published grid reaches 0, the NFEs are its ceil((N−1−k)/λ)
            assert len(idx) - 1 == -(-(n - 1 - k) // lam)
    with pytest.raises(ValueError):
        granular_indices(n, n - 1, 1)
