"""MetricsWriter writes real TensorBoard event files and metrics.jsonl with the same contents."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import (
    IMAGES,
    SCALARS,
    TENSORS,
    EventAccumulator,
)

from megaflow.monitor import METRICS_FILE, MetricsWriter, progress, video_grid_gif

LOGGED = {
    0: {"reward/mean": 0.25, "loss": 1.5, "lr": 1e-4},
    1: {"reward/mean": 0.5, "loss": 1.25, "lr": 1e-4},
    2: {"reward/mean": 0.75, "loss": 1.0, "lr": 5e-5},
}


def load(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0, TENSORS: 0})
    acc.Reload()
    return acc


def moving_videos(batch: int, frames: int, h: int = 8, w: int = 10) -> torch.Tensor:
    """Videos whose frames all differ (a bright bar moving right): `[batch, frames, 3, h, w]`."""
    v = torch.zeros(batch, frames, 3, h, w)
    for f in range(frames):
        v[:, f, :, :, f % w] = 1.0
        v[:, f, 0] += 0.1 * f / frames
    return v.clamp(0, 1)


def test_scalars_match_in_tensorboard_and_jsonl(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for it, scalars in LOGGED.items():
            writer.log(it, scalars)
    acc = load(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"reward/mean", "loss", "lr"}
    for tag in ("reward/mean", "loss", "lr"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1, 2]
        assert [e.value for e in events] == pytest.approx([LOGGED[i][tag] for i in range(3)])
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3
    for line, (it, scalars) in zip(lines, LOGGED.items()):
        record = json.loads(line)
        assert record == {"iteration": it, **scalars}


def test_jsonl_is_flushed_per_line_and_nonfinite_is_null(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.log(3, {"a": float("nan"), "b": float("inf"), "c": torch.tensor(2.0)})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"iteration": 3, "a": None, "b": None, "c": 2.0}]
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.log(4, {"a": 1.0})
    acc = load(tmp_path)
    assert math.isnan(acc.Scalars("a")[0].value)


def test_bad_scalars_are_rejected(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.log(0, {"iteration": 1.0})
        with pytest.raises(ValueError, match="'v' is not a single number"):
            writer.log(0, {"v": torch.ones(3)})


def test_video_is_an_animated_gif_image(tmp_path):
    batch, frames, h, w = 3, 5, 8, 10
    with MetricsWriter(tmp_path) as writer:
        writer.log_video("samples/video", moving_videos(batch, frames, h, w), iteration=7, fps=5)
        writer.log_text("samples/prompts", "a red fox | a blue car | a cat", iteration=7)
    acc = load(tmp_path)
    assert acc.Tags()["images"] == ["samples/video"]
    (event,) = acc.Images("samples/video")
    assert event.step == 7
    gif = Image.open(io.BytesIO(event.encoded_image_string))
    assert gif.format == "GIF"
    assert gif.n_frames == frames
    assert gif.size == (batch * w + (batch - 1) * 2, h) == (event.width, event.height)
    assert gif.info["duration"] == 200
    assert "samples/prompts/text_summary" in acc.Tags()["tensors"]


def test_video_grid_pixels():
    videos = torch.zeros(2, 2, 3, 4, 4)
    videos[1, :, 0] = 1.0
    videos[:, 1, 2] = 1.0
    data, height, width = video_grid_gif(videos, fps=4, pad=2)
    assert (height, width) == (4, 10)
    gif = Image.open(io.BytesIO(data))
    gif.seek(1)
    frame = gif.convert("RGB")
    assert frame.getpixel((0, 0)) == (0, 0, 255)
    assert frame.getpixel((5, 0)) == (0, 0, 0)
    assert frame.getpixel((9, 0)) == (255, 0, 255)
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        video_grid_gif(torch.zeros(2, 3, 4, 4))


def test_disabled_writer_writes_nothing(tmp_path):
    log_dir = tmp_path / "rank1"
    with MetricsWriter(log_dir, enabled=False) as writer:
        writer.log(0, {"loss": 1.0})
        writer.log_video("v", moving_videos(1, 2), 0)
        writer.log_text("t", "hello", 0)
    assert not log_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_progress(monkeypatch):
    assert list(progress(range(4), "items", leave=False)) == [0, 1, 2, 3]
    with progress(10, "samples", unit="sample") as bar:
        bar.update(10)
        assert bar.n == 10 and bar.total == 10 and not bar.disable
    assert progress(range(2), "off", enabled=False).disable
    monkeypatch.setenv("RANK", "1")
    bar = progress(range(2), "rank1")
    assert bar.disable and list(bar) == [0, 1]


def test_purge_step_drops_what_a_stopped_run_logged_after_its_checkpoint(tmp_path):
    """A run killed after logging iterations 1–3 but checkpointing at 2 resumes with purge_step=3:
    iteration 3 is logged again and appears once, in metrics.jsonl and in TensorBoard."""
    with MetricsWriter(tmp_path) as w:
        for i in (1, 2, 3):
            w.log(i, {"reward/mean": float(i)})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"iteration": 4, "reward/me')  # a line cut short by the kill
    with MetricsWriter(tmp_path, purge_step=3) as w:
        for i in (3, 4):
            w.log(i, {"reward/mean": 10.0 * i})
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["iteration"], r["reward/mean"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    events = load(tmp_path).Scalars("reward/mean")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
