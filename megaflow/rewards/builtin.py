"""Built-in rewards: cheap, weight-free scores for tests, demos and sanity checks.

Every reward here takes videos float `[B, F, 3, H, W]` in [0, 1] and returns float32 `[B]`
on the videos' device (JPEG compressibility: on the CPU); higher is better.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from megaflow.errors import ConfigError
from megaflow.rewards.base import register_reward

__all__ = [
    "REC601",
    "BrightnessReward",
    "ColorReward",
    "CompressibilityReward",
    "ContrastReward",
    "SmoothnessReward",
    "luminance",
]

REC601 = (0.299, 0.587, 0.114)


def luminance(videos: torch.Tensor) -> torch.Tensor:
    """Rec.601 luma `0.299 R + 0.587 G + 0.114 B` of `[B, F, 3, H, W]`: float32 `[B, F, H, W]`."""
    weights = torch.tensor(REC601, dtype=torch.float32, device=videos.device)
    return torch.einsum("bfchw,c->bfhw", videos.to(torch.float32), weights)


def _unit_float(name: str, option: str, value: Any) -> float:
    """`value` as a float in [0, 1], or ConfigError naming the reward and option."""
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reward {name!r}: option {option} must be a number, got {value!r}") from e
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"reward {name!r}: option {option} must be in [0, 1], got {value!r}")
    return v


@register_reward("brightness")
class BrightnessReward:
    """Closeness of the mean Rec.601 luminance to `target`: `1 − |mean luma − target|`.

    Range [0, 1] (1 when the video's mean luminance equals `target`). Option: `target` in
    [0, 1], default 0.7.
    """

    def __init__(self, target: float = 0.7) -> None:
        """Score closeness of mean luminance to `target` in [0, 1]."""
        self.target = _unit_float("brightness", "target", target)

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        """Brightness scores of `videos` `[B, F, 3, H, W]`: float32 `[B]`."""
        mean_luma = luminance(videos).flatten(1).mean(dim=1)
        return 1.0 - (mean_luma - self.target).abs()


@register_reward("color")
class ColorReward:
    """Closeness of every pixel to an RGB `target`: `1 − mean_pixels ‖rgb − target‖₂ / √3`.

    Range [0, 1] (1 when every pixel is the target colour). Option: `target`, an RGB triple
    in [0, 1], default (1.0, 0.2, 0.2) (red).
    """

    def __init__(self, target: Sequence[float] = (1.0, 0.2, 0.2)) -> None:
        """Score closeness of pixels to the RGB `target` (three values in [0, 1])."""
        if isinstance(target, (str, bytes)) or not hasattr(target, "__len__") or len(target) != 3:
            raise ConfigError(
                f"reward 'color': option target must be an RGB triple in [0, 1], got {target!r}"
            )
        self.target = tuple(_unit_float("color", "target", t) for t in target)

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        """Colour scores of `videos` `[B, F, 3, H, W]`: float32 `[B]`."""
        target = torch.tensor(self.target, dtype=torch.float32, device=videos.device)
        diff = videos.to(torch.float32) - target.view(1, 1, 3, 1, 1)
        dist = diff.pow(2).sum(dim=2).sqrt()
        return 1.0 - dist.flatten(1).mean(dim=1) / math.sqrt(3.0)


@register_reward("smoothness")
class SmoothnessReward:
    """Temporal smoothness: `1 − mean |frame_{t+1} − frame_t|` over all pixels and channels.

    Range [0, 1] (1 for a static video; a single-frame video scores 1). No options.
    """

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        """Smoothness scores of `videos` `[B, F, 3, H, W]`: float32 `[B]`."""
        x = videos.to(torch.float32)
        if x.shape[1] < 2:
            return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        return 1.0 - (x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(dim=1)


@register_reward("compressibility")
class CompressibilityReward:
    """JPEG compressibility (as in DDPO / Flow-GRPO), normalised by the raw frame size.

    Each frame is quantised to uint8 and encoded with Pillow at `quality`; the score is minus
    the mean over frames of `JPEG bytes / (3·H·W)` (raw RGB bytes), i.e. minus the compressed
    fraction of the raw size. Range `(−∞, 0)`: at 256×256 and quality 95 about −0.008 for a
    flat frame and −0.4 for uniform noise; tiny frames score lower (down to about −1.2 at
    16×16) because the ~0.6 kB JPEG header dominates.
    DDPO's "−kilobytes" equals this score times `3·H·W / 1000`. Deterministic. Option:
    `quality` integer in [1, 100], default 95.
    """

    def __init__(self, quality: int = 95) -> None:
        """Score JPEG compressibility at Pillow `quality` (1..100)."""
        if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not (
            1 <= int(quality) <= 100
        ):
            raise ConfigError(
                f"reward 'compressibility': option quality must be an integer in [1, 100], "
                f"got {quality!r}"
            )
        self.quality = int(quality)

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        """Compressibility scores of `videos` `[B, F, 3, H, W]`: float32 `[B]` on the CPU."""
        frames = (
            (videos.detach().to(device="cpu", dtype=torch.float32).clamp(0, 1) * 255.0)
            .round()
            .to(torch.uint8)
            .permute(0, 1, 3, 4, 2)
            .numpy()
        )
        batch, num_frames, height, width, _ = frames.shape
        raw_bytes = 3 * height * width
        scores = np.empty(batch, dtype=np.float64)
        for b in range(batch):
            total = 0
            for f in range(num_frames):
                buffer = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(frames[b, f])).save(
                    buffer, format="JPEG", quality=self.quality
                )
                total += buffer.tell()
            scores[b] = -total / (num_frames * raw_bytes)
        return torch.from_numpy(scores).to(torch.float32)


@register_reward("contrast")
class ContrastReward:
    """Global contrast: standard deviation of Rec.601 luminance over all pixels and frames.

    Range [0, 0.5] (0 for a flat video, 0.5 for half black / half white). No options.
    """

    def __call__(
        self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        """Contrast scores of `videos` `[B, F, 3, H, W]`: float32 `[B]`."""
        return luminance(videos).flatten(1).std(dim=1, correction=0)
