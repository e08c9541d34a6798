"""Eager-torch reference of the fused SDE log-probability (the ground truth for the kernels)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaflow.sampling.steps import HALF_LOG_2PI, SDE_KINDS, step_coefficients


@dataclass
class LogProbOut:
    """Per-sample results, float32 `[B]`.

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
    if kind not in SDE_KINDS:
        raise ValueError(f"sde_log_prob needs a stochastic step kind ({', '.join(SDE_KINDS)}), got {kind!r}")


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
    """Reference: `x`, `v`, `x_next`, means `[B, ...]` (any float dtype), sigmas scalar or `[B]`."""
    check_kind(kind)
    batch = x.shape[0]
    a, b, std = step_coefficients(kind, sigma, sigma_next, batch=batch, noise_level=noise_level,
                                  sigma_max=sigma_max, device=x.device)
    if bool((std <= 0).any()):
        raise ValueError(f"{kind} step into sigma_next={sigma_next} is deterministic (std=0): it has no log-probability")
    shape = (batch,) + (1,) * (x.dim() - 1)
    mean = a.view(shape) * x.float() + b.view(shape) * v.float()
    inv_two_var = 1.0 / (2 * std**2)
    count = torch.full_like(std, float(x[0].numel()))
    reduce = (lambda t: t.flatten(1).sum(1)) if partial else (lambda t: t.flatten(1).mean(1))
    const = torch.log(std) + HALF_LOG_2PI
    log_prob = -reduce((x_next.float() - mean).pow(2)) * inv_two_var - (const * count if partial else const)
    kl = None if mean_ref is None else reduce((mean - mean_ref.float()).pow(2)) * inv_two_var
    ratio_norm = None if mean_old is None else reduce((mean - mean_old.float()).pow(2)) * inv_two_var
    return LogProbOut(log_prob=log_prob, std=std, kl=kl, ratio_norm=ratio_norm, count=count if partial else None)
