"""`megaflow eval`: ODE scoring of held-out prompts, the table / JSON / image, and its errors."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from megaflow.config import load_config
from megaflow.demo.evaluate import evaluate, find_checkpoint, labelled_checkpoints, load_model, sample_videos
from megaflow.demo.quality import METRICS
from megaflow.demo.world import split_prompts
from megaflow.errors import ConfigError, ModelLoadError
from megaflow.trainer.loop import Trainer


def _megaflow(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "megaflow", *args], capture_output=True, text=True, timeout=timeout)


def test_eval_of_the_base_model_prints_a_table_and_writes_json_and_frames(tmp_path):
    res = _megaflow("eval", "--config", "demo", "--samples", "1", "--json", str(tmp_path / "e.json"),
                    "--image", str(tmp_path / "e.png"), "--no-progress")
    assert res.returncode == 0, res.stderr
    for row in ("overall", "shapes/color", "shapes/shape", "shapes/direction", *METRICS):
        assert row in res.stdout
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["prompts"] == split_prompts(0)[1]
    truth, base = report["results"]
    assert truth["model"] == "truth" and truth["weights"] == "renderer"
    assert base["model"] == "base" and 0.0 <= base["overall"] <= 1.0
    assert set(base["per_prompt"]) == set(split_prompts(0)[1])
    width, height = Image.open(tmp_path / "e.png").size
    assert width > 200 and height > 100


def test_eval_sampling_is_deterministic_and_uses_the_ode():
    cfg = load_config("demo")
    adapter = load_model(cfg, None, torch.device("cpu"))
    prompts = split_prompts(0)[1][:2]
    a = sample_videos(adapter, cfg, prompts, 2, seed=5, show_progress=False)
    b = sample_videos(adapter, cfg, prompts, 2, seed=5, show_progress=False, batch=1)
    assert a.shape == (4, cfg.video.frames, 3, cfg.video.height, cfg.video.width)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert not torch.allclose(a[0], a[1])


PROMPT = split_prompts(0)[1][0]


@pytest.mark.slow
def test_eval_of_a_checkpoint_compares_base_and_trained(tmp_path):
    cfg = load_config("demo", [f"output_dir={tmp_path / 'run'}", "train.iterations=1", "train.sample_every=0",
                               "train.lr=3e-3"])
    Trainer(cfg, show_progress=False).train()
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt.parent.name == "checkpoints"
    truth, base, trained = evaluate(cfg, tmp_path / "run", samples=1, show_progress=False)
    assert (truth.label, base.label, trained.label) == ("truth", "base", "trained")
    # the renderer's clips are the reference every score is calibrated on
    assert truth.overall >= 0.95 and all(truth.components[m] >= 0.95 for m in METRICS)
    assert set(METRICS) <= set(base.components) and set(METRICS) <= set(trained.per_prompt_components[PROMPT])
    assert not torch.equal(base.videos, trained.videos)  # the checkpoint's weights were loaded
    res = _megaflow("eval", "--config", "demo", "--checkpoint", str(ckpt), "--samples", "1",
                    "--image", str(tmp_path / "cmp.png"), "--json", str(tmp_path / "cmp.json"), "--no-progress")
    assert res.returncode == 0, res.stderr
    results = json.loads((tmp_path / "cmp.json").read_text())["results"]
    assert [r["model"] for r in results] == ["truth", "base", "trained"]
    assert set(METRICS) <= set(results[2]["components"]) and PROMPT in results[2]["per_prompt_components"]


def test_missing_or_empty_checkpoint_is_a_one_line_error(tmp_path):
    res = _megaflow("eval", "--config", "demo", "--checkpoint", str(tmp_path / "nope"))
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no complete megaflow checkpoint"):
        find_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "checkpoints" / "iteration_000001").mkdir(parents=True)  # a write that never finished
    with pytest.raises(ModelLoadError, match="holds no complete megaflow checkpoint"):
        find_checkpoint(tmp_path / "empty")


def test_checkpoints_are_labelled_columns(tmp_path):
    run = tmp_path / "runs" / "demo_unregularized" / "checkpoints" / "iteration_000100"
    assert labelled_checkpoints(str(run)) == [("trained", run)]
    assert labelled_checkpoints([str(run), f"default={tmp_path / 'x'}"]) == [
        ("demo_unregularized", run), ("default", tmp_path / "x")]
    with pytest.raises(ConfigError, match="distinct and not 'truth' or 'base'"):
        labelled_checkpoints([f"base={run}"])
