"""`megaflow train --config demo` (shortened): the shipped model, recipe and reward train end to end
and write what the README promises: metrics.jsonl, TensorBoard with sample videos, a checkpoint."""
import json

import pytest

from megaflow.config import load_config
from megaflow.demo.quality import METRICS
from megaflow.trainer.loop import Trainer


@pytest.mark.slow
def test_shortened_demo_writes_metrics_videos_and_a_checkpoint(tmp_path):
    cfg = load_config("demo", [f"output_dir={tmp_path}", "train.iterations=2", "train.sample_every=2"])
    history = Trainer(cfg, show_progress=False).train()
    assert len(history) == 2
    for h in history:
        assert 0.0 <= h["reward/mean"] <= 1.0 and h["policy/ratio_max_dev"] == 0.0
        assert {"reward/shapes/mean", "loss/policy", "optim/grad_norm"} <= set(h)
        # the verifier's attributes are reported beside the trained score, and recombine into it
        parts = [h[f"reward/shapes/{a}"] for a in ("color", "shape", "direction")]
        assert sum(parts) / 3 == pytest.approx(h["reward/shapes/mean"], abs=1e-6)
    # the quality metrics are logged with the sample videos (every train.sample_every iterations)
    assert not set(METRICS) & set(history[0]) and all(0.0 <= history[1][m] <= 1.0 for m in METRICS)
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2]
    events = list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert events and b"samples/videos" in events[0].read_bytes()
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    assert (ckpt / "transformer").is_dir()
