"""The tiny model folders: deterministic, complete, cached atomically, runnable by their own pipelines."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPTokenizer

from megaflow.demo.world import parse_prompt
from megaflow.errors import ConfigError
from megaflow.models import tiny
from megaflow.models.tiny import (
    TINY_FAMILIES, TINY_HUNYUAN_PROMPT_TEMPLATE, TINY_I2V_PROMPTS, TINY_MAX_SEQUENCE_LENGTH, TINY_NAMES, TINY_SIZES,
    TINY_WAN_I2V_MAX_SEQUENCE_LENGTH, TINY_WAN_NAME, build_tiny_pipeline, tiny_model_dir, write_tiny_wan,
)

PIPELINES: dict[str, str] = {
    "wan": "WanPipeline",
    "wan_i2v": "WanImageToVideoPipeline",
    "hunyuan": "HunyuanVideoPipeline",
    "skyreels_i2v": "HunyuanSkyreelsImageToVideoPipeline",
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
}
PROMPT = "a red circle moving right"


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding every family's folder, each written once by `tiny_model_dir`."""
    root = tmp_path_factory.mktemp("tiny-cache")
    for family in TINY_FAMILIES:
        tiny_model_dir(family, cache_root=root)
    return root


@pytest.fixture(scope="module")
def pipelines(tiny_cache: Path) -> dict[str, Any]:
    """Each family's folder loaded by its own pipeline class (`from_pretrained`)."""
    loaded = {}
    for family, name in PIPELINES.items():
        pipe = getattr(diffusers, name).from_pretrained(tiny_cache / TINY_NAMES[family])
        pipe.set_progress_bar_config(disable=True)
        loaded[family] = pipe
    return loaded


def conditioning_image() -> Image.Image:
    line = json.loads(TINY_I2V_PROMPTS.read_text().splitlines()[0])
    return Image.open(TINY_I2V_PROMPTS.parent / line["image"]).convert("RGB")


@torch.no_grad()
def wan_prompt_embeds(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """`[B, 512, 32]` UMT5 embeddings zeroed past each prompt, as Wan pipelines encode (minus ftfy)."""
    length = pipe.tokenizer.model_max_length
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids, tok.attention_mask).last_hidden_state * tok.attention_mask[..., None]


