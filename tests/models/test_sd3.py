"""SD3Adapter against the real diffusers StableDiffusion3Pipeline on the tiny SD3.5 folder."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import get_peft_model_state_dict

from megaflow.config import load_config
from megaflow.errors import ModelLoadError
from megaflow.models import ADAPTERS, Conditioning, TextConditioning, get_adapter
from megaflow.models.sd3 import SD3Adapter
from megaflow.models.tiny import TINY_SIZES, write_tiny_pipeline
from megaflow.sampling.schedule import flow_sigmas

PROMPTS = [
    "a red ball",
    "  a blue cube spinning slowly\n on a   white table ",
    "a cinematic shot of a city skyline at dawn with clouds drifting over a green valley and stars",
    "",
]
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH = TINY_SIZES["sd3"]["height"], TINY_SIZES["sd3"]["width"]
SHAPE = (16, 1, HEIGHT // 8, WIDTH // 8)
#: Text tokens of the tiny model: 77 CLIP + 16 T5.
TEXT_LEN = 77 + 16


def load(folder: Path, **kwargs) -> SD3Adapter:
    return SD3Adapter.from_pretrained(folder, dtype=torch.float32, device="cpu", **kwargs)


def generate(pipe: StableDiffusion3Pipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    """A tiny pipeline image `[B, 3, H, W]` (or latents `[B, 16, h, w]` with output_type='latent')."""
    kwargs.setdefault("output_type", "pt")
    return pipe("a red ball rolling", negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=3,
                guidance_scale=4.5, generator=torch.Generator().manual_seed(seed), max_sequence_length=16,
                **kwargs).images


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline("sd3", tmp_path_factory.mktemp("tiny-sd3") / "model")


@pytest.fixture(scope="module")
def adapter(sd3_dir: Path) -> SD3Adapter:
    """A base adapter for tests that do not modify it."""
    return load(sd3_dir)


@pytest.fixture(scope="module")
def pipe(sd3_dir: Path) -> StableDiffusion3Pipeline:
    """The pipeline with its VAE frozen like the adapter's: on CPU a convolution whose weight
    requires grad runs another kernel (measured: images 1e-6 apart), which would hide a real
    difference in `decode`."""
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.vae.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_inputs(adapter: SD3Adapter, batch: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, TextConditioning]:
    """Latents `[B, 16, 1, 8, 8]`, sigmas `[B]` and the text branch of `batch` prompts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=g)
    sigma = torch.rand(batch, generator=g)
    return x, sigma, adapter.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(batch)])


def test_loads_into_adapter_and_pipeline(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline) -> None:
    assert get_adapter("sd3") is SD3Adapter and "sd3" in ADAPTERS
    assert adapter.timestep_scale == 1000.0 and adapter.default_embedded_guidance is None
    assert adapter.max_sequence_length == 16
    for module in (adapter.vae, adapter.text_encoder, adapter.text_encoder_2, adapter.text_encoder_3,
                   adapter.transformer):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert adapter.latent_shape(1, HEIGHT, WIDTH) == SHAPE
    assert adapter.latent_shape(1, 32, 48) == (16, 1, 4, 6)
    with pytest.raises(ValueError, match="video.frames=1"):
        adapter.latent_shape(5, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="divisible by 16"):
        adapter.latent_shape(1, 72, WIDTH)
    with pytest.raises(ValueError, match="32×32 patches"):
        adapter.latent_shape(1, 528, WIDTH)
    blocks = adapter.transformer.transformer_blocks
    assert all(isinstance(b, adapter.block_classes) for b in blocks)
    assert blocks[0].attn2 is not None and blocks[1].attn2 is None  # SD3.5's dual attention in block 0
    image = generate(pipe)
    assert image.shape == (1, 3, HEIGHT, WIDTH) and torch.isfinite(image).all() and image.std() > 0


@pytest.mark.parametrize("component", SD3Adapter.components)
def test_missing_component(sd3_dir: Path, tmp_path: Path, component: str) -> None:
    folder = Path(shutil.copytree(sd3_dir, tmp_path / "sd3"))
    shutil.rmtree(folder / component)
    with pytest.raises(ModelLoadError, match=f"missing the component\\(s\\) {component}") as info:
        load(folder)
    assert str(folder) in str(info.value) and "stable-diffusion-3.5-medium" in str(info.value)


def test_missing_folder_and_broken_component(sd3_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load(tmp_path / "nowhere")
    assert "model.path=tiny" in str(info.value)
    folder = Path(shutil.copytree(sd3_dir, tmp_path / "sd3"))
    weights = folder / "text_encoder_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot load the sd3 text_encoder_2"):
        load(folder)


