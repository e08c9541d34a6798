"""`megaflow train --config demo` (shortened): the shipped model, recipe and reward train end to end
and write what the README promises: metrics.jsonl, TensorBoard with sample videos, a checkpoint."""
import json

import pytest

from megaflow.config import load_config
from megaflow.trainer.loop import Trainer


@pytest.mark.slow
def test_shortened_demo_writes_metrics_videos_and_a_checkpoint(tmp_path):
    cfg = load_config("demo", [f"output_dir={tmp_path}", "train.iterations=2", "train.sample_every=2"])
    history = Trainer(cfg, show_progress=False).train()
    assert len(history) == 2
    for h in history:
        assert 0.0 <= h["reward/mean"] <= 1.0 and h["policy/ratio_max_dev"] == 0.0
        assert {"reward/shapes", "loss/policy", "optim/grad_norm"} <= set(h)
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2]
    events = list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert events and b"samples/videos" in events[0].read_bytes()
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    assert (ckpt / "transformer").is_dir()