def generate(family: str, pipe: Any, seed: int) -> torch.Tensor:
    """2 denoising steps at the family's tiny size, with CFG or embedded guidance as the family uses:
    videos `[1, F, 3, H, W]`, images `[1, 3, H, W]` in [0, 1]."""
    size = {("num_frames" if k == "frames" else k): v for k, v in TINY_SIZES[family].items()}
    generator = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = dict(num_inference_steps=2, output_type="pt", generator=generator, **size)
    if family == "wan":
        kwargs.update(prompt=PROMPT, negative_prompt="blurry", guidance_scale=4.0, max_sequence_length=16)
    elif family == "wan_i2v":
        kwargs.update(image=conditioning_image(), prompt_embeds=wan_prompt_embeds(pipe, [PROMPT]),
                      negative_prompt_embeds=wan_prompt_embeds(pipe, [""]), guidance_scale=4.0)
    elif family == "hunyuan":
        kwargs.update(prompt=PROMPT, prompt_template=TINY_HUNYUAN_PROMPT_TEMPLATE, max_sequence_length=16,
                      guidance_scale=6.0)
    elif family == "skyreels_i2v":
        kwargs.update(image=conditioning_image(), prompt=PROMPT, negative_prompt="blurry", true_cfg_scale=5.0,
                      guidance_scale=1.0, prompt_template=TINY_HUNYUAN_PROMPT_TEMPLATE, max_sequence_length=16)
    else:
        kwargs.update(prompt=PROMPT, max_sequence_length=16, guidance_scale=3.5 if family == "flux" else 4.5)
    out = pipe(**kwargs)
    return out.images if family in ("flux", "sd3") else out.frames


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pipeline_generates_deterministically(family: str, pipelines: dict[str, Any]) -> None:
    pipe = pipelines[family]
    assert type(pipe).__name__ == PIPELINES[family]
    size = TINY_SIZES[family]
    video = generate(family, pipe, seed=0)
    expected = ((1, size["frames"], 3, size["height"], size["width"]) if "frames" in size
                else (1, 3, size["height"], size["width"]))
    assert video.shape == expected
    assert torch.isfinite(video).all() and video.min() >= 0 and video.max() <= 1 and video.std() > 0
    assert torch.equal(generate(family, pipe, seed=0), video)
    assert not torch.equal(generate(family, pipe, seed=1), video)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_build_tiny_pipeline_is_deterministic(family: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        pipe = build_tiny_pipeline(family, seed)
        return {f"{name}.{k}": v for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
                for k, v in module.state_dict().items()}

    first, again, other = weights(0), weights(0), weights(1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    random = [k for k in first if k.startswith("transformer.") and k.endswith("weight") and first[k].std() > 0]
    assert random and all(not torch.equal(first[k], other[k]) for k in random)


def test_folders_are_small_and_complete(tiny_cache: Path) -> None:
    assert sorted(p.name for p in tiny_cache.iterdir()) == sorted(TINY_NAMES.values())
    assert TINY_WAN_NAME == "tiny-wan-v1"
    for family, name in TINY_NAMES.items():
        folder = tiny_cache / name
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == PIPELINES[family]
        components = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
        assert components == {p.name for p in folder.iterdir() if p.is_dir()}
        assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 2_000_000


def test_tiny_model_dir_reuses_every_family(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamps = {name: (tiny_cache / name / "model_index.json").stat().st_mtime_ns for name in TINY_NAMES.values()}

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached folder must not be rewritten")

    monkeypatch.setattr(tiny, "write_tiny_pipeline", fail)
    for family, name in TINY_NAMES.items():
        assert tiny_model_dir(family, cache_root=tiny_cache) == tiny_cache / name
        assert (tiny_cache / name / "model_index.json").stat().st_mtime_ns == stamps[name]
    with pytest.raises(ConfigError, match="wan_i2v"):
        tiny_model_dir("wan-i2v", cache_root=tiny_cache)


def test_wan_i2v_pads_text_to_512_and_uses_the_image(pipelines: dict[str, Any]) -> None:
    pipe = pipelines["wan_i2v"]
    assert TINY_WAN_I2V_MAX_SEQUENCE_LENGTH == 512 == pipe.tokenizer.model_max_length
    tok = pipe.tokenizer([PROMPT, "a cat"], padding="max_length", truncation=True, return_tensors="pt")
    assert tok.input_ids.shape == (2, 512)
    assert tok.attention_mask.sum(1).tolist() == [len(pipe.tokenizer(PROMPT).input_ids), 3]
    config, vae = pipe.transformer.config, pipe.vae.config
    assert config.in_channels == 2 * config.out_channels + vae.scale_factor_temporal == 10
    assert config.image_dim == pipe.image_encoder.config.hidden_size and config.added_kv_proj_dim == 32
    # the 512-token text is what lets diffusers split the context: the image embeds must reach the output
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 10, 3, 8, 8, generator=g), torch.randn(1, 512, 32, generator=g)
    image_a, image_b = torch.randn(2, 1, 17, 16, generator=g)
    with torch.no_grad():
        out_a, out_b = (pipe.transformer(x, torch.tensor([500]), text, encoder_hidden_states_image=image).sample
                        for image in (image_a, image_b))
    assert out_a.shape == (1, 4, 3, 8, 8) and (out_a - out_b).abs().max() > 1e-4


def test_hunyuan_mask_is_not_empty_with_crop_start_0(pipelines: dict[str, Any]) -> None:
    for family in ("hunyuan", "skyreels_i2v"):
        pipe = pipelines[family]
        embeds, pooled, mask = pipe.encode_prompt([PROMPT, "a cat"], prompt_template=TINY_HUNYUAN_PROMPT_TEMPLATE,
                                                  max_sequence_length=16)
        lengths = [len(pipe.tokenizer(p).input_ids) for p in (PROMPT, "a cat")]
        assert embeds.shape == (2, 16, 16) and pooled.shape == (2, 8) and mask.sum(1).tolist() == lengths
        assert pipe.text_encoder.config.num_hidden_layers >= 3 and pipe.transformer.config.guidance_embeds
    skyreels, hunyuan = pipelines["skyreels_i2v"].transformer.config, pipelines["hunyuan"].transformer.config
    assert skyreels.in_channels == 2 * skyreels.out_channels and hunyuan.in_channels == hunyuan.out_channels


def test_clip_tokenizer(tiny_cache: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(tiny_cache / TINY_NAMES["sd3"] / "tokenizer")
    assert tok.model_max_length == 77 and len(tok) < 400
    assert tok.eos_token_id == len(tok) - 1 == tok.pad_token_id and tok.bos_token_id == len(tok) - 2
    ids = tok("A red circle, moving right!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[1:-1]
    assert len(ids) < len("a red circle, moving right!")
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle , moving right !"
    assert tok("a cat", padding="max_length", max_length=77).input_ids[3:] == [tok.eos_token_id] * 74
    for folder, encoder in (("hunyuan", "text_encoder_2"), ("flux", "text_encoder"), ("sd3", "text_encoder_2")):
        config = json.loads((tiny_cache / TINY_NAMES[folder] / encoder / "config.json").read_text())
        assert (config["eos_token_id"], config["max_position_embeddings"]) == (tok.eos_token_id, 77)


def test_sd3_has_a_dual_attention_block(pipelines: dict[str, Any]) -> None:
    transformer = pipelines["sd3"].transformer
    assert [block.use_dual_attention for block in transformer.transformer_blocks] == [True, False]
    assert transformer.config.pooled_projection_dim == sum(
        pipelines["sd3"].components[c].config.projection_dim for c in ("text_encoder", "text_encoder_2"))


def test_i2v_prompts_and_images() -> None:
    lines = [json.loads(line) for line in TINY_I2V_PROMPTS.read_text().splitlines()]
    assert len(lines) == 3 and all(set(line) == {"prompt", "image"} for line in lines)
    pixels = set()
    for line in lines:
        parse_prompt(line["prompt"])
        with Image.open(TINY_I2V_PROMPTS.parent / line["image"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
            pixels.add(image.tobytes())
    assert len(pixels) == 3


def test_write_tiny_wan_is_deterministic(tiny_wan_dir: Path, tmp_path: Path) -> None:
    again = files(write_tiny_wan(tmp_path / "again", seed=0))
    first = files(tiny_wan_dir)
    assert again.keys() == first.keys()
    assert {k for k in first if k.endswith(".safetensors")} == {
        f"{c}/{n}" for c, n in [("transformer", "diffusion_pytorch_model.safetensors"),
                                ("vae", "diffusion_pytorch_model.safetensors"),
                                ("text_encoder", "model.safetensors")]
    }
    assert again == first
    other = files(write_tiny_wan(tmp_path / "other", seed=1))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights] != first[weights]
    assert other["tokenizer/tokenizer.json"] == first["tokenizer/tokenizer.json"]


def test_tiny_tokenizer(tiny_wan_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_wan_dir / "tokenizer")
    assert tok.model_max_length == TINY_MAX_SEQUENCE_LENGTH
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("A red ball rolling").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red ball rolling"
    batch = tok(["a cat", "zebra-like quokka"], padding="max_length", max_length=8, truncation=True,
                return_tensors="pt")
    assert batch.input_ids.shape == (2, 8) and batch.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_tiny_model_dir_writes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGAFLOW_CACHE", str(tmp_path / "env-cache"))
    folder = tiny_model_dir()
    assert folder == tmp_path / "env-cache" / TINY_WAN_NAME
    assert all((folder / c).is_dir() for c in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    stamp = (folder / "model_index.json").stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached folder must not be rewritten")

    monkeypatch.setattr(tiny, "write_tiny_pipeline", fail)
    assert tiny_model_dir() == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == [TINY_WAN_NAME]


def test_tiny_model_dir_loses_race_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishing first: its folder is kept, ours is discarded, no temp dir left."""
    real_write = tiny.write_tiny_pipeline
    final = tmp_path / TINY_WAN_NAME

    def racing_write(family: str, folder: Path, seed: int = 0) -> Path:
        real_write(family, final)
        (final / "winner").write_text("other process")
        return real_write(family, folder, seed)

    monkeypatch.setattr(tiny, "write_tiny_pipeline", racing_write)
    assert tiny_model_dir(cache_root=tmp_path) == final
    assert (final / "winner").read_text() == "other process"
    assert [p.name for p in tmp_path.iterdir()] == [TINY_WAN_NAME]


def test_tiny_model_dir_under_distributed_writes_in_a_subprocess(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.distributed the folder is written by `python -c CODE WRITER FAMILY FOLDER` (run here in-process)."""
    calls = []

    def run(argv: list[str], **kwargs: object) -> None:
        assert argv[:2] == [sys.executable, "-c"]
        calls.append(argv[3:-1])
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # a fresh process
        monkeypatch.setattr(sys, "argv", ["-c", *argv[3:]])
        exec(argv[2], {})

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(tiny.subprocess, "run", run)
    folder = tiny_model_dir("flux", cache_root=tmp_path)
    assert calls == [["megaflow.models.tiny:write_tiny_pipeline", "flux"]] and folder == tmp_path / TINY_NAMES["flux"]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
