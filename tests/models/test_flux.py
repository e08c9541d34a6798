"""FluxAdapter against the real diffusers FluxPipeline on the tiny FLUX folder."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import get_peft_model_state_dict

from megaflow.config import load_config
from megaflow.errors import ModelLoadError
from megaflow.models import ADAPTERS, Conditioning, TextConditioning, get_adapter
from megaflow.models.flux import FluxAdapter, flux_shift, latent_image_ids, pack_latents, unpack_latents
from megaflow.models.tiny import TINY_SIZES, write_tiny_pipeline
from megaflow.sampling.schedule import flow_sigmas

PROMPTS = [
    "a red ball",
    "  a blue cube spinning slowly\n on a   white table ",
    "a cinematic shot of a city skyline at dawn with clouds drifting over a green valley and stars",
    "",
]
HEIGHT, WIDTH = TINY_SIZES["flux"]["height"], TINY_SIZES["flux"]["width"]
SHAPE = (16, 1, HEIGHT // 8, WIDTH // 8)


def load(folder: Path, **kwargs) -> FluxAdapter:
    return FluxAdapter.from_pretrained(folder, dtype=torch.float32, device="cpu", **kwargs)


def generate(pipe: FluxPipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    """A tiny pipeline image `[B, 3, H, W]` (or packed latents with output_type='latent')."""
    kwargs.setdefault("output_type", "pt")
    return pipe("a red ball rolling", height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(seed), max_sequence_length=16, **kwargs).images


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny-flux") / "model")


@pytest.fixture(scope="module")
def adapter(flux_dir: Path) -> FluxAdapter:
    """A base adapter for tests that do not modify it."""
    return load(flux_dir)


@pytest.fixture(scope="module")
def pipe(flux_dir: Path) -> FluxPipeline:
    """The pipeline with its VAE frozen like the adapter's: on CPU a convolution whose weight
    requires grad runs another kernel (measured: images 1.1e-6 apart), which would hide a real
    difference in `decode`."""
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.vae.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_inputs(adapter: FluxAdapter, batch: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, TextConditioning]:
    """Latents `[B, 16, 1, 8, 8]`, sigmas `[B]` and the text branch of `batch` prompts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=g)
    sigma = torch.rand(batch, generator=g)
    return x, sigma, adapter.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(batch)])


def test_loads_into_adapter_and_pipeline(adapter: FluxAdapter, pipe: FluxPipeline) -> None:
    assert get_adapter("flux") is FluxAdapter and "flux" in ADAPTERS
    assert adapter.timestep_scale == 1.0 and adapter.default_embedded_guidance == 3.5
    assert adapter.max_sequence_length == 16
    for module in (adapter.vae, adapter.text_encoder, adapter.text_encoder_2, adapter.transformer):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert adapter.latent_shape(1, HEIGHT, WIDTH) == SHAPE
    assert adapter.latent_shape(1, 32, 48) == (16, 1, 4, 6)
    with pytest.raises(ValueError, match="video.frames=1"):
        adapter.latent_shape(5, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="divisible by 16"):
        adapter.latent_shape(1, 72, WIDTH)
    blocks = [*adapter.transformer.transformer_blocks, *adapter.transformer.single_transformer_blocks]
    assert {type(b) for b in blocks} == set(adapter.block_classes)
    image = generate(pipe)
    assert image.shape == (1, 3, HEIGHT, WIDTH) and torch.isfinite(image).all() and image.std() > 0


@pytest.mark.parametrize("component", FluxAdapter.components)
def test_missing_component(flux_dir: Path, tmp_path: Path, component: str) -> None:
    folder = Path(shutil.copytree(flux_dir, tmp_path / "flux"))
    shutil.rmtree(folder / component)
    with pytest.raises(ModelLoadError, match=f"missing the component\\(s\\) {component}") as info:
        load(folder)
    assert str(folder) in str(info.value) and "black-forest-labs/FLUX.1-dev" in str(info.value)


