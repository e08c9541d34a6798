"""WanI2VAdapter against the real diffusers WanImageToVideoPipeline on the tiny Wan I2V folder, and
the tiny I2V recipe through the trainer.

diffusers' Wan I2V pipeline cleans prompts with `ftfy` unconditionally (a NameError where it is not
installed, as here), so the generation calls pass precomputed `prompt_embeds` /
`negative_prompt_embeds` (the adapter's own, which `test_encode_prompts_matches_pipeline` checks
against the pipeline's `encode_prompt`)."""
from __future__ import annotations

import json
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from diffusers.pipelines.wan import pipeline_wan_i2v
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from megaflow.config import load_config
from megaflow.data.images import load_image
from megaflow.errors import ModelLoadError
from megaflow.models import ADAPTERS, Conditioning, get_adapter, resolve_model_path
from megaflow.models.base import LORA_WEIGHTS_FILE, TextConditioning
from megaflow.models.tiny import TINY_I2V_PROMPTS, TINY_SIZES, build_tiny_pipeline, tiny_model_dir
from megaflow.models.wan_i2v import IMAGE_CONDITION, IMAGE_EMBEDS, WanI2VAdapter, to_pil
from megaflow.rewards import RewardScores

PROMPTS = [
    "a red ball",
    "  a blue cube spinning slowly\n on a   white table &amp; a cat ",
    "a cinematic shot of a city skyline at dawn with clouds drifting over a green valley and stars",
    "",
]
SIZE = TINY_SIZES["wan_i2v"]
FRAMES, HEIGHT, WIDTH = SIZE["frames"], SIZE["height"], SIZE["width"]
RECORDS = [json.loads(line) for line in TINY_I2V_PROMPTS.read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A megaflow cache holding the tiny Wan I2V folder (what `model.path=tiny` resolves to)."""
    root = tmp_path_factory.mktemp("wan-i2v-cache")
    tiny_model_dir("wan_i2v", cache_root=root)
    return root


@pytest.fixture(scope="module")
def folder(cache_root: Path) -> Path:
    return tiny_model_dir("wan_i2v", cache_root=cache_root)


def load(path: Path) -> WanI2VAdapter:
    return WanI2VAdapter.from_pretrained(path, dtype=torch.float32, device="cpu")


def load_pipe(path: Path, **components: Any) -> WanImageToVideoPipeline:
    pipe = WanImageToVideoPipeline.from_pretrained(path, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapter(folder: Path) -> WanI2VAdapter:
    """A base adapter for tests that do not modify it."""
    return load(folder)


@pytest.fixture(scope="module")
def pipe(folder: Path) -> WanImageToVideoPipeline:
    return load_pipe(folder)


def images(n: int = 3) -> torch.Tensor:
    """The tiny recipe's conditioning images at the video size, as the trainer loads them `[n, 3, H, W]`."""
    return torch.stack([load_image(str(TINY_I2V_PROMPTS.parent / r["image"]), HEIGHT, WIDTH) for r in RECORDS[:n]])


def generate(pipe: WanImageToVideoPipeline, adapter: WanI2VAdapter, image: torch.Tensor, seed: int = 0,
             **kwargs: Any) -> torch.Tensor:
    """3 denoising steps (CFG 5 unless given) from the image `[3, H, W]` (as a PIL image, what users pass):
    video `[1, F, 3, H, W]` in [0, 1], or latents with output_type='latent'."""
    kwargs.setdefault("output_type", "pt")
    kwargs.setdefault("guidance_scale", 5.0)
    return pipe(
        image=to_pil(image), prompt_embeds=adapter.encode_prompts(["a red circle moving right"]).embeds,
        negative_prompt_embeds=adapter.encode_prompts(["blurry"]).embeds, num_frames=FRAMES, height=HEIGHT,
        width=WIDTH, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), **kwargs,
    ).frames


