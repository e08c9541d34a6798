"""One denoising step of a flow-matching sampler and its log-probability (ALGORITHMS.md §2).

Every kind writes the next sample as `x_{i+1} = μ + std·ε` with `μ = a·x + b·v` linear in the
velocity `v`; `step_coefficients` gives `(a, b, std)` per sample and everything else (the step,
its log-density, its gradient, the fused kernels) is built on that one function.
All arithmetic is float32 whatever the input dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SDE_KINDS = ("flow_grpo", "flow_grpo_linear", "dance", "cps")
STEP_KINDS = ("ode",) + SDE_KINDS
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """Result of one step. Tensors are float32; `std` and `log_prob` are `[B]`."""

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None


def _as_batch(value: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or `[B]` value as a float32 `[B]` tensor on `device`."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.dim() == 0:
        return t.expand(batch).clone()
    t = t.reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"expected a scalar or {batch} per-sample values, got shape {tuple(t.shape)}")
    return t


def step_coefficients(
    kind: str,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    batch: int,
    noise_level: float = 0.0,
    sigma_max: float | torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(a, b, std)`, each float32 `[B]`, such that the step mean is `μ = a·x + b·v`.

    `sigma_max` is the grid's σ_1: flow_grpo uses it in place of σ in `σ/(1−σ)` at σ = 1;
    `flow_grpo_linear` (Flow-GRPO's Wan step) has the same mean with `s = σ_max·σ` (noise linear
    in σ, the grid ending at σ_min = 0) and no noise level.
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; choose one of {', '.join(STEP_KINDS)}")
    device = torch.device(device)
    s = _as_batch(sigma, batch, device)
    s_next = _as_batch(sigma_next, batch, device)
    dt = s_next - s
    if bool((dt > 0).any()):
        raise ValueError("sigma_next must not exceed sigma: sampling runs from sigma=1 to sigma=0")
    if kind == "ode":
        return torch.ones_like(s), dt, torch.zeros_like(s)
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if kind in ("flow_grpo", "flow_grpo_linear", "dance"):
        if kind == "flow_grpo_linear":
            if sigma_max is None:
                raise ValueError("flow_grpo_linear needs sigma_max (the grid's sigma_1): s = sigma_max * sigma")
            var_coef = (_as_batch(sigma_max, batch, device) * s) ** 2
        elif kind == "flow_grpo":
            at_one = s >= 1.0
            if bool(at_one.any()):
                if sigma_max is None:
                    raise ValueError(
                        "flow_grpo at sigma=1 needs sigma_max (the grid's sigma_1) to avoid "
                        "dividing by 1-sigma=0; pass sigma_max=sigmas[1]"
                    )
                denom_sigma = torch.where(at_one, _as_batch(sigma_max, batch, device), s)
            else:
                denom_sigma = s
            # s_t^2 = a^2 * sigma / (1 - sigma)
            var_coef = noise_level**2 * s / (1 - denom_sigma)
        else:
            # DanceGRPO: mu = x + dt*v + dt*(eta^2/2)*(x + (1-sigma)*v)/sigma, which has the same
            # linear form as flow_grpo with s_t^2 = eta^2.
            var_coef = torch.full_like(s, noise_level**2)
        a = 1 + var_coef * dt / (2 * s)
        b = (1 + var_coef * (1 - s) / (2 * s)) * dt
        std = torch.sqrt(var_coef) * torch.sqrt(-dt)
        return a, b, std
    # cps: mu = (1 - sigma') * x0_hat + sqrt(sigma'^2 - std^2) * x1_hat,
    # x0_hat = x - sigma*v, x1_hat = x + (1 - sigma)*v, std = sigma' * sin(a*pi/2).
    std = s_next * math.sin(noise_level * math.pi / 2)
    keep = torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0))
    a = (1 - s_next) + keep
    b = -(1 - s_next) * s + keep * (1 - s)
    return a, b, std


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape((-1,) + (1,) * (like.dim() - 1))


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian log-density averaged over non-batch elements: float32 `[B]`.

    `x_next`, `mean`: `[B, ...]`; `std`: `[B]`, all positive.
    """
    if bool((std <= 0).any()):
        raise ValueError("log-probability needs std > 0; this step is deterministic")
    sq = (x_next.float() - mean.float()).pow(2).flatten(1).mean(1)
    return -sq / (2 * std**2) - torch.log(std) - HALF_LOG_2PI


def step(
    kind: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float = 0.0,
    sigma_max: float | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    compute_log_prob: bool = True,
) -> StepOutput:
    """One step from `x` (`[B, ...]`, at σ) to σ_next given the velocity `v` (same shape).

    Given `prev_sample`, it is not resampled and `log_prob` is its log-density; otherwise it is
    `mean + std·noise` with `noise` given or drawn from `generator`; every sample is its own
    Gaussian, so with per-sample sigmas a sample whose std is 0 (cps into σ_next = 0) gets its
    mean exactly. `log_prob` is `[B]` with NaN for such samples; it is None for `ode`, when no
    sample of the batch is stochastic, and when `compute_log_prob` is False (the trainer
    computes it through `megaflow.kernels`).
    """
    if x.shape != v.shape:
        raise ValueError(f"x and v must have the same shape, got {tuple(x.shape)} and {tuple(v.shape)}")
    xf, vf = x.float(), v.float()
    a, b, std = step_coefficients(
        kind, sigma, sigma_next, batch=x.shape[0], noise_level=noise_level,
        sigma_max=sigma_max, device=x.device,
    )
    if kind == "ode":
        mean = xf + _bcast(b, vf) * vf
    else:
        mean = _bcast(a, xf) * xf + _bcast(b, vf) * vf
    stochastic = kind != "ode" and bool((std > 0).any())
    if prev_sample is None:
        if stochastic:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            noisy = mean + _bcast(std, mean) * noise.float()
            # Each sample is its own Gaussian: a sample whose std is 0 (cps into σ_next = 0) gets its
            # mean exactly, whatever the other samples of the batch do.
            prev_sample = noisy if bool((std > 0).all()) else torch.where(_bcast(std > 0, mean), noisy, mean)
        else:
            prev_sample = mean
    else:
        prev_sample = prev_sample.float()
    log_prob = None
    if stochastic and compute_log_prob:
        log_prob = per_sample_log_prob(prev_sample, mean, std)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob)


def per_sample_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`gaussian_log_prob` of each sample whose std is positive, NaN where it is 0 (a
    deterministic step has no density): float32 `[B]`."""
    positive = std > 0
    if bool(positive.all()):
        return gaussian_log_prob(x_next, mean, std)
    out = torch.full_like(std, float("nan"))
    out[positive] = gaussian_log_prob(x_next[positive], mean[positive], std[positive])
    return out