def test_missing_folder_and_broken_component(flux_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load(tmp_path / "nowhere")
    assert "model.path=tiny" in str(info.value)
    folder = Path(shutil.copytree(flux_dir, tmp_path / "flux"))
    weights = folder / "text_encoder_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot load the flux text_encoder_2"):
        load(folder)


def test_max_sequence_length_defaults_to_512(flux_dir: Path, tmp_path: Path) -> None:
    """A T5 tokenizer without `model_max_length` pads to FluxPipeline's default and maximum, 512."""
    folder = Path(shutil.copytree(flux_dir, tmp_path / "flux"))
    config_file = folder / "tokenizer_2" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["model_max_length"]
    config_file.write_text(json.dumps(config))
    assert load(folder).encode_prompts(["a red ball"]).embeds.shape == (1, 512, 32)


def test_encode_prompts_matches_pipeline(adapter: FluxAdapter, pipe: FluxPipeline) -> None:
    text = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=adapter.max_sequence_length)
    assert text.mask is None  # FLUX attends to every T5 token, padding included
    assert text.embeds.shape == (4, 16, 32) and text.pooled.shape == (4, 8)
    assert torch.equal(text.embeds, embeds) and torch.equal(text.pooled, pooled)
    assert torch.equal(text_ids, torch.zeros(16, 3))
    assert not torch.equal(text.pooled[0], text.pooled[3]) and not torch.equal(text.embeds[0], text.embeds[3])


def test_packing_and_ids_are_the_pipelines() -> None:
    latents = torch.randn(2, 16, 1, 6, 10)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents[:, :, 0], 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, latents), latents)
    unpacked = FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, vae_scale_factor=8)
    assert torch.equal(unpacked.unsqueeze(2), latents)
    expected = FluxPipeline._prepare_latent_image_ids(2, 3, 5, torch.device("cpu"), torch.float32)
    assert torch.equal(latent_image_ids(6, 10, torch.device("cpu")), expected)


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_euler_sampling_equals_pipeline(adapter: FluxAdapter, pipe: FluxPipeline, true_cfg: float) -> None:
    """The adapter's velocity, integrated on the pipeline's own σ grid, reproduces FluxPipeline's
    sampling (packing, ids, timestep = σ, raw embedded guidance, true CFG with the negative prompt's
    own branch); megaflow's grid with `flux_shift` is that σ grid (FLUX's dynamic shift)."""
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    prompts, negative = ["a red ball rolling", "a green tree"], "blurry, low quality"
    packed = pipe(prompts, negative_prompt=negative if true_cfg > 1 else None, true_cfg_scale=true_cfg,
                  latents=pack_latents(noise), height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=3.5,
                  max_sequence_length=16, output_type="latent").images
    sigmas = pipe.scheduler.sigmas
    torch.testing.assert_close(flow_sigmas(4, flux_shift(HEIGHT, WIDTH)), sigmas, rtol=0, atol=1e-6)
    cond = Conditioning(adapter.encode_prompts(prompts), negative=adapter.encode_prompts([negative] * 2))
    x = noise
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = adapter.velocity(x, sigma.expand(2), cond, guidance_scale=true_cfg, embedded_guidance=3.5)
            x = x + (sigma_next - sigma) * v
    torch.testing.assert_close(x, unpack_latents(packed, noise), rtol=1e-5, atol=1e-5)


def test_recipe_shift_is_flux_dynamic_shift() -> None:
    """tiny_flux's shift is FLUX's dynamic shift at its size, rounded to a value whose σ grid starts
    at exactly 1 (flow_grpo's first step divides by 1 − σ_0)."""
    cfg = load_config("tiny_flux")
    assert (cfg.video.frames, cfg.video.height, cfg.video.width) == (1, HEIGHT, WIDTH)
    assert abs(cfg.sampling.shift - flux_shift(HEIGHT, WIDTH)) < 1e-3
    assert flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift)[0].item() == 1.0
    assert cfg.sampling.guidance_scale <= 1.0 and cfg.sampling.embedded_guidance is None
    assert flux_shift(512, 512) == pytest.approx(math.exp(0.5 + 0.65 * 768 / 3840))
    assert flux_shift(1024, 1024) == pytest.approx(math.exp(1.15))


