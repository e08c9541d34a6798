"""The sampler settings shared by the rollout and the update (one place, so both agree)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class SamplerSettings:
    """`sigmas [N+1]` float32 grid, SDE kind and noise level, true-CFG scale, embedded guidance
    (None: the family takes none), precision, kernel backend."""

    sigmas: torch.Tensor
    sde_kind: str
    noise_level: float
    guidance_scale: float
    precision: str = "fp32"
    logprob_backend: str = "auto"
    embedded_guidance: float | None = None

    @property
    def sigma_max(self) -> float:
        """The grid's σ_1, which flow_grpo uses in place of σ = 1 in σ/(1−σ)."""
        return float(self.sigmas[1])

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """bf16 autocast around transformer calls when `precision == "bf16"`."""
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            yield
