"""WanAdapter against the real diffusers WanPipeline on the tiny Wan folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from peft import get_peft_model_state_dict

from megaflow.errors import ConfigError, ModelLoadError
from megaflow.models import ADAPTERS, Conditioning, TextConditioning, get_adapter
from megaflow.models.wan import WanAdapter
from megaflow.models.tiny import TINY_VIDEO

PROMPTS = [
    "a red ball",
    "  a blue cube spinning slowly\n on a   white table &amp; a cat ",
    "a cinematic shot of a city skyline at dawn with clouds drifting over a green valley and stars",
    "",
]
FRAMES, HEIGHT, WIDTH = TINY_VIDEO["frames"], TINY_VIDEO["height"], TINY_VIDEO["width"]


def load(folder: Path) -> WanAdapter:
    return WanAdapter.from_pretrained(folder, dtype=torch.float32, device="cpu")


def generate(pipe: WanPipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    """A tiny pipeline video `[B, F, 3, H, W]` (or latents with output_type='latent')."""
    kwargs.setdefault("output_type", "pt")
    return pipe(
        "a red ball rolling", num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=4,
        guidance_scale=3.0, generator=torch.Generator().manual_seed(seed), max_sequence_length=16, **kwargs,
    ).frames


@pytest.fixture(scope="module")
def adapter(tiny_wan_dir: Path) -> WanAdapter:
    """A base adapter for tests that do not modify it."""
    return load(tiny_wan_dir)


@pytest.fixture(scope="module")
def pipe(tiny_wan_dir: Path) -> WanPipeline:
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_inputs(adapter: WanAdapter, batch: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Latents `[B, 4, 3, 8, 8]`, sigmas `[B]` and CFG conditioning for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *adapter.latent_shape(FRAMES, HEIGHT, WIDTH), generator=g)
    sigma = torch.rand(batch, generator=g)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    cond = Conditioning(adapter.encode_prompts(prompts), negative=adapter.encode_prompts([""] * batch))
    return x, sigma, cond


def test_loads_into_adapter_and_pipeline(adapter: WanAdapter, pipe: WanPipeline) -> None:
    assert adapter.family == "wan" and get_adapter("wan") is WanAdapter and "wan" in ADAPTERS
    assert adapter.max_sequence_length == 16
    for module in (adapter.vae, adapter.text_encoder, adapter.transformer):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert adapter.latent_shape(FRAMES, HEIGHT, WIDTH) == (4, 3, 8, 8)
    assert adapter.latent_shape(1, 32, 48) == (4, 1, 16, 24)
    assert all(isinstance(b, adapter.block_classes) for b in adapter.transformer.blocks)
    video = generate(pipe)
    assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH)
    assert torch.isfinite(video).all() and video.std() > 0


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder", "tokenizer"])
def test_missing_component(tiny_wan_dir: Path, tmp_path: Path, component: str) -> None:
    folder = Path(shutil.copytree(tiny_wan_dir, tmp_path / "wan"))
    shutil.rmtree(folder / component)
    with pytest.raises(ModelLoadError, match=component) as info:
        load(folder)
    assert str(folder) in str(info.value) and "huggingface-cli download" in str(info.value)


def test_missing_folder_and_broken_component(tiny_wan_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load(tmp_path / "nowhere")
    assert "model.path=tiny" in str(info.value)
    folder = Path(shutil.copytree(tiny_wan_dir, tmp_path / "wan"))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="cannot load the wan vae"):
        load(folder)
    shutil.copy(tiny_wan_dir / "vae" / "diffusion_pytorch_model.safetensors", folder / "vae")
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot load the wan text_encoder"):
        load(folder)


def test_max_sequence_length_defaults_to_512(tiny_wan_dir: Path, tmp_path: Path) -> None:
    """A tokenizer without a sensible `model_max_length` (UMT5's is 1e30) pads to Wan's 512."""
    folder = Path(shutil.copytree(tiny_wan_dir, tmp_path / "wan"))
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["model_max_length"]
    config_file.write_text(json.dumps(config))
    adapter = load(folder)
    assert adapter.max_sequence_length == 512
    assert adapter.encode_prompts(["a red ball"]).embeds.shape == (1, 512, 32)


def test_bf16_transformer_with_lora(tiny_wan_dir: Path) -> None:
    """Modules diffusers keeps in fp32 (Wan's first parameter) do not decide the input dtype."""
    adapter = WanAdapter.from_pretrained(tiny_wan_dir, dtype=torch.float32, device="cpu",
                                         transformer_dtype=torch.bfloat16)
    assert adapter.transformer_dtype == torch.bfloat16
    assert next(adapter.transformer.parameters()).dtype == torch.float32
    adapter.apply_lora(rank=4, alpha=4)
    x, sigma, cond = random_inputs(adapter, 2)
    v = adapter.velocity(x, sigma, cond, guidance_scale=3.0)
    assert v.dtype == torch.float32 and v.shape == x.shape and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in adapter.trainable_parameters())


def test_unknown_family() -> None:
    with pytest.raises(ConfigError, match="valid families: flux, hunyuan, sd3, skyreels_i2v, wan, wan_i2v"):
        get_adapter("hunyuan-video-99")


def test_encode_prompts_matches_pipeline(adapter: WanAdapter, pipe: WanPipeline) -> None:
    text = adapter.encode_prompts(PROMPTS)
    assert text.mask is None and text.pooled is None  # Wan zeroes the padding and attends to every token
    embeds = text.embeds
    with torch.no_grad():
        expected, negative = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, max_sequence_length=adapter.max_sequence_length,
        )
    assert negative is None
    assert embeds.shape == (len(PROMPTS), 16, 32) and embeds.dtype == torch.float32
    assert torch.equal(embeds, expected)
    lengths = (embeds != 0).any(-1).sum(-1).tolist()
    assert lengths[2] == 16 and lengths[3] == 1 and lengths[0] < lengths[1] < 16
    for row, n in zip(embeds, lengths):
        assert (row[:n] != 0).any(-1).all() and (row[n:] == 0).all()


