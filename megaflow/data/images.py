"""Conditioning images of image-to-video prompts: read, resized to cover the video size and
centre-cropped (what diffusers' video processors do), as float `[3, H, W]` in [0, 1]."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from megaflow.errors import DataError


@lru_cache(maxsize=256)
def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """The image at `path` as `float32 [3, height, width]` in [0, 1]: scaled so it covers the size,
    then centre-cropped; `DataError` naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = max(width / img.width, height / img.height)
            size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC)
            left, top = (img.width - width) // 2, (img.height - height) // 2
            img = img.crop((left, top, left + width, top + height))
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read the conditioning image {path}: {exc}; give a PNG or JPEG file") from exc
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