def random_inputs(adapter: WanI2VAdapter, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Latents `[B, 4, 3, 8, 8]`, sigmas `[B]` and CFG conditioning with the recipe's images."""
    g = torch.Generator().manual_seed(seed)
    shape = adapter.latent_shape(FRAMES, HEIGHT, WIDTH)
    x = torch.randn(batch, *shape, generator=g)
    sigma = torch.rand(batch, generator=g)
    text = adapter.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    extra = adapter.image_conditioning(images()[torch.arange(batch) % 3], shape)
    return x, sigma, Conditioning(text, negative=adapter.encode_prompts(["blurry"] * batch), extra=extra)


def test_loads_into_adapter_and_pipeline(adapter: WanI2VAdapter, pipe: WanImageToVideoPipeline) -> None:
    assert adapter.family == "wan_i2v" and get_adapter("wan_i2v") is WanI2VAdapter and "wan_i2v" in ADAPTERS
    assert adapter.needs_image and adapter.max_sequence_length == 512
    assert adapter.timestep_scale == 1000 and adapter.default_embedded_guidance is None
    for module in (adapter.vae, adapter.text_encoder, adapter.image_encoder, adapter.transformer):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert type(adapter.image_processor) is type(pipe.image_processor)
    assert adapter.image_processor.to_dict() == pipe.image_processor.to_dict()
    # the denoised latent has out_channels (4); the transformer input adds mask (2) + image latent (4)
    assert adapter.latent_shape(FRAMES, HEIGHT, WIDTH) == (4, 3, 8, 8)
    assert adapter.transformer.config.in_channels == 10
    assert all(isinstance(b, adapter.block_classes) for b in adapter.transformer.blocks)
    names = {n.rsplit(".", 1)[-1] for n, _ in adapter.transformer.named_modules()}
    assert {"add_k_proj", "add_v_proj"} <= names  # the LoRA targets exist in the model
    video = generate(pipe, adapter, images(1)[0])
    assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH) and torch.isfinite(video).all() and video.std() > 0


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder", "tokenizer", "image_encoder",
                                       "image_processor"])
def test_missing_component(folder: Path, tmp_path: Path, component: str) -> None:
    copy = Path(shutil.copytree(folder, tmp_path / "wan_i2v"))
    shutil.rmtree(copy / component)
    with pytest.raises(ModelLoadError, match=component) as info:
        load(copy)
    assert str(copy) in str(info.value) and "Wan2.1-I2V-14B-480P-Diffusers" in str(info.value)


def test_broken_image_encoder_and_t2v_folder(folder: Path, tiny_wan_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(folder, tmp_path / "wan_i2v"))
    weights = copy / "image_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot load the wan_i2v image_encoder"):
        load(copy)
    with pytest.raises(ModelLoadError, match="image_encoder, image_processor"):
        load(tiny_wan_dir)  # a text-to-video folder
    parts = WanI2VAdapter.load_parts(folder, dtype=torch.float32, device=torch.device("cpu"), transformer_dtype=None,
                                     transformer_loader=None)
    parts["transformer"] = build_tiny_pipeline("wan").transformer
    with pytest.raises(ModelLoadError, match="model.family=wan"):
        WanI2VAdapter(**parts, device=torch.device("cpu"), dtype=torch.float32)


def test_text_must_be_512_tokens(folder: Path, adapter: WanI2VAdapter, tmp_path: Path) -> None:
    """diffusers' WanAttnProcessor splits the I2V context at 512 text tokens, silently wrong for any
    other length: a tokenizer or max_sequence_length giving another length is refused."""
    copy = Path(shutil.copytree(folder, tmp_path / "wan_i2v"))
    config_file = copy / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = 16
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="exactly 512 tokens.*max_sequence_length is 16"):
        load(copy)
    parts = WanI2VAdapter.load_parts(folder, dtype=torch.float32, device=torch.device("cpu"), transformer_dtype=None,
                                     transformer_loader=None)
    with pytest.raises(ModelLoadError, match="max_sequence_length is 226"):
        WanI2VAdapter(**parts, device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=226)
    x, sigma, cond = random_inputs(adapter, 1)
    short = TextConditioning(cond.text.embeds[:, :16])
    with pytest.raises(ValueError, match="exactly 512 tokens.*got 16"):
        adapter.forward_transformer(x, sigma * 1000, short, cond.extra, None)


