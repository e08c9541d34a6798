"""Policy losses (ALGORITHMS.md §5): small registered functions of one trained step's per-sample
terms (verl `core_algos` style). `algorithm.loss` names one; the KL to the reference stays a
separate term of the update."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class StepTerms:
    """One trained step of a micro-batch, all `[B]` float32: new and rollout-time log p, advantages,
    the step's std and `dt = σ_next − σ`, and (losses that ask for it) the RatioNorm correction
    `mean((μ_θ − μ_old)²) / (2·std²)`."""

    logp_new: torch.Tensor
    logp_old: torch.Tensor
    advantages: torch.Tensor
    std: torch.Tensor
    dt: torch.Tensor
    ratio_norm: torch.Tensor | None = None


LossFn = Callable[[StepTerms, float], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class Loss:
    """A registered loss; `needs_old_mean`: the rollout keeps μ_old of trained steps for it."""

    fn: LossFn
    needs_old_mean: bool = False


LOSSES: dict[str, Loss] = {}


def register_loss(name: str, *, needs_old_mean: bool = False) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = Loss(fn, needs_old_mean)
        return fn
    return wrap


def clipped_surrogate(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, *, log_ratio: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate `max(−A·r, −A·clip(r, 1±ε))` per sample, all `[B]`
    (`log_ratio` replaces `logp_new − logp_old` when given).

    Returns the per-sample loss `[B]` and detached statistics: `ratio [B]`, `clipped [B]`
    (bool, |r − 1| > ε), `approx_kl [B]` (½(log r)²).
    """
    if log_ratio is None:
        log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    stats = {
        "ratio": ratio.detach(),
        "clipped": ((ratio - 1.0).abs() > clip_range).detach(),
        "approx_kl": 0.5 * log_ratio.detach() ** 2,
    }
    return loss, stats


@register_loss("clipped")
def clipped_loss(terms: StepTerms, clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate on `logp_new − logp_old` (Flow-GRPO, DanceGRPO, MixGRPO, G²RPO)."""
    return clipped_surrogate(terms.logp_new, terms.logp_old, terms.advantages, clip_range)


def ratio_norm_log_ratio(terms: StepTerms) -> torch.Tensor:
    """GRPO-Guard's RatioNorm, per sample: `std·(logp_new − logp_old + mean((μ_θ − μ_old)²)/(2·std²))`,
    which equals `mean(ε·(μ_θ − μ_old))`, so its mean over the step's noise is 0 whatever θ is;
    each sample's value depends on that sample only (the published code reduces over the batch)."""
    if terms.ratio_norm is None:
        raise ValueError("grpo_guard needs the RatioNorm term (the rollout's step means); "
                         "the update passes it when the loss declares needs_old_mean")
    return terms.std * (terms.logp_new - terms.logp_old + terms.ratio_norm)


@register_loss("grpo_guard", needs_old_mean=True)
def grpo_guard_loss(terms: StepTerms, clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-Guard: the clipped surrogate on the RatioNorm log-ratio, each step's loss divided by |dt|
    so steps of any size weigh alike (published clip 2e-6 to 4e-6)."""
    loss, stats = clipped_surrogate(terms.logp_new, terms.logp_old, terms.advantages, clip_range,
                                    log_ratio=ratio_norm_log_ratio(terms))
    return loss / terms.dt.abs(), stats
