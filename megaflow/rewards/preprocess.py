"""Image preprocessing for reward models, in torch: it runs on the frames' device and is
differentiable, and training and evaluation use the same path.

It follows the CLIP/BLIP processors' recipe (resize, centre crop, normalise) with torch's
antialiased bicubic resize instead of PIL's, so values differ slightly from the reference
processors (each model's test states by how much on a real frame).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["ImageSettings", "preprocess_images", "read_image_settings"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSettings:
    """How a model wants its pixels: resize (`shortest_edge`, or both sides to `size` when
    `square`), centre crop to `crop [H, W]`, then `(x − mean) / std`."""

    size: int
    crop: tuple[int, int]
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    square: bool = False


def read_image_settings(folder: str | Path, default_size: int) -> ImageSettings:
    """The settings in `folder/preprocessor_config.json` (CLIP and BLIP processor layouts), or
    CLIP's at `default_size` when the folder has none."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return ImageSettings(default_size, (default_size, default_size))
    cfg = json.loads(path.read_text())
    size = cfg.get("size", default_size)
    square = False
    if isinstance(size, dict):
        if "shortest_edge" in size:
            edge = int(size["shortest_edge"])
        else:
            edge, square = int(size.get("height", default_size)), True
    else:
        edge = int(size)
    crop = cfg.get("crop_size", edge) if cfg.get("do_center_crop", True) else edge
    if isinstance(crop, dict):
        crop_hw = (int(crop.get("height", edge)), int(crop.get("width", edge)))
    else:
        crop_hw = (int(crop), int(crop))
    mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
    return ImageSettings(edge, crop_hw, mean, std, square)  # type: ignore[arg-type]


def preprocess_images(images: torch.Tensor, settings: ImageSettings) -> torch.Tensor:
    """Images `[N, 3, H, W]` in [0, 1] → normalised model input `[N, 3, crop_h, crop_w]` (float32,
    on the images' device)."""
    x = images.to(torch.float32)
    h, w = x.shape[-2:]
    if settings.square:
        new_h = new_w = settings.size
    else:
        # the short side becomes `size`; the long side is truncated, as the reference processors do
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = settings.size, int(settings.size * long / short)
        new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    ch, cw = settings.crop
    top, left = max(0, (new_h - ch) // 2), max(0, (new_w - cw) // 2)
    x = x[..., top:top + ch, left:left + cw].clamp(0.0, 1.0)
    mean = torch.tensor(settings.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(settings.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