def test_encode_prompts_matches_pipeline(adapter: WanI2VAdapter, pipe: WanImageToVideoPipeline,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(pipeline_wan_i2v, "ftfy"):  # not installed: the pipeline's prompt_clean would raise NameError
        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=str), raising=False)
    text = adapter.encode_prompts(PROMPTS)
    assert text.mask is None and text.pooled is None  # Wan zeroes the padding and attends to every token
    with torch.no_grad():
        expected, negative = pipe.encode_prompt(PROMPTS, negative_prompt=["blurry"] * 4, max_sequence_length=512)
    assert text.embeds.shape == (len(PROMPTS), 512, 32) and text.embeds.dtype == torch.float32
    assert torch.equal(text.embeds, expected)
    assert torch.equal(adapter.encode_prompts(["blurry"] * 4).embeds, negative)
    lengths = (text.embeds != 0).any(-1).sum(-1).tolist()
    assert lengths[3] == 1 and lengths[0] < lengths[1] < lengths[2] < 512


def test_image_conditioning_matches_pipeline(adapter: WanI2VAdapter, pipe: WanImageToVideoPipeline) -> None:
    """Bit for bit what the pipeline computes from a PIL image with the same pixels: `encode_image`
    (the same CLIP processor class and config on the same 8-bit image, then the penultimate hidden
    states) and `prepare_latents`' condition (mask, then the normalised VAE mode). The adapter gets
    the image at the video size (megaflow.data.images covers and centre-crops); a pipeline user who
    passes a larger original gets CLIP features of the original and a stretched first frame instead."""
    shape = adapter.latent_shape(FRAMES, HEIGHT, WIDTH)
    pixels = images()
    extra = adapter.image_conditioning(pixels, shape)
    assert extra.keys() == {IMAGE_EMBEDS, IMAGE_CONDITION}
    assert extra[IMAGE_EMBEDS].shape == (3, 17, 16) and extra[IMAGE_CONDITION].shape == (3, 2 + 4, 3, 8, 8)
    for i, image in enumerate(pixels):
        pil = to_pil(image)
        assert torch.equal(torch.from_numpy(pipe.video_processor.pil_to_numpy(pil)[0]).permute(2, 0, 1), image)
        with torch.no_grad():
            embeds = pipe.encode_image(pil, torch.device("cpu"))
            video = pipe.video_processor.preprocess(pil, height=HEIGHT, width=WIDTH)
            _, condition = pipe.prepare_latents(video, 1, 4, HEIGHT, WIDTH, FRAMES, torch.float32, torch.device("cpu"),
                                                torch.Generator().manual_seed(0))
        assert torch.equal(extra[IMAGE_EMBEDS][i:i + 1], embeds)
        assert torch.equal(extra[IMAGE_CONDITION][i:i + 1], condition)
    mask = extra[IMAGE_CONDITION][:, :2]
    assert (mask[:, :, 0] == 1).all() and (mask[:, :, 1:] == 0).all()
    assert not torch.equal(extra[IMAGE_EMBEDS][0], extra[IMAGE_EMBEDS][1])
    assert not torch.equal(extra[IMAGE_CONDITION][0], extra[IMAGE_CONDITION][1])
    with pytest.raises(ValueError, match=r"images \[P, 3, 16, 16\]"):
        adapter.image_conditioning(torch.rand(1, 3, 32, 32), shape)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampling_matches_pipeline(adapter: WanI2VAdapter, pipe: WanImageToVideoPipeline, guidance: float) -> None:
    """The pipeline's denoising loop reproduced with `velocity` and the pipeline's scheduler: bit for
    bit without CFG; with CFG `velocity` runs both halves as one batch of 2 where the pipeline makes
    two calls, which changes GEMM rounding only (measured: 2.6e-6 of latents of scale 3.7)."""
    image = images(1)
    x = torch.randn(1, *adapter.latent_shape(FRAMES, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(5))
    expected = generate(pipe, adapter, image[0], latents=x.clone(), output_type="latent", guidance_scale=guidance)
    cond = Conditioning(adapter.encode_prompts(["a red circle moving right"]),
                        negative=adapter.encode_prompts(["blurry"]),
                        extra=adapter.image_conditioning(image, adapter.latent_shape(FRAMES, HEIGHT, WIDTH)))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    with torch.no_grad():
        for t, sigma in zip(scheduler.timesteps, scheduler.sigmas):
            v = adapter.velocity(x, sigma.reshape(1), cond, guidance_scale=guidance)
            x = scheduler.step(v, t, x, return_dict=False)[0]
    if guidance == 1.0:
        assert torch.equal(x, expected)
    else:
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


def test_forward_is_the_pipeline_transformer_call(adapter: WanI2VAdapter) -> None:
    x, sigma, cond = random_inputs(adapter, 2)
    with torch.no_grad():
        got = adapter.forward_transformer(x, sigma * 1000, cond.text, cond.extra, None)
        expected = adapter.transformer(
            hidden_states=torch.cat([x, cond.extra[IMAGE_CONDITION]], dim=1), timestep=sigma * 1000,
            encoder_hidden_states=cond.text.embeds, encoder_hidden_states_image=cond.extra[IMAGE_EMBEDS],
            return_dict=False)[0]
    assert got.shape == x.shape and torch.equal(got, expected)
    with pytest.raises(ValueError, match="image_conditioning"):
        adapter.forward_transformer(x, sigma * 1000, cond.text, {}, None)
    with pytest.raises(ValueError, match="does not fit the latents"):
        adapter.forward_transformer(x[:, :, :1], sigma * 1000, cond.text, cond.extra, None)
    with pytest.raises(ValueError, match="no embedded guidance"):
        adapter.forward_transformer(x, sigma * 1000, cond.text, cond.extra, torch.ones(2))


def test_velocity_cfg_equals_two_calls(adapter: WanI2VAdapter) -> None:
    x, sigma, cond = random_inputs(adapter, 2)
    other = Conditioning(cond.text, negative=adapter.encode_prompts(["low quality, static"] * 2), extra=cond.extra)
    with torch.no_grad():
        v = adapter.velocity(x, sigma, cond, guidance_scale=4.5)
        v_u = adapter.forward_transformer(x, sigma * 1000, cond.negative, cond.extra, None)
        v_c = adapter.forward_transformer(x, sigma * 1000, cond.text, cond.extra, None)
        v_plain = adapter.velocity(x, sigma, cond, guidance_scale=1.0)
        v_other = adapter.velocity(x, sigma, other, guidance_scale=4.5)
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_plain, v_c, rtol=0, atol=0)
    # the unconditional half is the negative prompt's own branch (Wan has no mask / pooled vector:
    # its embeddings are the whole branch)
    assert not torch.allclose(v_u, v_c)
    assert (v_other - v).abs().max() > 1e-4


