"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler, and the MixGRPO-Flash grid."""
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from megaflow.sampling import flow_sigmas, step
from megaflow.sampling.dpm import History, data_prediction, dpm_solver_2m_step, flash_grid


def diffusers_dpm(grid: torch.Tensor, start: int, history_x0: torch.Tensor | None) -> DPMSolverMultistepScheduler:
    """diffusers' flow-matching DPM-Solver++(2M) placed at step `start` of `grid` with `history_x0`
    (the x̂0 of step start−1) already in its history.

    diffusers 0.42's `set_timesteps` takes neither sigmas nor a flow grid of our own (with
    `use_flow_sigmas` it builds `linspace(1, 1/1000)` shifted by `flow_shift`), so after it has set
    everything up we overwrite its internal state: `sigmas` (the whole grid, final 0 included: its
    second-order update reads sigmas[i−1]), `timesteps` (only their count matters: it decides
    which step is the last, first order with `final_sigmas_type="zero"`), `_step_index` (so that
    `step()` never looks the timestep up), `model_outputs[-1]` (the history) and
    `lower_order_nums` (1: one model output already seen, so the first step is second order).
    """
    sched = DPMSolverMultistepScheduler(
        solver_order=2,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_flow_sigmas=True,
        flow_shift=1.0,
        final_sigmas_type="zero",
    )
    num = len(grid) - 1
    sched.set_timesteps(num_inference_steps=num)
    sched.sigmas = grid.clone()
    sched.timesteps = (grid[:-1] * 1000).to(torch.int64)
    sched._step_index = start
    if history_x0 is not None:
        sched.model_outputs[-1] = history_x0.clone()
        sched.lower_order_nums = 1
    return sched


@pytest.mark.parametrize("last_window_step,compression", [(3, 0.4), (3, 0.2), (0, 0.4), (10, 0.4)])
def test_matches_diffusers_step_by_step(last_window_step, compression):
    """Euler over steps 0..L (the window), each pushing its x̂0 into the history, then DPM-Solver++
    steps to 0; diffusers is started at step L+1 with the same history and fed the same velocities.
    Measured (diffusers 0.42.1, torch 2.13 CPU): max abs difference 0.0 at every step of every case
    here, i.e. bit for bit (ALGORITHMS.md §3 says it is): the same float32 operations in the same
    order, so the test asserts exact equality. (With batches of 16+ samples torch's vectorised
    log/exp on our `[B]` sigmas could differ from diffusers' 0-d scalar path by an ulp.)
    With L = 0 the history was predicted at σ = 1 (λ = −inf) and both fall back to first order.
    """
    grid = flash_grid(25, 3.0, last_window_step, compression)
    gen = torch.Generator().manual_seed(last_window_step)
    shape = (2, 4, 3, 8, 8)
    x = torch.randn(shape, generator=gen)
    history = History()
    for i in range(last_window_step + 1):
        v = torch.randn(shape, generator=gen)
        history = History(x0=data_prediction(x, v, grid[i]), sigma=grid[i])
        x = step("ode", x, v, grid[i], grid[i + 1]).prev_sample
    sched = diffusers_dpm(grid, last_window_step + 1, history.x0)
    x_ref = x.clone()
    worst = 0.0
    for i in range(last_window_step + 1, len(grid) - 1):
        v = torch.randn(shape, generator=gen)
        x, history = dpm_solver_2m_step(x, v, grid[i], grid[i + 1], history)
        x_ref = sched.step(v, sched.timesteps[i], x_ref, return_dict=False)[0]
        diff = (x - x_ref).abs().max().item()
        worst = max(worst, diff)
        assert diff == 0.0, f"step {i}: max abs difference {diff}"
    assert worst == 0.0
    assert grid[-1] == 0 and torch.equal(x, history.x0)


def test_history_across_the_window_matters():
    """Starting the solver after the window without history (a fresh diffusers scheduler) is a
    different sampler: the first step is then first order."""
    grid = flash_grid(25, 3.0, 3, 0.4)
    gen = torch.Generator().manual_seed(0)
    x, v, x0_prev = (torch.randn(2, 16, generator=gen) for _ in range(3))
    with_history, _ = dpm_solver_2m_step(x, v, grid[4], grid[5], History(x0_prev, grid[3]))
    without, _ = dpm_solver_2m_step(x, v, grid[4], grid[5])
    sched = diffusers_dpm(grid, 4, None)
    ref = sched.step(v, sched.timesteps[4], x.clone(), return_dict=False)[0]
    assert torch.equal(without, ref)
    assert (with_history - without).abs().max() > 1e-3


def test_final_step_returns_data_prediction_exactly():
    grid = flash_grid(25, 3.0, 3, 0.4)
    gen = torch.Generator().manual_seed(1)
    x, v, x0_prev = (torch.randn(3, 2, 5, 5, generator=gen) for _ in range(3))
    out, hist = dpm_solver_2m_step(x, v, grid[-2], grid[-1], History(x0_prev, grid[-3]))
    assert torch.equal(out, x - grid[-2] * v)
    assert torch.equal(hist.x0, out) and torch.equal(hist.sigma, grid[-2].expand(3))


