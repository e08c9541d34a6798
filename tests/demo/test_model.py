"""The shipped demo model: a real diffusers folder, small, reproducibly pretrained, and usable."""
import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline
from safetensors.torch import load_file

import megaflow.demo
from megaflow.config import load_config
from megaflow.demo import base_model_dir
from megaflow.demo.evaluate import evaluate
from megaflow.demo.pretrain import PretrainSettings, pretrain
from megaflow.demo.world import FRAMES, HEIGHT, WIDTH, sample_dataset
from megaflow.errors import ModelLoadError
from megaflow.models import resolve_model_path

ALLOWED_SUFFIXES = {".safetensors", ".json"}


def test_wan_pipeline_generates_a_video_from_the_shipped_folder():
    pipe = WanPipeline.from_pretrained(base_model_dir())
    out = pipe(prompt="a red circle moving left", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
               num_inference_steps=4, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    video = out.frames[0]
    assert tuple(video.shape) == (FRAMES, 3, HEIGHT, WIDTH)
    assert torch.isfinite(video).all() and float(video.std()) > 0.01


def test_base_model_follows_its_prompts_partly_and_leaves_room_to_learn():
    """The issue's bar for the base model: a held-out ODE score between 0.2 and 0.75 (pretraining on
    noisy captions makes it a mixture that GRPO sharpens)."""
    truth, base = evaluate(load_config("demo"), samples=4, show_progress=False)
    assert truth.label == "truth" and 0.2 <= base.overall <= 0.75, base.components
    assert base.components["shapes/color"] > 0.25  # above the 1-in-4 of ignoring the prompt's colour


def test_vae_reconstructs_late_frames_as_well_as_early_ones():
    """The VAE trains on all frames: a VAE fitted on the first 5 decoded frames 6-9 with 20x the error."""
    vae = AutoencoderKLWan.from_pretrained(base_model_dir(), subfolder="vae")
    clips, _ = sample_dataset(8, seed=99)
    with torch.no_grad():
        x = clips.permute(0, 2, 1, 3, 4) * 2 - 1
        recon = (vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    mse = (recon.permute(0, 2, 1, 3, 4) - clips).pow(2).mean(dim=(0, 2, 3, 4))  # [F]
    assert float(mse.max()) < 0.005 and float(mse[5:].mean()) < 2 * float(mse[:5].mean()), mse


def test_shipped_folder_is_small_and_commit_friendly():
    folder = base_model_dir()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert {p.suffix for p in files} <= ALLOWED_SUFFIXES, sorted({p.suffix for p in files})
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in folder.iterdir()}
    assert resolve_model_path("demo") == folder


def test_missing_model_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(megaflow.demo, "BASE_MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match="pretrain-demo"):
        megaflow.demo.base_model_dir()


def test_pretraining_is_seeded_and_reproducible(tmp_path):
    settings = dict(clips=8, vae_steps=2, vae_batch=2, dit_steps=3, dit_batch=4)
    a = pretrain(tmp_path / "a", PretrainSettings(seed=7, **settings), show_progress=False)
    b = pretrain(tmp_path / "b", PretrainSettings(seed=7, **settings), show_progress=False)
    assert a["vae_mse"] == b["vae_mse"] and a["transformer_loss"] == b["transformer_loss"]
    for part in ("transformer", "vae"):
        (fa,) = (tmp_path / "a" / part).glob("*.safetensors")
        ta, tb = load_file(fa), load_file(tmp_path / "b" / part / fa.name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    record = json.loads((tmp_path / "a" / "megaflow_demo.json").read_text())
    assert record["settings"]["seed"] == 7
    WanPipeline.from_pretrained(tmp_path / "a")


def test_pretrain_demo_command_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "model"
    res = subprocess.run([sys.executable, "-m", "megaflow", "pretrain-demo", "--output", str(out), "--seed", "1",
                          "--vae-steps", "1", "--dit-steps", "1", "--clips", "4", "--caption-noise", "0.25",
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (out / "model_index.json").is_file() and "wrote" in res.stdout
    assert json.loads((out / "megaflow_demo.json").read_text())["settings"]["caption_noise"] == 0.25
    bad = subprocess.run([sys.executable, "-m", "megaflow", "pretrain-demo", "--output", str(out), "--dit-steps", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--dit-steps" in bad.stderr
    noisy = subprocess.run([sys.executable, "-m", "megaflow", "pretrain-demo", "--output", str(out), "--caption-noise",
                            "1.5"], capture_output=True, text=True, timeout=120)
    assert noisy.returncode == 2 and "--caption-noise must be in [0, 1]" in noisy.stderr
