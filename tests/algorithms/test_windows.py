"""MixGRPO window positions over 60 iterations, each strategy against its rule written out here."""
import math

import pytest
import torch

from megaflow.algorithms.registry import ALGORITHMS, PlanContext
from megaflow.algorithms.windows import advance_window, initial_window_state, last_window_start, window_start
from megaflow.config import AlgorithmConfig

N, W = 25, 4
LAST = N - 2 - W  # 19: full windows only, the last two steps always ODE


def positions(strategy: str, interval: int, stride: int, iterations: int = 60) -> list[int]:
    state, out = initial_window_state(), []
    for it in range(iterations):
        out.append(window_start(strategy, state, seed=3, iteration=it, last_start=LAST))
        state = advance_window(strategy, state, interval=interval, stride=stride, last_start=LAST)
    return out


def test_progressive_moves_by_stride_every_tau_and_rolls_back():
    got = positions("progressive", interval=3, stride=2)
    expected, c = [], 0
    for it in range(60):
        expected.append(c)
        if (it + 1) % 3 == 0:
            c = c + 2 if c + 2 <= LAST else 0
    assert got == expected
    assert max(got) == 18 and got.count(0) > 3  # 0, 2, …, 18, then back to 0


def test_progressive_with_stride_zero_and_frozen_stay_at_the_first_steps():
    assert positions("progressive", interval=1, stride=0) == [0] * 60
    assert positions("frozen", interval=1, stride=1) == [0] * 60


def test_random_is_uniform_per_iteration_and_a_function_of_seed_and_iteration():
    got = positions("random", interval=25, stride=1)
    assert got == positions("random", interval=1, stride=5)  # no state involved
    assert min(got) >= 0 and max(got) <= LAST and len(set(got)) > 10
    other = [window_start("random", {}, seed=4, iteration=it, last_start=LAST) for it in range(60)]
    assert other != got


def test_decay_interval_falls_linearly_from_tau_to_one():
    got = positions("decay", interval=10, stride=1)
    expected, c, held = [], 0, 0
    for _ in range(60):
        expected.append(c)
        held += 1
        tau = max(1, int(10 * (1 - c / LAST) + c / LAST))  # MixGRPO's 10·(1 − c/23) + c/23 with 23 = N − 2
        if held >= tau:
            c, held = (c + 1 if c + 1 <= LAST else 0), 0
    assert got == expected
    # the window lingers early and hurries late
    assert got[:10] == [0] * 10 and got.count(LAST) < got.count(0)


def test_window_size_validation():
    assert last_window_start(25, 4) == 19
    with pytest.raises(ValueError, match="window_size"):
        last_window_start(6, 5)


def test_mix_plan_follows_the_state():
    keys = [(0, g) for g in range(4)]
    for c in (0, 7, LAST):
        ctx = PlanContext(num_steps=N, shift=3.0, fraction=1.0, options=AlgorithmConfig(name="mix_grpo"),
                          sample_keys=keys, group_size=4, seed=0, iteration=0)
        plan = ALGORITHMS["mix_grpo"].build_plan(ctx, {"start": c, "held": 0})
        assert plan.solvers == ("ode",) * c + ("sde",) * W + ("ode",) * (N - c - W)
        assert plan.trained == (tuple(range(c, c + W)),) * 4
        assert math.isclose(float(plan.sigmas[-1]), 0.0) and plan.sigmas.dtype == torch.float32
