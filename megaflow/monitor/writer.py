"""Metrics to TensorBoard event files and `metrics.jsonl` (same names), sample videos as GIFs."""
from __future__ import annotations

import io
import json
import math
import os
from types import TracebackType
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary

__all__ = ["METRICS_FILE", "MetricsWriter", "video_grid_gif"]

METRICS_FILE = "metrics.jsonl"


def video_grid_gif(videos: torch.Tensor, fps: float = 4.0, pad: int = 2) -> tuple[bytes, int, int]:
    """Encode videos `[B, F, 3, H, W]` in [0, 1] side by side as one looping animated GIF.

    Returns `(gif_bytes, height, width)`; videos are separated by `pad` black pixels.
    Consecutive identical frames may be merged by the GIF encoder (their durations add up).
    """
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] != 3:
        shape = list(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos must be a tensor [B, F, 3, H, W], got {shape}")
    if videos.shape[0] == 0 or videos.shape[1] == 0:
        raise ValueError(f"videos must hold at least one frame, got shape {list(videos.shape)}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    x = videos.detach().to(device="cpu", dtype=torch.float32).nan_to_num(0.0).clamp(0, 1)
    frames = (x * 255.0).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    batch, num_frames, height, width, _ = frames.shape
    grid_w = batch * width + (batch - 1) * pad
    grid = np.zeros((num_frames, height, grid_w, 3), dtype=np.uint8)
    for b in range(batch):
        left = b * (width + pad)
        grid[:, :, left : left + width] = frames[b]
    images = [Image.fromarray(grid[f]) for f in range(num_frames)]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(1, round(1000.0 / fps)),
        loop=0,
    )
    return buffer.getvalue(), height, grid_w


class MetricsWriter:
    """Writes scalars to TensorBoard and `log_dir/metrics.jsonl`, plus sample videos and text.

    Each `log` call appends one JSON line `{"iteration": i, name: value, ...}` with the same
    names as the TensorBoard scalar tags, flushed at once so a killed run loses nothing already
    logged. Non-finite values (NaN, ±inf) are written as JSON `null` (TensorBoard keeps them
    as is). With `enabled=False` (non-zero ranks) every method is a no-op and no file is made.
    """

    def __init__(self, log_dir: str | os.PathLike[str], enabled: bool = True, *, purge_step: int | None = None) -> None:
        """Open (append to) the event and `metrics.jsonl` files in `log_dir` when `enabled`.

        `purge_step` (a resumed run: the checkpoint's iteration + 1): drop what an earlier run
        logged at steps >= `purge_step` (its iterations after the checkpoint, which are about to
        run again) from `metrics.jsonl`, and from TensorBoard's view of the event files."""
        self.log_dir = os.fspath(log_dir)
        self.enabled = bool(enabled)
        self._closed = False
        self._tb: Any = None
        self._jsonl: Any = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(self.log_dir, exist_ok=True)
        if purge_step is not None:
            self._truncate_jsonl(purge_step)
        self._tb = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)
        self._jsonl = open(self.metrics_path, "a", encoding="utf-8")

    def _truncate_jsonl(self, purge_step: int) -> None:
        """Rewrite `metrics.jsonl` without its rows of iteration >= `purge_step` (atomically)."""
        path = self.metrics_path
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                keep = json.loads(line)["iteration"] < purge_step
            except (ValueError, KeyError, TypeError):
                keep = False  # a line cut short by the crash
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) == len(lines):
            return
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    @property
    def metrics_path(self) -> str:
        """Path of the `metrics.jsonl` file."""
        return os.path.join(self.log_dir, METRICS_FILE)

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self._closed:
            raise RuntimeError(f"MetricsWriter({self.log_dir!r}) is closed")
        return True

    def log(self, iteration: int, scalars: Mapping[str, float]) -> None:
        """Write `scalars` (name -> number) at step `iteration` to TensorBoard and one JSON line."""
        if not self._active():
            return
        if "iteration" in scalars:
            raise ValueError("'iteration' is reserved in metrics.jsonl; rename that scalar")
        step = int(iteration)
        values: dict[str, float] = {}
        for name, value in scalars.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"scalar names must be non-empty strings, got {name!r}")
            try:
                values[name] = float(value.item() if isinstance(value, torch.Tensor) else value)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"scalar {name!r} is not a single number: {value!r}") from e
        for name, value in values.items():
            self._tb.add_scalar(name, value, global_step=step)
        record: dict[str, Any] = {"iteration": step}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        self._tb.flush()

    def log_video(self, tag: str, videos: torch.Tensor, iteration: int, fps: float = 4) -> None:
        """Write videos `[B, F, 3, H, W]` in [0, 1] as one side-by-side animated GIF image summary."""
        if not self._active():
            return
        gif, height, width = video_grid_gif(videos, fps=fps)
        image = Summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=gif
        )
        summary = Summary(value=[Summary.Value(tag=tag, image=image)])
        self._tb._get_file_writer().add_summary(summary, global_step=int(iteration))
        self._tb.flush()

    def log_text(self, tag: str, text: str, iteration: int) -> None:
        """Write `text` (e.g. the prompts of logged samples) as a TensorBoard text summary."""
        if not self._active():
            return
        self._tb.add_text(tag, text, global_step=int(iteration))
        self._tb.flush()

    def close(self) -> None:
        """Flush and close the files; further calls are errors, a second `close` is a no-op."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._jsonl.close()
        self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
