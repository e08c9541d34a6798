"""Policy losses (ALGORITHMS.md §5) as small pure functions of per-sample tensors."""
from __future__ import annotations

import torch


def clipped_surrogate(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate `max(−A·r, −A·clip(r, 1±ε))` per sample, all `[B]`.

    Returns the per-sample loss `[B]` and detached statistics: `ratio [B]`, `clipped [B]`
    (bool, |r − 1| > ε), `approx_kl [B]` (½(log r)²).
    """
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
