"""Eager-torch reference of the fused SDE log-probability (the ground truth for the kernels)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaflow.sampling.steps import HALF_LOG_2PI, SDE_KINDS, step_coefficients


@dataclass
class LogProbOut:
    """Per-sample results, `[B]`: float32, or float64 when the reference is given float64 inputs.

    With `partial=False` each field is a mean over the sample's elements; with `partial=True`
    it is the local sum and `count` holds the number of local elements, so a sequence-parallel
    caller all-reduces sums and counts and divides.
    - `log_prob`: Gaussian log-density of `x_next` under the step's `N(μ, std²)`.
    - `kl`: `(μ − mean_ref)² / (2·std²)`, the closed-form KL to the reference step (if asked).
    - `ratio_norm`: `(μ − mean_old)² / (2·std²)`, the GRPO-Guard RatioNorm correction (if asked).
    - `std`: the step's standard deviation (not reduced).
    """

    log_prob: torch.Tensor
    std: torch.Tensor
    kl: torch.Tensor | None = None
    ratio_norm: torch.Tensor | None = None
    count: torch.Tensor | None = None


def check_kind(kind: str) -> None:
    """Raise ValueError unless `kind` is a stochastic step kind (one with a log-probability)."""
    if kind not in SDE_KINDS:
        raise ValueError(f"sde_log_prob needs a stochastic step kind ({', '.join(SDE_KINDS)}), got {kind!r}")


def check_inputs(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    mean_ref: torch.Tensor | None,
    mean_old: torch.Tensor | None,
) -> None:
    """Raise ValueError unless every tensor has the non-empty shape `[B, ...]` of `x` and x's device."""
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [B, ...] tensor, got shape {tuple(x.shape)}")
    named = {"v": v, "x_next": x_next, "mean_ref": mean_ref, "mean_old": mean_old}
    for name, t in named.items():
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on one device")


def sde_coefficients(
    kind: str,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    batch: int,
    noise_level: float,
    sigma_max: float | torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`step_coefficients` `(a, b, std)`, float32 `[B]`; ValueError where the step is deterministic."""
    a, b, std = step_coefficients(kind, sigma, sigma_next, batch=batch, noise_level=noise_level,
                                  sigma_max=sigma_max, device=device)
    if bool((std <= 0).any()):
        raise ValueError(f"{kind} step into sigma_next={sigma_next} is deterministic (std=0): "
                         "it has no log-probability")
    return a, b, std


def sde_log_prob_torch(
    kind: str,
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float,
    sigma_max: float | torch.Tensor | None = None,
    mean_ref: torch.Tensor | None = None,
    mean_old: torch.Tensor | None = None,
    partial: bool = False,
) -> LogProbOut:
    """Reference: `x`, `v`, `x_next`, means `[B, ...]` (any float dtype), sigmas scalar or `[B]`.

    Arithmetic is float32, or float64 when any of `x`, `v`, `x_next` is float64 (so that
    `torch.autograd.gradcheck` is meaningful); the float32 step coefficients are then exact constants.
    """
    check_kind(kind)
    check_inputs(x, v, x_next, mean_ref, mean_old)
    batch = x.shape[0]
    a, b, std = sde_coefficients(kind, sigma, sigma_next, batch=batch, noise_level=noise_level,
                                 sigma_max=sigma_max, device=x.device)
    wide = torch.float64 in (x.dtype, v.dtype, x_next.dtype)
    dtype = torch.float64 if wide else torch.float32
    a, b, std = a.to(dtype), b.to(dtype), std.to(dtype)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, -1).to(dtype)

    mean = a[:, None] * rows(x) + b[:, None] * rows(v)
    return assemble(
        (rows(x_next) - mean).pow(2).sum(1),
        None if mean_ref is None else (mean - rows(mean_ref)).pow(2).sum(1),
        None if mean_old is None else (mean - rows(mean_old)).pow(2).sum(1),
        std, numel=x[0].numel(), partial=partial,
    )


def assemble(sq_next: torch.Tensor, sq_ref: torch.Tensor | None, sq_old: torch.Tensor | None,
             std: torch.Tensor, *, numel: int, partial: bool) -> LogProbOut:
    """`LogProbOut` from per-sample sums `[B]` of (x_next−μ)², (μ−mean_ref)², (μ−mean_old)² over
    `numel` elements; shared by every backend so they differ only in how the sums are computed."""
    inv_two_var = 1.0 / (2 * std**2)
    count = torch.full_like(std, float(numel))
    scale = (lambda t: t) if partial else (lambda t: t / count)
    const = torch.log(std) + HALF_LOG_2PI
    log_prob = -scale(sq_next) * inv_two_var - (const * count if partial else const)
    kl = None if sq_ref is None else scale(sq_ref) * inv_two_var
    ratio_norm = None if sq_old is None else scale(sq_old) * inv_two_var
    return LogProbOut(log_prob=log_prob, std=std, kl=kl, ratio_norm=ratio_norm, count=count if partial else None)
