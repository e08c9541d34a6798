"""Learned rewards in a training run: `megaflow train --config tiny` with PickScore and VideoAlign
read from their (tiny) folders, scored per chunk beside the rollout, sub-scores in the metrics."""
import json

import pytest

from megaflow.cli import main


@pytest.mark.slow
def test_tiny_trains_on_pickscore_and_videoalign_vq(tmp_path, tiny_wan_dir, tiny_pickscore_dir, tiny_videoalign_dirs):
    path, base = tiny_videoalign_dirs["published"]
    code = main(["train", "--config", "tiny", "--no-progress", "--output-dir", str(tmp_path),
                 "--set", f"model.path={tiny_wan_dir}", "--set", "train.iterations=1",
                 "--set", "reward.components={pickscore: 1, videoalign_vq: 0.5}",
                 "--set", f"reward.options.pickscore.path={tiny_pickscore_dir}",
                 "--set", "reward.options.pickscore.frames=uniform:2",
                 "--set", f"reward.options.videoalign_vq.path={path}",
                 "--set", f"reward.options.videoalign_vq.base={base}",
                 "--set", "reward.options.videoalign_vq.min_pixels=3136"])
    assert code == 0
    (line,) = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    # VideoAlign's three sub-scores are reported; the trained one is VQ
    assert {"reward/videoalign_vq/vq", "reward/videoalign_vq/mq", "reward/videoalign_vq/ta"} <= set(line)
    assert line["reward/videoalign_vq/vq"] == pytest.approx(line["reward/videoalign_vq/mean"], abs=1e-6)
    # the trained total is the weighted sum of the components
    assert line["reward/mean"] == pytest.approx(
        line["reward/pickscore/mean"] + 0.5 * line["reward/videoalign_vq/mean"], abs=1e-5)
    assert line["reward/pickscore/std"] > 0 and line["optim/grad_norm"] > 0
    assert 0 <= line["time/reward_exposed_s"] <= line["time/reward_s"] + 1e-3