def test_mixed_batch_equals_samples_one_at_a_time():
    """Per-sample sigmas: sample 0 second order, sample 1 without history (its slot marked by σ = 1,
    and once more by NaN), sample 2 at its final step (σ_next = 0, first order despite its history)."""
    grid = flash_grid(25, 3.0, 3, 0.4)
    gen = torch.Generator().manual_seed(2)
    shape = (3, 4, 2, 6, 6)
    x, v, x0_prev = (torch.randn(shape, generator=gen) for _ in range(3))
    idx = torch.tensor([6, 4, len(grid) - 2])
    sigma, sigma_next, sigma_prev = grid[idx], grid[idx + 1], grid[idx - 1]
    alone = [
        dpm_solver_2m_step(x[:1], v[:1], grid[6], grid[7], History(x0_prev[:1], grid[5]))[0],
        dpm_solver_2m_step(x[1:2], v[1:2], grid[4], grid[5], None)[0],
        dpm_solver_2m_step(x[2:], v[2:], grid[-2], grid[-1], History(x0_prev[2:], grid[-3]))[0],
    ]
    for marker in (1.0, float("nan")):
        prev = sigma_prev.clone()
        prev[1] = marker
        batched, hist = dpm_solver_2m_step(x, v, sigma, sigma_next, History(x0_prev, prev))
        assert batched.dtype == torch.float32 and torch.equal(hist.sigma, sigma)
        for j in range(3):
            assert torch.equal(batched[j], alone[j][0]), (marker, j)
    # the history did make sample 0 second order
    first_order = dpm_solver_2m_step(x[:1], v[:1], grid[6], grid[7])[0]
    assert not torch.allclose(alone[0], first_order)
    assert torch.equal(alone[2][0], x[2] - grid[-2] * v[2])


def test_scalar_and_per_sample_sigmas_agree_and_bf16_computes_in_fp32():
    grid = flash_grid(25, 3.0, 3, 0.4)
    gen = torch.Generator().manual_seed(3)
    x, v, x0_prev = (torch.randn(2, 3, 4, generator=gen) for _ in range(3))
    a, _ = dpm_solver_2m_step(x, v, float(grid[5]), float(grid[6]), History(x0_prev, float(grid[4])))
    b, _ = dpm_solver_2m_step(x, v, grid[5].expand(2), grid[6].expand(2), History(x0_prev, grid[4].expand(2)))
    assert torch.equal(a, b)
    hb, vb = x.bfloat16(), v.bfloat16()
    c, hist = dpm_solver_2m_step(hb, vb, grid[5], grid[6], History(x0_prev.bfloat16(), grid[4]))
    d, _ = dpm_solver_2m_step(hb.float(), vb.float(), grid[5], grid[6], History(x0_prev.bfloat16().float(), grid[4]))
    assert c.dtype == torch.float32 and hist.x0.dtype == torch.float32 and torch.equal(c, d)


def test_step_rejects_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must not exceed"):
        dpm_solver_2m_step(x, x, 0.5, 0.6)
    with pytest.raises(ValueError, match="same shape"):
        dpm_solver_2m_step(x, torch.zeros(2, 4), 0.5, 0.4)
    with pytest.raises(ValueError, match="larger than sigma"):
        dpm_solver_2m_step(x, x, 0.5, 0.4, History(x, 0.3))
    with pytest.raises(ValueError, match="both x0 and sigma"):
        dpm_solver_2m_step(x, x, 0.5, 0.4, History(x, None))
    with pytest.raises(ValueError, match="history.x0 has shape"):
        dpm_solver_2m_step(x, x, 0.5, 0.4, History(torch.zeros(2, 4), 0.6))


@pytest.mark.parametrize("compression,expected", [
    (0.4, [1, .9863, .9718, .9565, .9403, .8852, .8182, .7347, .6279, .4865, .2903, 0]),
    (0.2, [1, .9863, .9718, .9565, .9403, .7925, .5385, 0]),
])
def test_flash_grid_worked_examples(compression, expected):
    grid = flash_grid(25, 3.0, 3, compression)
    assert grid.dtype == torch.float32
    torch.testing.assert_close(grid, torch.tensor(expected), rtol=0, atol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_flash_grid_shape_junction_and_end(shift):
    n_steps = 25
    base = flow_sigmas(n_steps, shift)
    for last in range(n_steps - 1):
        for r in (0.2, 0.4, 1.0):
            grid = flash_grid(n_steps, shift, last, r)
            n = max(int(max((n_steps - last) * r, 1)), 2)
            assert len(grid) == last + 1 + n, (last, r)
            assert torch.equal(grid[: last + 2], base[: last + 2]), (last, r)
            assert grid[-1].item() == 0.0, (last, r)
            assert bool((grid[1:] < grid[:-1]).all()), (last, r)
            assert (grid == base[last + 1]).sum() == 1
    # r = 1 keeps the original grid (evenly spaced unshifted time at the same spacing)
    torch.testing.assert_close(flash_grid(n_steps, shift, 5, 1.0), base, rtol=0, atol=1e-6)


def test_flash_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="last_window_step"):
        flash_grid(25, 3.0, 24, 0.4)
    with pytest.raises(ValueError, match="last_window_step"):
        flash_grid(25, 3.0, -1, 0.4)
    with pytest.raises(ValueError, match="compression"):
        flash_grid(25, 3.0, 3, 0.0)
    with pytest.raises(ValueError, match="compression"):
        flash_grid(25, 3.0, 3, 1.5)
    with pytest.raises(ValueError, match="num_steps"):
        flash_grid(1, 3.0, 0, 0.4)
    with pytest.raises(ValueError, match="shift"):
        flash_grid(25, 0.0, 3, 0.4)
