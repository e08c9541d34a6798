"""Rewards hosted on neural networks read from local folders (nothing is downloaded).

`LocalModelReward` holds what every such reward shares: the folder (checked, with a hint on how
to get it), the device and dtype, the batch size, and `to(device)` for offloading between
scorings. `FrameReward` adds the frame sampler for image models: a video's score is the mean of
its chosen frames' scores, and sub-scores are averaged the same way.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from megaflow.errors import ConfigError
from megaflow.rewards.frames import check_frames, sample_frames

__all__ = ["DTYPES", "FrameReward", "LocalModelReward", "reward_folder"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def reward_folder(name: str, path: str | Path | None, hint: str) -> Path:
    """`path` as an existing folder, else ConfigError naming the reward, the option and `hint`
    (how to get or convert the weights)."""
    if path is None or str(path) == "":
        raise ConfigError(f"reward {name!r} needs option path: a local folder with its weights ({hint})")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"reward {name!r}: path '{folder}' is not a folder; {hint}")
    return folder


class LocalModelReward:
    """A reward computed by networks in memory. Subclasses load their modules in `__init__` and
    list them in `modules()`."""

    name = "model"

    def __init__(self, *, device: str = "cpu", dtype: str = "float32", batch_size: int = 16) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"reward {self.name!r}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"reward {self.name!r}: batch_size must be a positive integer, got {batch_size!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"reward {self.name!r}: device {device!r} is not a torch device ({e})") from e
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"reward {self.name!r}: device {device!r} asked for, but CUDA is not available; "
                              "set reward.device: cpu (or same)")
        self.dtype = DTYPES[dtype]
        self.batch_size = batch_size

    def modules(self) -> list[nn.Module]:
        """The networks to move with `to`."""
        return []

    def to(self, device: str | torch.device) -> "LocalModelReward":
        """Move the networks to `device` (offloading between scorings); scoring uses `self.device`."""
        for module in self.modules():
            module.to(device)
        return self

    @property
    def model_device(self) -> torch.device:
        """Where the networks are now (`self.device` unless offloaded)."""
        for module in self.modules():
            for p in module.parameters():
                return p.device
        return self.device


class FrameReward(LocalModelReward, abc.ABC):
    """An image reward applied to the frames `frames` picks; subclasses implement `score_images`."""

    def __init__(self, *, frames: str = "uniform:4", **common: Any) -> None:
        super().__init__(**common)
        try:
            self.frames = check_frames(frames)
        except ConfigError as e:
            raise ConfigError(f"reward {self.name!r}: option {e}") from e

    @abc.abstractmethod
    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | Mapping[str, torch.Tensor]:
        """Scores `[N]` (or `{"score": [N], sub: [N]}`) of images `[N, 3, H, W]` in [0, 1] on
        `self.device`, each with its prompt."""

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: list[str],
                 metadata: list[dict[str, Any]]) -> torch.Tensor | dict[str, torch.Tensor]:
        """Mean over the chosen frames of each video `[B, F, 3, H, W]`: `[B]` (or a mapping of `[B]`)."""
        frames = sample_frames(videos, self.frames)
        b, k = frames.shape[:2]
        images = frames.flatten(0, 1)
        texts = [p for p in prompts for _ in range(k)]
        parts: list[Any] = []
        for i in range(0, images.shape[0], self.batch_size):
            parts.append(self.score_images(images[i:i + self.batch_size].to(self.device), texts[i:i + self.batch_size]))
        if isinstance(parts[0], Mapping):
            return {key: torch.cat([p[key] for p in parts]).float().view(b, k).mean(1) for key in parts[0]}
        return torch.cat(parts).float().view(b, k).mean(1)