def test_image_reaches_the_velocity(adapter: WanI2VAdapter) -> None:
    """Only the image changes: the velocity changes, through the CLIP embeddings and through the
    latent condition each on its own."""
    x, sigma, cond = random_inputs(adapter, 1)
    shape = adapter.latent_shape(FRAMES, HEIGHT, WIDTH)
    other = adapter.image_conditioning(images()[1:2], shape)

    def velocity(extra: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return adapter.velocity(x, sigma, Conditioning(cond.text, cond.negative, extra), guidance_scale=5.0)

    base = velocity(cond.extra)
    for changed in ({**cond.extra, IMAGE_EMBEDS: other[IMAGE_EMBEDS]},
                    {**cond.extra, IMAGE_CONDITION: other[IMAGE_CONDITION]}, other):
        assert (velocity(changed) - base).abs().max() > 1e-4


def test_decode_matches_pipeline(adapter: WanI2VAdapter, pipe: WanImageToVideoPipeline) -> None:
    image = images(1)[0]
    latents = generate(pipe, adapter, image, seed=3, output_type="latent")
    expected = generate(pipe, adapter, image, seed=3)
    video = adapter.decode(latents)
    assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH) and video.min() >= 0 and video.max() <= 1
    assert torch.equal(video, expected)


def test_lora_roundtrip(folder: Path, adapter: WanI2VAdapter, pipe: WanImageToVideoPipeline, tmp_path: Path) -> None:
    lora = load(folder)
    x, sigma, cond = random_inputs(lora, 2)
    with torch.no_grad():
        v_base = lora.velocity(x, sigma, cond, guidance_scale=5.0)
    lora.apply_lora(rank=4, alpha=8)
    trainable = {n: p for n, p in lora.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".attn2.add_k_proj.lora_A" in n for n in trainable)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainable.items():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        v_lora = lora.velocity(x, sigma, cond, guidance_scale=5.0)
        with lora.reference_mode():
            v_ref = lora.velocity(x, sigma, cond, guidance_scale=5.0)
    assert torch.equal(v_ref, v_base) and not torch.allclose(v_lora, v_base, atol=1e-3)
    lora.save_trainable(tmp_path / "lora")
    saved_file = load_file(str(tmp_path / "lora" / LORA_WEIGHTS_FILE))
    # image K/V adapters are in the file: diffusers' T2V→I2V zero-padding of LoRAs does not apply
    assert any("add_v_proj" in k for k in saved_file)

    lora_pipe = load_pipe(folder)
    lora_pipe.load_lora_weights(tmp_path / "lora")
    saved = get_peft_model_state_dict(lora.transformer)
    (name,) = lora_pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(lora_pipe.transformer, adapter_name=name)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
    with torch.no_grad():
        v_pipe = lora_pipe.transformer(
            hidden_states=torch.cat([x, cond.extra[IMAGE_CONDITION]], dim=1), timestep=sigma * 1000,
            encoder_hidden_states=cond.text.embeds, encoder_hidden_states_image=cond.extra[IMAGE_EMBEDS],
            return_dict=False)[0]
        v_cond = lora.forward_transformer(x, sigma * 1000, cond.text, cond.extra, None)
    torch.testing.assert_close(v_pipe, v_cond, rtol=1e-5, atol=1e-5)
    image = images(1)[0]
    assert not torch.allclose(generate(lora_pipe, adapter, image), generate(pipe, adapter, image), atol=1e-3)