def test_max_sequence_length_defaults_to_128(sd3_dir: Path, tmp_path: Path) -> None:
    """A T5 tokenizer without `model_max_length` pads to Flow-GRPO's 128 T5 tokens."""
    folder = Path(shutil.copytree(sd3_dir, tmp_path / "sd3"))
    config_file = folder / "tokenizer_3" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["model_max_length"]
    config_file.write_text(json.dumps(config))
    assert load(folder).encode_prompts(["a red ball"]).embeds.shape == (1, 77 + 128, 32)


def test_encode_prompts_matches_pipeline(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline) -> None:
    """Positive and negative branches equal `encode_prompt`'s (CLIP-L ‖ CLIP-G penultimate states,
    zero-padded to T5's width, then T5; pooled = both CLIP projections)."""
    text = adapter.encode_prompts(PROMPTS)
    negative = adapter.encode_prompts([NEGATIVE] * len(PROMPTS))
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt=[NEGATIVE] * len(PROMPTS),
            max_sequence_length=adapter.max_sequence_length)
    assert text.mask is None and negative.mask is None  # SD3 attends to every token
    assert text.embeds.shape == (4, TEXT_LEN, 32) and text.pooled.shape == (4, 8 + 16)
    assert torch.equal(text.embeds, embeds) and torch.equal(text.pooled, pooled)
    assert torch.equal(negative.embeds, neg_embeds) and torch.equal(negative.pooled, neg_pooled)
    assert (text.embeds[:, :77, 8 + 16:] == 0).all() and (text.embeds[:, :77, :24] != 0).any(-1).all()
    assert not torch.equal(text.pooled[0], text.pooled[3])


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_euler_sampling_equals_pipeline(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline,
                                        guidance_scale: float) -> None:
    """The adapter's velocity, integrated on megaflow's σ grid, reproduces StableDiffusion3Pipeline's
    sampling on that grid (given as the pipeline's `sigmas`; shift 3 from its scheduler, bit for
    bit): timestep 1000·σ, true CFG with the negative prompt's own branch."""
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    prompts = ["a red ball rolling", "a green tree"]
    expected = pipe(prompts, negative_prompt=NEGATIVE, guidance_scale=guidance_scale, latents=noise[:, :, 0],
                    height=HEIGHT, width=WIDTH, num_inference_steps=4, sigmas=[1.0, 0.75, 0.5, 0.25],
                    max_sequence_length=16, output_type="latent").images
    sigmas = flow_sigmas(4, 3.0)
    assert torch.equal(sigmas, pipe.scheduler.sigmas)
    cond = Conditioning(adapter.encode_prompts(prompts), negative=adapter.encode_prompts([NEGATIVE] * 2))
    x = noise
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = adapter.velocity(x, sigma.expand(2), cond, guidance_scale=guidance_scale)
            x = x + (sigma_next - sigma) * v
    torch.testing.assert_close(x[:, :, 0], expected, rtol=1e-5, atol=1e-5)


def test_velocity_is_a_transformer_call_and_cfg_uses_the_negative_branch(adapter: SD3Adapter) -> None:
    x, sigma, text = random_inputs(adapter, 2)
    with torch.no_grad():
        direct = adapter.transformer(hidden_states=x[:, :, 0], timestep=sigma * 1000, encoder_hidden_states=text.embeds,
                                     pooled_projections=text.pooled, return_dict=False)[0]
        v_c = adapter.forward_transformer(x, sigma * 1000, text, {}, None)
        # The negative branch keeps the positive embeddings but has its own pooled vector: if the
        # unconditional half reused the positive pooled vector, both halves would agree.
        negative = TextConditioning(text.embeds, None, adapter.encode_prompts([NEGATIVE] * 2).pooled)
        v_u = adapter.forward_transformer(x, sigma * 1000, negative, {}, None)
        v = adapter.velocity(x, sigma, Conditioning(text, negative=negative), guidance_scale=4.5)
        v_plain = adapter.velocity(x, sigma, Conditioning(text, negative=negative), guidance_scale=1.0)
    torch.testing.assert_close(v_c, direct.unsqueeze(2), rtol=0, atol=0)
    assert not torch.allclose(v_u, v_c, atol=1e-4)
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_plain, v_c, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no embedded guidance"):
        adapter.forward_transformer(x, sigma * 1000, text, {}, torch.ones(2))
    with pytest.raises(ValueError, match="extra"):
        adapter.forward_transformer(x, sigma * 1000, text, {"image": x}, None)
    with pytest.raises(ValueError, match="pooled"):
        adapter.forward_transformer(x, sigma * 1000, TextConditioning(text.embeds), {}, None)


