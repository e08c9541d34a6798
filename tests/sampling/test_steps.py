"""The step math against formulas written independently here, against diffusers, and torch.distributions."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from megaflow.sampling import SDE_KINDS, flow_sigmas, step
from megaflow.algorithms.losses import clipped_surrogate


def expected_mean_std(kind, x, v, sigma, sigma_next, level, sigma_max):
    """ALGORITHMS.md §2, transcribed literally (not via the linear form the code uses)."""
    dt = sigma_next - sigma
    if kind == "ode":
        return x + dt * v, 0.0
    if kind == "flow_grpo":
        denom = sigma_max if sigma == 1.0 else sigma
        s = level * math.sqrt(sigma / (1 - denom))
        mean = x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, s * math.sqrt(-dt)
    if kind == "flow_grpo_linear":
        # Flow-GRPO's Wan step: the same mean with s = σ_min + (σ_max − σ_min)·σ, σ_min = 0.
        s = sigma_max * sigma
        mean = x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, s * math.sqrt(-dt)
    if kind == "dance":
        x0 = x - sigma * v
        score = -(x - (1 - sigma) * x0) / sigma**2
        return x + dt * v + dt * (-0.5 * level**2 * score), level * math.sqrt(sigma - sigma_next)
    std = sigma_next * math.sin(level * math.pi / 2)
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    return (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * x1, std


@pytest.mark.parametrize("kind", ["ode", *SDE_KINDS])
@pytest.mark.parametrize("i", [0, 2, 4])
def test_step_matches_independent_formulas(kind, i):
    sigmas = flow_sigmas(6, shift=3.0).double()
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(3, 4, 2, 5, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 4, 2, 5, 6, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 4, 2, 5, 6, generator=gen)
    level = {"ode": 0.0, "flow_grpo": 0.7, "flow_grpo_linear": 0.0, "dance": 0.3, "cps": 0.8}[kind]
    s, sn = float(sigmas[i]), float(sigmas[i + 1])
    out = step(kind, x.float(), v.float(), s, sn, noise_level=level, sigma_max=float(sigmas[1]), noise=noise)
    mean, std = expected_mean_std(kind, x, v, s, sn, level, float(sigmas[1]))
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.double(), torch.full((3,), std, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.prev_sample.double(), mean + std * noise.double(), rtol=1e-5, atol=1e-5)
    assert out.prev_sample.dtype == torch.float32
    if kind == "ode":
        assert out.log_prob is None
    else:
        ref = torch.distributions.Normal(out.mean.double(), std).log_prob(out.prev_sample.double()).flatten(1).mean(1)
        torch.testing.assert_close(out.log_prob.double(), ref, rtol=1e-5, atol=1e-5)


def test_ode_step_equals_diffusers_euler_bit_for_bit():
    n, shift = 10, 3.0
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1].numpy())
    ours = flow_sigmas(n, shift)
    assert torch.equal(sched.sigmas.float(), ours)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen)
    x_ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=gen)
        x_ref = sched.step(v, t, x_ref, return_dict=False)[0]
        x = step("ode", x, v, ours[i], ours[i + 1]).prev_sample
        assert torch.equal(x, x_ref), f"differs at step {i}"


def test_given_prev_sample_is_scored_not_resampled():
    sigmas = flow_sigmas(8, 3.0)
    x, v, prev = torch.randn(3, 2, 2, 4, 4), torch.randn(3, 2, 2, 4, 4), torch.randn(3, 2, 2, 4, 4)
    out = step("flow_grpo", x, v, sigmas[2], sigmas[3], noise_level=0.7, prev_sample=prev)
    assert torch.equal(out.prev_sample, prev)
    ref = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1, 1)).log_prob(prev).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, ref)


def test_bf16_inputs_compute_in_fp32():
    sigmas = flow_sigmas(8, 3.0)
    x, v = torch.randn(2, 4, 4).bfloat16(), torch.randn(2, 4, 4).bfloat16()
    out = step("dance", x, v, sigmas[1], sigmas[2], noise_level=0.3, noise=torch.zeros(2, 4, 4))
    ref = step("dance", x.float(), v.float(), sigmas[1], sigmas[2], noise_level=0.3, noise=torch.zeros(2, 4, 4))
    assert out.mean.dtype == torch.float32 and torch.equal(out.mean, ref.mean)


def test_per_sample_sigmas_match_scalar_steps():
    sigmas = flow_sigmas(8, 3.0)
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    idx = torch.tensor([0, 3, 6])
    batched = step("flow_grpo", x, v, sigmas[idx], sigmas[idx + 1], noise_level=0.7, sigma_max=sigmas[1],
                   noise=torch.zeros(3, 5))
    for j, i in enumerate(idx.tolist()):
        single = step("flow_grpo", x[j:j + 1], v[j:j + 1], sigmas[i], sigmas[i + 1], noise_level=0.7,
                      sigma_max=sigmas[1], noise=torch.zeros(1, 5))
        assert torch.equal(batched.mean[j], single.mean[0])


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_batch_mixing_steps_equals_each_sample_computed_alone(kind):
    """Per-sample sigmas from different steps, one of them deterministic (cps into σ = 0; the last
    step otherwise): every sample gets its own Gaussian step, exactly as if it ran alone."""
    sigmas = flow_sigmas(6, 3.0)
    gen = torch.Generator().manual_seed(3)
    x, v, noise = (torch.randn(4, 3, 2, 4, 4, generator=gen) for _ in range(3))
    idx = torch.tensor([0, 2, 5, 4])  # step 5 ends at σ = 0
    level = {"flow_grpo": 0.7, "flow_grpo_linear": 0.0, "dance": 0.3, "cps": 0.8}[kind]
    kw = dict(noise_level=level, sigma_max=sigmas[1])
    batched = step(kind, x, v, sigmas[idx], sigmas[idx + 1], noise=noise, **kw)
    for j, i in enumerate(idx.tolist()):
        alone = step(kind, x[j:j + 1], v[j:j + 1], sigmas[i], sigmas[i + 1], noise=noise[j:j + 1], **kw)
        assert torch.equal(batched.prev_sample[j], alone.prev_sample[0]), (kind, j)
        assert torch.equal(batched.mean[j], alone.mean[0]) and torch.equal(batched.std[j], alone.std[0])
        if alone.log_prob is None:
            assert torch.isnan(batched.log_prob[j])
        else:
            assert torch.equal(batched.log_prob[j], alone.log_prob[0]), (kind, j)
    # The samples that are stochastic really got noise; a deterministic one got its mean exactly.
    stochastic = batched.std > 0
    assert bool(stochastic[:2].all())
    assert not torch.equal(batched.prev_sample[0], batched.mean[0])
    if kind == "cps":
        assert not bool(stochastic[2]) and torch.equal(batched.prev_sample[2], batched.mean[2])
    # Scoring a given prev_sample follows the same per-sample rule.
    scored = step(kind, x, v, sigmas[idx], sigmas[idx + 1], prev_sample=batched.prev_sample, **kw)
    torch.testing.assert_close(scored.log_prob, batched.log_prob, equal_nan=True, rtol=0, atol=0)


def test_cps_into_zero_is_deterministic_and_flow_grpo_at_one_needs_sigma_max():
    sigmas = flow_sigmas(4, 1.0)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    out = step("cps", x, v, sigmas[-2], sigmas[-1], noise_level=0.8)
    assert out.log_prob is None and torch.equal(out.prev_sample, out.mean)
    with pytest.raises(ValueError, match="sigma_max"):
        step("flow_grpo", x, v, 1.0, sigmas[1], noise_level=0.7)
    with pytest.raises(ValueError, match="unknown step kind"):
        step("euler", x, v, 1.0, 0.5)


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_loss_gradient_wrt_velocity_matches_finite_differences(kind):
    """Directional derivatives of the clipped-surrogate + KL loss w.r.t. v, autograd vs central differences."""
    sigmas = flow_sigmas(6, 3.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 4, 4, generator=gen)
    v0 = torch.randn(2, 3, 2, 4, 4, generator=gen)
    level = {"flow_grpo": 0.7, "flow_grpo_linear": 0.0, "dance": 0.3, "cps": 0.8}[kind]
    kw = dict(noise_level=level, sigma_max=float(sigmas[1]))
    old = step(kind, x, v0, sigmas[1], sigmas[2], noise=torch.randn(x.shape, generator=gen), **kw)
    v_ref = v0 + 0.1 * torch.randn(x.shape, generator=gen)
    mean_ref = step(kind, x, v_ref, sigmas[1], sigmas[2], prev_sample=old.prev_sample, **kw).mean
    adv = torch.tensor([1.3, -0.7])

    def loss_fn(v):
        out = step(kind, x, v, sigmas[1], sigmas[2], prev_sample=old.prev_sample, **kw)
        per, _ = clipped_surrogate(out.log_prob, old.log_prob.detach() - 0.05, adv, clip_range=10.0)
        kl = (out.mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * out.std**2)
        return (per + 0.1 * kl).mean()

    v = (v0 + 0.05 * torch.randn(x.shape, generator=gen)).requires_grad_(True)
    loss_fn(v).backward()
    for trial in range(3):
        u = torch.randn(x.shape, generator=gen)
        eps = 1e-2
        with torch.no_grad():
            fd = (loss_fn(v + eps * u) - loss_fn(v - eps * u)) / (2 * eps)
        analytic = (v.grad * u).sum()
        assert torch.isclose(analytic, fd, rtol=2e-3, atol=1e-5), (trial, float(analytic), float(fd))


@pytest.mark.parametrize("shift", [1.0, 1.58, 1.583, 1.5831, 3.0, 5.0, 7.0])
def test_grid_starts_at_exactly_one_and_the_first_flow_grpo_step_uses_sigma_max(shift):
    """float32 shifts can miss σ = 1 by one ulp (1.5831 → 0.99999994); the grid must start at 1
    exactly, or flow_grpo's σ/(1−σ) at pure noise explodes instead of using the grid's σ_1."""
    sigmas = flow_sigmas(10, shift)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    x, v = torch.zeros(1, 4), torch.zeros(1, 4)
    out = step("flow_grpo", x, v, sigmas[0], sigmas[1], noise_level=0.7, sigma_max=sigmas[1], noise=torch.zeros(1, 4))
    s1 = float(sigmas[1])
    expected = 0.7 * math.sqrt(1.0 / (1 - s1)) * math.sqrt(1.0 - s1)
    assert float(out.std[0]) == pytest.approx(expected, rel=1e-5)