def test_latent_shape_rejects_bad_sizes(adapter: WanAdapter) -> None:
    with pytest.raises(ValueError, match="frames"):
        adapter.latent_shape(6, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="divisible by 4"):
        adapter.latent_shape(FRAMES, 18, WIDTH)
    with pytest.raises(ValueError, match="width=10"):
        adapter.latent_shape(FRAMES, HEIGHT, 10)


def test_velocity_cfg_equals_two_calls(adapter: WanAdapter) -> None:
    x, sigma, cond = random_inputs(adapter, 2)
    with torch.no_grad():
        v = adapter.velocity(x, sigma, cond, guidance_scale=4.5)
        v_u = adapter.forward_transformer(x, sigma * 1000, cond.negative, {}, None)
        v_c = adapter.forward_transformer(x, sigma * 1000, cond.text, {}, None)
        v_plain = adapter.velocity(x, sigma, cond, guidance_scale=1.0)
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_plain, v_c, rtol=0, atol=0)
    assert not torch.allclose(v_u, v_c)
    with pytest.raises(ValueError, match="extra"):
        adapter.forward_transformer(x, sigma * 1000, cond.text, {"image": x}, None)
    with pytest.raises(ValueError, match="no embedded guidance"):
        adapter.forward_transformer(x, sigma * 1000, cond.text, {}, torch.ones(2))


def test_velocity_rows_independent(adapter: WanAdapter) -> None:
    x, sigma, cond = random_inputs(adapter, 4, seed=1)
    x2, sigma2, cond2 = random_inputs(adapter, 4, seed=2)
    cond2 = Conditioning(cond2.text.select(torch.arange(3, -1, -1)), negative=cond2.negative)
    with torch.no_grad():
        v = adapter.velocity(x, sigma, cond, guidance_scale=5.0)
        for row in range(4):
            others = torch.arange(4) != row
            xm, sm = x.clone(), sigma.clone()
            xm[others], sm[others] = x2[others], sigma2[others]
            embeds = cond.text.embeds.clone()
            embeds[others] = cond2.text.embeds[others]
            vm = adapter.velocity(xm, sm, Conditioning(TextConditioning(embeds), negative=cond.negative),
                                  guidance_scale=5.0)
            assert torch.equal(vm[row], v[row])
            assert not torch.equal(vm[others], v[others])