def test_decode_matches_pipeline(adapter: SD3Adapter, pipe: StableDiffusion3Pipeline) -> None:
    latents = generate(pipe, seed=3, output_type="latent", num_images_per_prompt=2)
    expected = generate(pipe, seed=3, num_images_per_prompt=2)
    images = adapter.decode(latents.unsqueeze(2))
    assert images.shape == (2, 1, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert torch.equal(images[:, 0], expected)


def test_lora_targets_and_bf16_training(sd3_dir: Path) -> None:
    """Default targets: the joint attention's projections of both streams (not SD3.5's image-only
    `attn2`, no feed-forward; the last block has no `to_add_out`). The bf16 transformer trains fp32
    adapters."""
    adapter = load(sd3_dir, transformer_dtype=torch.bfloat16)
    adapter.apply_lora(rank=4, alpha=4)
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in adapter.transformer.named_parameters() if ".lora_A" in n})
    joint = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_k", "attn.to_out.0", "attn.to_q",
             "attn.to_v"]
    assert adapted == sorted([f"transformer_blocks.{i}.{n}" for i in (0, 1) for n in joint]
                             + ["transformer_blocks.0.attn.to_add_out"])
    x, sigma, text = random_inputs(adapter, 2)
    negative = adapter.encode_prompts([NEGATIVE] * 2)
    v = adapter.velocity(x, sigma, Conditioning(text, negative=negative), guidance_scale=4.5)
    assert v.dtype == torch.float32 and v.shape == x.shape and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in adapter.trainable_parameters())


def test_lora_roundtrip(sd3_dir: Path, tmp_path: Path, pipe: StableDiffusion3Pipeline) -> None:
    adapter = load(sd3_dir)
    x, sigma, text = random_inputs(adapter, 2)
    cond = Conditioning(text, negative=adapter.encode_prompts([NEGATIVE] * 2))
    with torch.no_grad():
        v_base = adapter.velocity(x, sigma, cond, guidance_scale=4.5)
    adapter.apply_lora(rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        v_lora = adapter.velocity(x, sigma, cond, guidance_scale=4.5)
        with adapter.reference_mode():
            v_ref = adapter.velocity(x, sigma, cond, guidance_scale=4.5)
    assert torch.equal(v_ref, v_base) and not torch.allclose(v_lora, v_base, atol=1e-3)
    adapter.save_trainable(tmp_path / "lora")

    lora_pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    lora_pipe.set_progress_bar_config(disable=True)
    lora_pipe.load_lora_weights(tmp_path / "lora")
    saved = get_peft_model_state_dict(adapter.transformer)
    (name,) = lora_pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(lora_pipe.transformer, adapter_name=name)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
    with torch.no_grad():
        v_pipe = lora_pipe.transformer(hidden_states=x[:, :, 0], timestep=sigma * 1000,
                                       encoder_hidden_states=text.embeds, pooled_projections=text.pooled,
                                       return_dict=False)[0]
        v_cond = adapter.forward_transformer(x, sigma * 1000, text, {}, None)
    torch.testing.assert_close(v_pipe.unsqueeze(2), v_cond, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(generate(lora_pipe), generate(pipe), atol=1e-3)


def test_full_finetune_roundtrip(sd3_dir: Path, tmp_path: Path) -> None:
    adapter = load(sd3_dir)
    adapter.enable_full_finetune(keep_reference=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    adapter.save_trainable(tmp_path / "ft")
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "ft" / "transformer")
    expected, got = adapter.transformer.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    tuned = StableDiffusion3Pipeline.from_pretrained(sd3_dir, transformer=loaded)
    tuned.set_progress_bar_config(disable=True)
    image = generate(tuned)
    assert image.shape == (1, 3, HEIGHT, WIDTH) and torch.isfinite(image).all()


def test_trainer_checkpoint_exports_into_the_pipeline(sd3_dir: Path, tmp_path: Path,
                                                      pipe: StableDiffusion3Pipeline) -> None:
    """`megaflow train --config tiny_sd3`, 2 iterations: on-policy first ratios, finite rewards, a
    checkpoint whose export loads into StableDiffusion3Pipeline unchanged and changes its images."""
    from megaflow.trainer.export import export_checkpoint
    from megaflow.trainer.loop import Trainer

    run = tmp_path / "run"
    cfg = load_config("tiny_sd3", [f"output_dir={run}", f"model.path={sd3_dir}", "train.iterations=2",
                                   "train.lr=3e-2", "algorithm.clip_range=0.2"])
    assert cfg.video.frames == 1 and cfg.sampling.guidance_scale == 4.5 and cfg.sampling.shift == 3.0
    history = Trainer(cfg, show_progress=False).train()
    assert [m["policy/ratio_max_dev"] for m in history] == [0.0, 0.0]
    assert all(math.isfinite(m["reward/mean"]) and m["optim/grad_norm"] > 0 for m in history)
    checkpoint = run / "checkpoints" / "iteration_000002"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    exported = export_checkpoint(checkpoint, tmp_path / "export")
    tuned = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    tuned.set_progress_bar_config(disable=True)
    tuned.load_lora_weights(exported)
    assert not torch.allclose(generate(tuned), generate(pipe), atol=1e-4)
