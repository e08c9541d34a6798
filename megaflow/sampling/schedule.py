"""Sigma grids of flow-matching samplers (ALGORITHMS.md §1)."""
from __future__ import annotations

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Apply the resolution shift `s·σ / (1 + (s−1)·σ)` elementwise. The shift fixes σ = 1
    exactly: float32 can miss it by one ulp (shift 1.5831 gives 0.99999994), which would make the
    flow_grpo step's σ/(1−σ) at pure noise about 1.7e7 instead of using the grid's σ_1."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    shifted = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.where(sigmas == 1, sigmas, shifted)


def flow_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The denoising grid `σ_0 = 1 > … > σ_N = 0`, shifted: float32 `[num_steps + 1]`.

    The unshifted grid is rounded to float32 and shifted in float32, which is what diffusers'
    `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)` does, so the grids agree bit for bit.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).to(torch.float32)
    return shift_sigmas(sigmas, shift)


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The model's timestep input `t = 1000·σ` (same shape as `sigmas`)."""
    return sigmas * 1000.0