def test_velocity_is_a_transformer_call_and_cfg_uses_the_negative_branch(adapter: FluxAdapter) -> None:
    x, sigma, text = random_inputs(adapter, 2)
    guidance = torch.full((2,), 3.5)
    with torch.no_grad():
        direct = adapter.transformer(
            hidden_states=FluxPipeline._pack_latents(x[:, :, 0], 2, 16, 8, 8), encoder_hidden_states=text.embeds,
            pooled_projections=text.pooled, timestep=sigma, guidance=guidance, txt_ids=torch.zeros(16, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, torch.device("cpu"), torch.float32),
            return_dict=False)[0]
        v_c = adapter.forward_transformer(x, sigma, text, {}, guidance)
        # The negative branch keeps the positive T5 embeddings but has its own pooled vector: if the
        # unconditional half reused the positive pooled vector, both halves would agree.
        negative = TextConditioning(text.embeds, None, adapter.encode_prompts(["blurry", "dark"]).pooled)
        v_u = adapter.forward_transformer(x, sigma, negative, {}, guidance)
        v = adapter.velocity(x, sigma, Conditioning(text, negative=negative), guidance_scale=4.5, embedded_guidance=3.5)
        v_plain = adapter.velocity(x, sigma, Conditioning(text, negative=negative), embedded_guidance=3.5)
        v_low = adapter.forward_transformer(x, sigma, text, {}, torch.full((2,), 1.0))
    torch.testing.assert_close(v_c, unpack_latents(direct, x), rtol=0, atol=0)
    assert not torch.allclose(v_u, v_c, atol=1e-4)
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_plain, v_c, rtol=0, atol=0)
    assert not torch.allclose(v_low, v_c, atol=1e-4)  # the embedded guidance reaches the transformer
    with pytest.raises(ValueError, match="guidance-distilled"):
        adapter.forward_transformer(x, sigma, text, {}, None)
    with pytest.raises(ValueError, match="extra"):
        adapter.forward_transformer(x, sigma, text, {"image": x}, guidance)
    with pytest.raises(ValueError, match="pooled"):
        adapter.forward_transformer(x, sigma, TextConditioning(text.embeds), {}, guidance)


def test_decode_matches_pipeline(adapter: FluxAdapter, pipe: FluxPipeline) -> None:
    packed = generate(pipe, seed=3, output_type="latent", num_images_per_prompt=2)
    expected = generate(pipe, seed=3, num_images_per_prompt=2)
    images = adapter.decode(unpack_latents(packed, torch.empty(2, *SHAPE)))
    assert images.shape == (2, 1, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert torch.equal(images[:, 0], expected)
    with pytest.raises(ValueError, match="image latents must be"):
        adapter.decode(torch.zeros(1, 16, 2, 8, 8))


def test_lora_targets_and_bf16_training(flux_dir: Path) -> None:
    """Default targets: every attention projection of both streams and the dual blocks' FFs; the
    single blocks get q/k/v only (no to_out; proj_out / proj_mlp are left out). The bf16
    transformer trains fp32 adapters."""
    adapter = load(flux_dir, transformer_dtype=torch.bfloat16)
    adapter.apply_lora(rank=4, alpha=4)
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in adapter.transformer.named_parameters() if ".lora_A" in n})
    dual = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
            "attn.to_q", "attn.to_v", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    single = ["attn.to_k", "attn.to_q", "attn.to_v"]
    assert adapted == sorted([f"single_transformer_blocks.0.{n}" for n in single]
                             + [f"transformer_blocks.0.{n}" for n in dual])
    x, sigma, text = random_inputs(adapter, 2)
    v = adapter.velocity(x, sigma, Conditioning(text), embedded_guidance=3.5)
    assert v.dtype == torch.float32 and v.shape == x.shape and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in adapter.trainable_parameters())


