"""Which frames of a video an image reward scores: `first | middle | last | uniform:K | all`.

Image rewards (HPS, PickScore, CLIP, aesthetic, ImageReward) score each chosen frame and the
video's score is the mean over them.
"""
from __future__ import annotations

import torch

from megaflow.errors import ConfigError

__all__ = ["check_frames", "frame_indices", "sample_frames"]

_NAMED = ("first", "middle", "last", "all")


def check_frames(spec: str) -> str:
    """`spec` if it is a valid frame choice, else ConfigError naming the valid forms."""
    if isinstance(spec, str):
        if spec in _NAMED:
            return spec
        if spec.startswith("uniform:"):
            count = spec.split(":", 1)[1]
            if count.isdigit() and int(count) >= 1:
                return spec
    raise ConfigError(f"frames must be one of first, middle, last, all or uniform:K (K >= 1 frames spread evenly "
                      f"from the first to the last), got {spec!r}")


def frame_indices(spec: str, num_frames: int) -> list[int]:
    """The frame indices `spec` picks from a video of `num_frames` frames (sorted, distinct)."""
    spec = check_frames(spec)
    last = num_frames - 1
    if spec == "first":
        return [0]
    if spec == "middle":
        return [last // 2]
    if spec == "last":
        return [last]
    if spec == "all":
        return list(range(num_frames))
    count = min(int(spec.split(":", 1)[1]), num_frames)
    if count == 1:
        return [last // 2]
    return sorted({round(i * last / (count - 1)) for i in range(count)})


def sample_frames(videos: torch.Tensor, spec: str) -> torch.Tensor:
    """The frames `spec` picks from each of `videos` `[B, F, 3, H, W]`: `[B, K, 3, H, W]`."""
    return videos[:, frame_indices(spec, videos.shape[1])]