def test_full_finetune_roundtrip(folder: Path, adapter: WanI2VAdapter, tmp_path: Path) -> None:
    tuned = load(folder)
    x, sigma, cond = random_inputs(tuned, 2)
    tuned.enable_full_finetune(keep_reference=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        v_tuned = tuned.velocity(x, sigma, cond, guidance_scale=5.0)
        with tuned.reference_mode():
            v_ref = tuned.velocity(x, sigma, cond, guidance_scale=5.0)
        v_base = adapter.velocity(x, sigma, cond, guidance_scale=5.0)
    assert torch.equal(v_ref, v_base) and not torch.allclose(v_tuned, v_base, atol=1e-3)
    tuned.save_trainable(tmp_path / "ft")
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "ft" / "transformer")
    expected, got = tuned.transformer.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    tuned_pipe = load_pipe(folder, transformer=loaded)
    video = generate(tuned_pipe, adapter, images(1)[0])
    assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH) and torch.isfinite(video).all()


def test_tiny_recipe_trains_and_exports(cache_root: Path, folder: Path, adapter: WanI2VAdapter,
                                        pipe: WanImageToVideoPipeline, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`megaflow train --config tiny_wan_i2v` in process (model.path=tiny from the cache): on-policy
    first iteration, finite rewards, the images in the reward metadata, a checkpoint whose export
    loads into WanImageToVideoPipeline and changes its output."""
    from megaflow.trainer.export import export_checkpoint
    from megaflow.trainer.loop import Trainer

    monkeypatch.setenv("MEGAFLOW_CACHE", str(cache_root))
    cfg = load_config("tiny_wan_i2v", [f"output_dir={tmp_path / 'run'}", "train.iterations=1", "train.save_every=1",
                                       "train.sample_every=0", "train.lr=1e-2"])
    assert cfg.model.path == "tiny" and resolve_model_path(cfg.model.path, cfg.model.family) == folder
    trainer = Trainer(cfg, show_progress=False)
    score, seen = trainer.rewards.score, []

    def spy(videos: torch.Tensor, prompts: list[str], meta: list[dict]) -> RewardScores:
        seen.extend((p, m["image"]) for p, m in zip(prompts, meta))
        return score(videos, prompts, meta)

    trainer.rewards.score = spy
    (metrics,) = trainer.train()
    assert metrics["policy/ratio_max_dev"] == 0.0
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("reward/mean", "reward/std", "loss/total"))
    assert metrics["optim/grad_norm"] > 0
    by_prompt = {r["prompt"]: load_image(str(TINY_I2V_PROMPTS.parent / r["image"]), HEIGHT, WIDTH) for r in RECORDS}
    assert len(seen) == 8 and len({p for p, _ in seen}) == 2
    assert all(torch.equal(image, by_prompt[prompt]) for prompt, image in seen)

    exported = export_checkpoint(tmp_path / "run" / "checkpoints" / "iteration_000001", tmp_path / "export")
    tuned = load_pipe(folder)
    tuned.load_lora_weights(exported)
    image = images(1)[0]
    assert (generate(tuned, adapter, image) - generate(pipe, adapter, image)).abs().max() > 1e-6
