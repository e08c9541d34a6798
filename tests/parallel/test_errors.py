"""Layout errors are reported before any model is built or any process group is started."""
from __future__ import annotations

import subprocess
import sys

import pytest

import megaflow.trainer.loop as loop
from megaflow.config import load_config
from megaflow.errors import ConfigError


@pytest.fixture
def nothing_built(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded or torch.distributed started before the layout was checked")

    monkeypatch.setattr(loop, "load_adapter", fail)
    monkeypatch.setattr(loop, "init_topology", fail)


def _cfg(tmp_path, model_dir, *overrides):
    return load_config("tiny", [f"output_dir={tmp_path}", f"model.path={model_dir}", *overrides])


def test_heads_not_divisible_by_sp(tmp_path, tiny_wan_dir, monkeypatch, nothing_built):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = _cfg(tmp_path, tiny_wan_dir, "parallel.zero_stage=3", "parallel.sp_size=8", "data.prompts_per_iteration=4")
    with pytest.raises(ConfigError, match=r"4 attention heads, which do not divide by parallel.sp_size=8"):
        loop.Trainer(cfg)


def test_world_not_divisible_by_sp(tmp_path, tiny_wan_dir, monkeypatch, nothing_built):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = _cfg(tmp_path, tiny_wan_dir, "parallel.zero_stage=3", "parallel.sp_size=2")
    with pytest.raises(ConfigError, match=r"world of 3 ranks does not divide by parallel.sp_size=2"):
        loop.Trainer(cfg)


def test_samples_must_spread_evenly_over_dp(tmp_path, tiny_wan_dir, monkeypatch, nothing_built):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = _cfg(tmp_path, tiny_wan_dir, "parallel.zero_stage=2", "train.micro_batch_size=4")
    with pytest.raises(ConfigError, match=r"2 micro-batches .* do not divide over dp=3"):
        loop.Trainer(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.zero_stage=1"], "parallel.zero_stage must be 0"),
    (["parallel.sp_size=2"], "runs under DeepSpeed"),
    (["rollout.gather_weights=true", "parallel.zero_stage=2"], "only applies to ZeRO-3"),
    (["parallel.hpz_partition_size=2", "parallel.zero_stage=2"], "ZeRO-3 option"),
    (["parallel.offload=true"], "needs parallel.zero_stage=3"),
    (["parallel.zero_stage=3", "parallel.ds_config=/nonexistent.json"], "does not exist"),
    (["train.grad_checkpointing=1.5"], r"in \[0, 1\]"),
    (["train.keep_checkpoints=-1"], "keep_checkpoints must be >= 0"),
])
def test_bad_parallel_keys(tmp_path, tiny_wan_dir, nothing_built, overrides, message):
    with pytest.raises(ConfigError, match=message):
        loop.Trainer(_cfg(tmp_path, tiny_wan_dir, *overrides))


def test_cli_reports_one_line_and_exit_2(tmp_path, tiny_wan_dir):
    env = {"WORLD_SIZE": "3", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "megaflow", "train", "--config", "tiny", "--output-dir", str(tmp_path),
                           "--set", f"model.path={tiny_wan_dir}", "--set", "parallel.zero_stage=3",
                           "--set", "parallel.sp_size=2"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("megaflow: error: the world of 3 ranks")
    assert not (tmp_path / "logs").exists()


def test_image_to_video_without_images_and_guidance_the_family_lacks(tmp_path, nothing_built):
    """Checked before any model loads: an I2V family needs prompt/image records, and only
    guidance-distilled families take sampling.embedded_guidance."""
    cfg = load_config("tiny_wan_i2v", [f"output_dir={tmp_path}", "data.prompt_file=null", "data.prompts=[a cat]"])
    with pytest.raises(ConfigError, match="image-to-video: set data.prompt_file to a JSONL"):
        loop.Trainer(cfg)
    with pytest.raises(ConfigError, match="no embedded guidance input"):
        loop.Trainer(load_config("tiny", [f"output_dir={tmp_path}", "sampling.embedded_guidance=3.5"]))