def test_decode_matches_pipeline(adapter: WanAdapter, pipe: WanPipeline) -> None:
    latents = generate(pipe, seed=3, output_type="latent", num_videos_per_prompt=2)
    pipe.vae.enable_slicing()  # the adapter decodes one video at a time (model.vae_slicing, megaflow.models.vae)
    try:
        expected = generate(pipe, seed=3, num_videos_per_prompt=2)
    finally:
        pipe.vae.disable_slicing()
    video = adapter.decode(latents)
    assert video.shape == (2, FRAMES, 3, HEIGHT, WIDTH) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1 and video.std() > 0
    assert torch.equal(video, expected)


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_lora_roundtrip(tiny_wan_dir: Path, tmp_path: Path, pipe: WanPipeline, alpha: float) -> None:
    adapter = load(tiny_wan_dir)
    x, sigma, cond = random_inputs(adapter, 2)
    with torch.no_grad():
        v_base = adapter.velocity(x, sigma, cond, guidance_scale=3.0)
    adapter.apply_lora(rank=4, alpha=alpha)
    trainable = dict((n, p) for n, p in adapter.transformer.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)
    assert adapter.trainable_parameters() == list(trainable.values())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainable.items():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        v_lora = adapter.velocity(x, sigma, cond, guidance_scale=3.0)
        with adapter.reference_mode():
            v_ref = adapter.velocity(x, sigma, cond, guidance_scale=3.0)
    assert torch.equal(v_ref, v_base)
    assert not torch.allclose(v_lora, v_base, atol=1e-3)
    adapter.save_trainable(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    lora_pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    lora_pipe.set_progress_bar_config(disable=True)
    lora_pipe.load_lora_weights(tmp_path / "lora")
    saved = get_peft_model_state_dict(adapter.transformer)
    (name,) = lora_pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(lora_pipe.transformer, adapter_name=name)
    assert saved.keys() == loaded.keys()
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
    with torch.no_grad():
        v_pipe = lora_pipe.transformer(
            hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.text.embeds, return_dict=False,
        )[0]
        v_cond = adapter.forward_transformer(x, sigma * 1000, cond.text, {}, None)
    torch.testing.assert_close(v_pipe, v_cond, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(generate(lora_pipe), generate(pipe), atol=1e-3)


def test_full_finetune_roundtrip(tiny_wan_dir: Path, tmp_path: Path) -> None:
    adapter = load(tiny_wan_dir)
    x, sigma, cond = random_inputs(adapter, 2)
    with torch.no_grad():
        v_base = adapter.velocity(x, sigma, cond, guidance_scale=3.0)
    adapter.enable_full_finetune(keep_reference=True)
    params = list(adapter.transformer.parameters())
    assert adapter.trainable_parameters() == params and all(p.requires_grad for p in params)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        v_tuned = adapter.velocity(x, sigma, cond, guidance_scale=3.0)
        with adapter.reference_mode():
            v_ref = adapter.velocity(x, sigma, cond, guidance_scale=3.0)
    assert torch.equal(v_ref, v_base)
    assert not torch.allclose(v_tuned, v_base, atol=1e-3)

    adapter.save_trainable(tmp_path / "ft")
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "ft" / "transformer")
    expected = adapter.transformer.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    tuned_pipe = WanPipeline.from_pretrained(tiny_wan_dir, transformer=loaded)
    tuned_pipe.set_progress_bar_config(disable=True)
    video = generate(tuned_pipe)
    assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH) and torch.isfinite(video).all()


@pytest.mark.parametrize("lora", [True, False])
def test_load_trainable_restores_what_save_trainable_wrote(tiny_wan_dir: Path, tmp_path: Path, lora: bool) -> None:
    trained = load(tiny_wan_dir)
    if lora:
        trained.apply_lora(rank=4, alpha=8)
    else:
        trained.enable_full_finetune(keep_reference=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    trained.save_trainable(tmp_path)
    restored = load(tiny_wan_dir)
    restored.load_trainable(tmp_path, lora=lora)
    x, sigma, cond = random_inputs(trained, 2)
    with torch.no_grad():
        expected = trained.velocity(x, sigma, cond, 1.0)
        got = restored.velocity(x, sigma, cond, 1.0)
        base = load(tiny_wan_dir).velocity(x, sigma, cond, 1.0)
    assert not torch.allclose(expected, base)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in restored.transformer.parameters())