def test_lora_roundtrip(flux_dir: Path, tmp_path: Path, pipe: FluxPipeline) -> None:
    adapter = load(flux_dir)
    x, sigma, text = random_inputs(adapter, 2)
    cond = Conditioning(text)
    with torch.no_grad():
        v_base = adapter.velocity(x, sigma, cond, embedded_guidance=3.5)
    adapter.apply_lora(rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        v_lora = adapter.velocity(x, sigma, cond, embedded_guidance=3.5)
        with adapter.reference_mode():
            v_ref = adapter.velocity(x, sigma, cond, embedded_guidance=3.5)
    assert torch.equal(v_ref, v_base) and not torch.allclose(v_lora, v_base, atol=1e-3)
    adapter.save_trainable(tmp_path / "lora")

    lora_pipe = FluxPipeline.from_pretrained(flux_dir)
    lora_pipe.set_progress_bar_config(disable=True)
    lora_pipe.load_lora_weights(tmp_path / "lora")
    saved = get_peft_model_state_dict(adapter.transformer)
    (name,) = lora_pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(lora_pipe.transformer, adapter_name=name)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
    with torch.no_grad():
        v_pipe = lora_pipe.transformer(
            hidden_states=pack_latents(x), encoder_hidden_states=text.embeds, pooled_projections=text.pooled,
            timestep=sigma, guidance=torch.full((2,), 3.5), txt_ids=torch.zeros(16, 3),
            img_ids=latent_image_ids(8, 8, torch.device("cpu")), return_dict=False)[0]
    torch.testing.assert_close(unpack_latents(v_pipe, x), v_lora, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(generate(lora_pipe), generate(pipe), atol=1e-3)


def test_full_finetune_roundtrip(flux_dir: Path, tmp_path: Path) -> None:
    adapter = load(flux_dir)
    adapter.enable_full_finetune(keep_reference=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    adapter.save_trainable(tmp_path / "ft")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "ft" / "transformer")
    expected, got = adapter.transformer.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    tuned = FluxPipeline.from_pretrained(flux_dir, transformer=loaded)
    tuned.set_progress_bar_config(disable=True)
    image = generate(tuned)
    assert image.shape == (1, 3, HEIGHT, WIDTH) and torch.isfinite(image).all()


def test_trainer_checkpoint_exports_into_the_pipeline(flux_dir: Path, tmp_path: Path, pipe: FluxPipeline) -> None:
    """`megaflow train --config tiny_flux`, 2 iterations: on-policy first ratios, finite rewards, a
    checkpoint whose export loads into FluxPipeline unchanged and changes its images."""
    from megaflow.trainer.export import export_checkpoint
    from megaflow.trainer.loop import Trainer

    run = tmp_path / "run"
    trainer = Trainer(load_config("tiny_flux", [f"output_dir={run}", f"model.path={flux_dir}", "train.iterations=2",
                                                "train.lr=3e-2", "algorithm.clip_range=0.2"]), show_progress=False)
    history = trainer.train()
    assert [m["policy/ratio_max_dev"] for m in history] == [0.0, 0.0]
    assert all(math.isfinite(m["reward/mean"]) and m["optim/grad_norm"] > 0 for m in history)
    checkpoint = run / "checkpoints" / "iteration_000002"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    exported = export_checkpoint(checkpoint, tmp_path / "export")
    tuned = FluxPipeline.from_pretrained(flux_dir)
    tuned.set_progress_bar_config(disable=True)
    tuned.load_lora_weights(exported)
    assert not torch.allclose(generate(tuned), generate(pipe), atol=1e-4)
