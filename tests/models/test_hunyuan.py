"""HunyuanVideoAdapter and SkyReelsI2VAdapter against the real diffusers pipelines
(`HunyuanVideoPipeline`, `HunyuanSkyreelsImageToVideoPipeline`) on the tiny folders."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from peft import get_peft_model_state_dict

from megaflow.config import load_config
from megaflow.data.images import load_image
from megaflow.errors import ModelLoadError
from megaflow.models import Conditioning, TextConditioning, get_adapter, resolve_model_path
from megaflow.models.hunyuan import (
    HUNYUAN_LORA_TARGETS, TEXT_SETTINGS_FILE, HunyuanVideoAdapter, SkyReelsI2VAdapter, read_text_settings,
)
from megaflow.models.tiny import TINY_HUNYUAN_PROMPT_TEMPLATE, TINY_I2V_PROMPTS, TINY_SIZES, tiny_model_dir
from megaflow.rewards import RewardScores

FAMILIES = ("hunyuan", "skyreels_i2v")
ADAPTERS = {"hunyuan": HunyuanVideoAdapter, "skyreels_i2v": SkyReelsI2VAdapter}
PIPELINES = {"hunyuan": HunyuanVideoPipeline, "skyreels_i2v": HunyuanSkyreelsImageToVideoPipeline}
FRAMES, HEIGHT, WIDTH = (TINY_SIZES["hunyuan"][k] for k in ("frames", "height", "width"))
PROMPTS = [
    "a red ball",
    "a cinematic shot of a city skyline at dawn with clouds drifting over a green valley and stars",
    "a black cat walking along a sunny beach",
    "",
]
NEGATIVE = "blurry, low quality"
RECORDS = [json.loads(line) for line in TINY_I2V_PROMPTS.read_text().splitlines()]
PIPE_TEXT = dict(prompt_template=TINY_HUNYUAN_PROMPT_TEMPLATE, max_sequence_length=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding both tiny folders, written once by `tiny_model_dir`."""
    root = tmp_path_factory.mktemp("tiny-hunyuan-cache")
    for family in FAMILIES:
        tiny_model_dir(family, cache_root=root)
    return root


@pytest.fixture(scope="module")
def folders(cache_root: Path) -> dict[str, Path]:
    return {family: tiny_model_dir(family, cache_root=cache_root) for family in FAMILIES}


@pytest.fixture(scope="module")
def adapters(folders: dict[str, Path]) -> dict[str, HunyuanVideoAdapter]:
    """Base adapters for tests that do not modify them."""
    return {family: load(folders[family], family) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipes(folders: dict[str, Path]) -> dict[str, Any]:
    return {family: load_pipe(folders[family], family) for family in FAMILIES}


@pytest.fixture
def sample_with_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the VAE posterior's `sample` return its mean, the conditioning the adapter takes
    (SkyReels' pipeline samples the image latents with the call's generator)."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def load(folder: Path, family: str = "hunyuan", **kwargs: Any) -> HunyuanVideoAdapter:
    return ADAPTERS[family].from_pretrained(folder, dtype=torch.float32, device="cpu", **kwargs)


def load_pipe(folder: Path, family: str, **components: Any) -> Any:
    pipe = PIPELINES[family].from_pretrained(folder, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(count: int) -> torch.Tensor:
    """The shipped conditioning images `[count, 3, 32, 32]` in [0, 1] (as the trainer loads them)."""
    return torch.stack([load_image(str(TINY_I2V_PROMPTS.parent / r["image"]), HEIGHT, WIDTH)
                        for r in RECORDS[:count]])


def generate(pipe: Any, family: str, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """3 denoising steps of the pipeline with the family's guidance: a video `[B, 9, 3, 32, 32]`
    (or the latents with output_type='latent')."""
    kwargs.setdefault("output_type", "pt")
    kwargs.setdefault("prompt", "a red ball rolling")
    args = dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=3,
                generator=torch.Generator().manual_seed(seed), **PIPE_TEXT, **kwargs)
    if family == "skyreels_i2v":
        args.setdefault("image", images(1))
        args.setdefault("negative_prompt", NEGATIVE)
    return pipe(**args).frames


def random_inputs(adapter: HunyuanVideoAdapter, batch: int, seed: int = 0,
                  negative: str | None = NEGATIVE) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Latents `[B, 4, 3, 4, 4]`, sigmas `[B]` and conditioning (the negative prompt's own branch;
    for SkyReels the images' latents) for the tiny models."""
    g = torch.Generator().manual_seed(seed)
    shape = adapter.latent_shape(FRAMES, HEIGHT, WIDTH)
    x = torch.randn(batch, *shape, generator=g)
    sigma = torch.rand(batch, generator=g)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    extra = {}
    if adapter.needs_image:
        image = images(3)[torch.arange(batch) % 3]
        extra = adapter.image_conditioning(image, shape)
    neg = None if negative is None else adapter.encode_prompts([negative]).expand(batch)
    return x, sigma, Conditioning(adapter.encode_prompts(prompts), negative=neg, extra=extra)


def euler(adapter: HunyuanVideoAdapter, sigmas: torch.Tensor, noise: torch.Tensor, cond: Conditioning,
          guidance_scale: float, embedded_guidance: float) -> torch.Tensor:
    """Deterministic flow-matching Euler sampling with the adapter's velocity over `sigmas [N+1]`."""
    x = noise.clone()
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            v = adapter.velocity(x, sigmas[i].expand(len(x)), cond, guidance_scale, embedded_guidance)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


# ---- loading -----------------------------------------------------------------------------
def test_loads_into_adapter_and_pipeline(adapters: dict[str, HunyuanVideoAdapter], pipes: dict[str, Any],
                                         folders: dict[str, Path]) -> None:
    for family in FAMILIES:
        adapter = adapters[family]
        assert get_adapter(family) is ADAPTERS[family] and adapter.family == family
        assert adapter.prompt_template == TINY_HUNYUAN_PROMPT_TEMPLATE and adapter.max_sequence_length == 16
        assert json.loads((folders[family] / TEXT_SETTINGS_FILE).read_text()) == {
            **TINY_HUNYUAN_PROMPT_TEMPLATE, "max_sequence_length": 16}
        for module in (adapter.vae, adapter.text_encoder, adapter.text_encoder_2, adapter.transformer):
            assert not module.training and not any(p.requires_grad for p in module.parameters())
        assert adapter.latent_shape(FRAMES, HEIGHT, WIDTH) == (4, 3, 4, 4)
        assert adapter.latent_shape(1, 48, 16) == (4, 1, 6, 2)
        blocks = [*adapter.transformer.transformer_blocks, *adapter.transformer.single_transformer_blocks]
        assert all(isinstance(b, adapter.block_classes) for b in blocks)
        assert not any(isinstance(m, adapter.block_classes) for m in adapter.transformer.context_embedder.modules())
        video = generate(pipes[family], family)
        assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH) and torch.isfinite(video).all() and video.std() > 0
    assert HunyuanVideoAdapter.default_embedded_guidance == 6.0 and SkyReelsI2VAdapter.default_embedded_guidance == 1.0
    assert SkyReelsI2VAdapter.needs_image and not HunyuanVideoAdapter.needs_image


def test_latent_shape_rejects_bad_sizes(adapters: dict[str, HunyuanVideoAdapter]) -> None:
    adapter = adapters["hunyuan"]
    with pytest.raises(ValueError, match="frames = 1 \\+ 4"):
        adapter.latent_shape(8, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="divisible by 16"):
        adapter.latent_shape(FRAMES, 24, WIDTH)


@pytest.mark.parametrize("component", HunyuanVideoAdapter.components)
def test_missing_component(folders: dict[str, Path], tmp_path: Path, component: str) -> None:
    folder = Path(shutil.copytree(folders["hunyuan"], tmp_path / "hunyuan"))
    shutil.rmtree(folder / component)
    with pytest.raises(ModelLoadError, match=component) as info:
        load(folder)
    assert str(folder) in str(info.value) and "huggingface-cli download" in str(info.value)


def test_broken_component_and_wrong_family(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(folders["hunyuan"], tmp_path / "hunyuan"))
    weights = folder / "text_encoder_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot load the hunyuan text_encoder_2"):
        load(folder)
    with pytest.raises(ModelLoadError, match="model.family=skyreels_i2v"):
        load(folders["skyreels_i2v"], "hunyuan")
    with pytest.raises(ModelLoadError, match="model.family=hunyuan"):
        load(folders["hunyuan"], "skyreels_i2v")
    with pytest.raises(ModelLoadError, match="Skywork/SkyReels-V1-Hunyuan-I2V"):
        load(tmp_path / "nowhere", "skyreels_i2v")
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "image_condition_type": "latent_concat"}))
    shutil.copy(folders["hunyuan"] / "text_encoder_2" / "model.safetensors", weights)
    with pytest.raises(ModelLoadError, match="HunyuanVideo-I2V"):
        load(folder)


def test_text_settings(folders: dict[str, Path], tmp_path: Path) -> None:
    """Without megaflow_text.json a folder gets HunyuanVideo's own template (crop_start 95); a broken
    file, or one without an integer crop_start, is refused."""
    assert read_text_settings(tmp_path) == (DEFAULT_PROMPT_TEMPLATE, 256)
    assert DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    assert read_text_settings(folders["hunyuan"]) == (TINY_HUNYUAN_PROMPT_TEMPLATE, 16)
    settings = tmp_path / TEXT_SETTINGS_FILE
    for content, problem in [('{"template": "{}", "crop_start": null}', "crops away every prompt token"),
                             ('{"template": "{}"}', "crop_start"),
                             ('{"template": "no slot", "crop_start": 0}', "one '\\{\\}'"),
                             ('{"template": "{}", "crop_start": 0, "max_len": 3}', "unknown key"),
                             ('{"template": "{}", "crop_start": 0, "max_sequence_length": 0}', "max_sequence_length"),
                             ("not json", "cannot be read")]:
        settings.write_text(content)
        with pytest.raises(ModelLoadError, match=problem):
            read_text_settings(tmp_path)
    settings.write_text('{"template": "video: {}", "crop_start": 2}')
    assert read_text_settings(tmp_path) == ({"template": "video: {}", "crop_start": 2}, 256)
    folder = Path(shutil.copytree(folders["hunyuan"], tmp_path / "hunyuan"))
    (folder / TEXT_SETTINGS_FILE).write_text('{"template": "{}", "crop_start": null}')
    with pytest.raises(ModelLoadError, match=TEXT_SETTINGS_FILE):
        load(folder)


# ---- text ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompts_matches_pipeline(family: str, adapters: dict[str, HunyuanVideoAdapter],
                                         pipes: dict[str, Any]) -> None:
    text = adapters[family].encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, pooled, mask = pipes[family].encode_prompt(PROMPTS, **PIPE_TEXT)
    assert text.embeds.shape == (4, 16, 16) and text.mask.shape == (4, 16) and text.pooled.shape == (4, 8)
    assert torch.equal(text.embeds, embeds) and torch.equal(text.mask, mask) and torch.equal(text.pooled, pooled)
    lengths = text.mask.sum(1).tolist()
    assert lengths[1] == 16 and lengths[3] == 1 and 1 < lengths[0] < lengths[2] < 16
    assert all(text.mask[i, :n].all() and not text.mask[i, n:].any() for i, n in enumerate(lengths))


def test_empty_mask_and_left_padding_are_refused(adapters: dict[str, HunyuanVideoAdapter]) -> None:
    base = adapters["hunyuan"]
    parts = dict(transformer=base.transformer, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                 text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, device=base.device, dtype=base.dtype)
    cropped = HunyuanVideoAdapter(**parts, prompt_template={"template": "{}", "crop_start": 4}, max_sequence_length=8)
    assert cropped.encode_prompts(["a cinematic shot of a city"]).mask.sum() > 0
    with pytest.raises(ValueError, match=f"no token left after cutting.*crop_start=4.*{TEXT_SETTINGS_FILE}"):
        cropped.encode_prompts(["a cinematic shot of a city", "a cat"])
    left = copy.deepcopy(base.tokenizer)
    left.padding_side = "left"
    padded_left = HunyuanVideoAdapter(**{**parts, "tokenizer": left}, prompt_template=TINY_HUNYUAN_PROMPT_TEMPLATE,
                                      max_sequence_length=16)
    with pytest.raises(ValueError, match="pads on the left"):
        padded_left.encode_prompts(["a cat"])


# ---- the transformer ----------------------------------------------------------------------
def test_forward_matches_a_direct_transformer_call(adapters: dict[str, HunyuanVideoAdapter],
                                                   pipes: dict[str, Any]) -> None:
    """The pipelines' conventions: timestep 1000·σ, mask as the transformer's dtype, guidance = scale·1000,
    SkyReels' input = [latents; image latents] on channels."""
    for family in FAMILIES:
        adapter, pipe = adapters[family], pipes[family]
        x, sigma, cond = random_inputs(adapter, 2)
        with torch.no_grad():
            embeds, pooled, mask = pipe.encode_prompt(PROMPTS[:2], **PIPE_TEXT)
            hidden = x if family == "hunyuan" else torch.cat([x, cond.extra["image_latents"]], dim=1)
            expected = pipe.transformer(hidden_states=hidden, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                        encoder_attention_mask=mask.to(torch.float32), pooled_projections=pooled,
                                        guidance=torch.tensor([3.5, 3.5]) * 1000.0, return_dict=False)[0]
            got = adapter.forward_transformer(x, sigma * 1000, cond.text, cond.extra, torch.full((2,), 3.5))
            other = adapter.forward_transformer(x, sigma * 1000, cond.text, cond.extra, torch.full((2,), 1.0))
        assert torch.equal(got, expected) and got.shape == x.shape
        assert not torch.allclose(got, other)  # the guidance input matters
        with pytest.raises(ValueError, match="guidance-distilled.*sampling.embedded_guidance"):
            adapter.forward_transformer(x, sigma * 1000, cond.text, cond.extra, None)
        with pytest.raises(ValueError, match="mask and pooled"):
            adapter.forward_transformer(x, sigma * 1000, TextConditioning(cond.text.embeds), cond.extra, sigma)
    base = adapters["hunyuan"]
    x, sigma, cond = random_inputs(base, 2)
    with pytest.raises(ValueError, match="extra"):
        base.forward_transformer(x, sigma * 1000, cond.text, {"image_latents": x}, sigma)
    undistilled = HunyuanVideoTransformer3DModel.from_config({**base.transformer.config, "guidance_embeds": False})
    adapter = HunyuanVideoAdapter(undistilled, base.vae, base.text_encoder, base.tokenizer, base.text_encoder_2,
                                  base.tokenizer_2, device=base.device, dtype=base.dtype)
    with pytest.raises(ValueError, match="no guidance embedder"):
        adapter.forward_transformer(x, sigma * 1000, cond.text, {}, sigma)
    assert adapter.forward_transformer(x, sigma * 1000, cond.text, {}, None).shape == x.shape


@pytest.mark.parametrize("cfg", [False, True])
def test_hunyuan_sampling_matches_pipeline(adapters: dict[str, HunyuanVideoAdapter], pipes: dict[str, Any],
                                           cfg: bool) -> None:
    """Euler sampling with the adapter's velocity reproduces HunyuanVideoPipeline's latents: embedded
    guidance 6.0 alone, and with true CFG against a negative prompt (its own mask and pooled vector)."""
    adapter, pipe = adapters["hunyuan"], pipes["hunyuan"]
    noise = torch.randn(2, *adapter.latent_shape(FRAMES, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(5))
    prompts = PROMPTS[:2]
    extra = dict(negative_prompt=NEGATIVE, true_cfg_scale=3.0) if cfg else {}
    expected = generate(pipe, "hunyuan", prompt=prompts, latents=noise, output_type="latent", guidance_scale=6.0,
                        **extra)
    negative = adapter.encode_prompts([NEGATIVE]).expand(2) if cfg else None
    cond = Conditioning(adapter.encode_prompts(prompts), negative=negative)
    got = euler(adapter, pipe.scheduler.sigmas, noise, cond, 3.0 if cfg else 1.0, 6.0)
    if not cfg:
        assert torch.equal(got, expected)
    # CFG: one batch of 2B vs the pipeline's two calls of B, GEMM rounding only (measured 8e-7 of 4.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_skyreels_sampling_matches_pipeline(adapters: dict[str, HunyuanVideoAdapter], pipes: dict[str, Any],
                                            sample_with_mode: None) -> None:
    """True CFG 6.0, embedded guidance 1.0 and the image latents concatenated on channels reproduce
    HunyuanSkyreelsImageToVideoPipeline's latents."""
    adapter, pipe = adapters["skyreels_i2v"], pipes["skyreels_i2v"]
    shape = adapter.latent_shape(FRAMES, HEIGHT, WIDTH)
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
    image = images(2)
    expected = generate(pipe, "skyreels_i2v", prompt=PROMPTS[:2], image=image, latents=noise, output_type="latent",
                        true_cfg_scale=6.0, guidance_scale=1.0)
    cond = Conditioning(adapter.encode_prompts(PROMPTS[:2]), negative=adapter.encode_prompts([NEGATIVE]).expand(2),
                        extra=adapter.image_conditioning(image, shape))
    got = euler(adapter, pipe.scheduler.sigmas, noise, cond, 6.0, 1.0)
    # one batch of 2B vs the pipeline's two calls of B: GEMM rounding only (measured 2e-6 of 3.8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_cfg_equals_two_calls_with_the_negatives_own_mask_and_pooled(
        family: str, adapters: dict[str, HunyuanVideoAdapter]) -> None:
    adapter = adapters[family]
    x, sigma, cond = random_inputs(adapter, 2)
    g = torch.full((2,), 6.0)
    neg = cond.negative
    assert not torch.equal(neg.mask, cond.text.mask) and not torch.equal(neg.pooled, cond.text.pooled)
    with torch.no_grad():
        v = adapter.velocity(x, sigma, cond, guidance_scale=4.5, embedded_guidance=6.0)
        v_u = adapter.forward_transformer(x, sigma * 1000, neg, cond.extra, g)
        v_c = adapter.forward_transformer(x, sigma * 1000, cond.text, cond.extra, g)
        v_plain = adapter.velocity(x, sigma, cond, guidance_scale=1.0, embedded_guidance=6.0)
        # the unconditional half with the positive branch's mask or pooled vector is a different velocity
        for swapped in (TextConditioning(neg.embeds, cond.text.mask, neg.pooled),
                        TextConditioning(neg.embeds, neg.mask, cond.text.pooled)):
            wrong = adapter.velocity(x, sigma, Conditioning(cond.text, swapped, cond.extra), 4.5, 6.0)
            assert (wrong - v).abs().max() > 1e-4
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_plain, v_c, rtol=0, atol=0)
    assert not torch.allclose(v_u, v_c)


@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_rows_independent(family: str, adapters: dict[str, HunyuanVideoAdapter]) -> None:
    adapter = adapters[family]
    x, sigma, cond = random_inputs(adapter, 4, seed=1)
    x2, sigma2, cond2 = random_inputs(adapter, 4, seed=2)
    order = torch.arange(3, -1, -1)
    with torch.no_grad():
        v = adapter.velocity(x, sigma, cond, guidance_scale=5.0, embedded_guidance=6.0)
        for row in range(4):
            others = torch.arange(4) != row
            xm, sm = x.clone(), sigma.clone()
            xm[others], sm[others] = x2[others], sigma2[others]
            text = cond.text.select(torch.where(others, order, torch.arange(4)))
            extra = {k: torch.where(others.view(-1, 1, 1, 1, 1), t.flip(0), t) for k, t in cond.extra.items()}
            vm = adapter.velocity(xm, sm, Conditioning(text, cond.negative, extra), 5.0, 6.0)
            assert torch.equal(vm[row], v[row])
            assert not torch.equal(vm[others], v[others])


def test_bf16_transformer_with_lora(folders: dict[str, Path]) -> None:
    adapter = load(folders["skyreels_i2v"], "skyreels_i2v", transformer_dtype=torch.bfloat16)
    assert adapter.transformer_dtype == torch.bfloat16
    adapter.apply_lora(rank=4, alpha=4)
    x, sigma, cond = random_inputs(adapter, 2)
    v = adapter.velocity(x, sigma, cond, guidance_scale=6.0, embedded_guidance=1.0)
    assert v.dtype == torch.float32 and v.shape == x.shape and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in adapter.trainable_parameters())


# ---- SkyReels image conditioning ----------------------------------------------------------
def test_image_conditioning_matches_pipeline(adapters: dict[str, HunyuanVideoAdapter], pipes: dict[str, Any],
                                             sample_with_mode: None) -> None:
    adapter, pipe = adapters["skyreels_i2v"], pipes["skyreels_i2v"]
    shape = adapter.latent_shape(FRAMES, HEIGHT, WIDTH)
    image = images(3)
    extra = adapter.image_conditioning(image, shape)
    assert set(extra) == {"image_latents"} and extra["image_latents"].shape == (3, 4, 3, 4, 4)
    assert extra["image_latents"].dtype == torch.float32
    with torch.no_grad():
        pixels = pipe.video_processor.preprocess(image, height=HEIGHT, width=WIDTH)
        _, expected = pipe.prepare_latents(pixels, 3, 4, HEIGHT, WIDTH, FRAMES, torch.float32, torch.device("cpu"),
                                           torch.Generator().manual_seed(0))
    assert torch.equal(extra["image_latents"], expected)
    assert extra["image_latents"][:, :, 0].abs().amin(dim=(1, 2, 3)).gt(0).all()
    assert not extra["image_latents"][:, :, 1:].any()
    with pytest.raises(ValueError, match="32, 32"):
        adapter.image_conditioning(image[..., :16], shape)


def test_the_image_reaches_the_transformer(adapters: dict[str, HunyuanVideoAdapter]) -> None:
    adapter = adapters["skyreels_i2v"]
    x, sigma, cond = random_inputs(adapter, 2)
    shape = adapter.latent_shape(FRAMES, HEIGHT, WIDTH)
    swapped = Conditioning(cond.text, cond.negative, adapter.image_conditioning(images(3)[[2, 0]], shape))
    with torch.no_grad():
        v = adapter.velocity(x, sigma, cond, guidance_scale=6.0, embedded_guidance=1.0)
        w = adapter.velocity(x, sigma, swapped, guidance_scale=6.0, embedded_guidance=1.0)
    assert ((v - w).abs().amax(dim=(1, 2, 3, 4)) > 1e-4).all()
    with pytest.raises(ValueError, match="image_latents"):
        adapter.forward_transformer(x, sigma * 1000, cond.text, {}, sigma)
    with pytest.raises(ValueError, match="do not match"):
        adapter.forward_transformer(x, sigma * 1000, cond.text, {"image_latents": x[:, :, :1]}, sigma)


# ---- training weights ---------------------------------------------------------------------
def lora_modules(transformer: torch.nn.Module) -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_roundtrip(family: str, folders: dict[str, Path], pipes: dict[str, Any], tmp_path: Path) -> None:
    """Default targets: the dual and single blocks' attention projections, not the token refiner nor
    the output layer; the saved file loads into the family pipeline unchanged and changes its output."""
    adapter = load(folders[family], family)
    x, sigma, cond = random_inputs(adapter, 2)
    scales = (6.0, 1.0) if family == "skyreels_i2v" else (1.0, 6.0)
    with torch.no_grad():
        v_base = adapter.velocity(x, sigma, cond, *scales)
    adapter.apply_lora(rank=4, alpha=8)
    dual = [f"transformer_blocks.0.attn.{n}" for n in
            ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    single = [f"single_transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")]
    assert lora_modules(adapter.transformer) == set(dual + single)
    assert adapter.lora_config.target_modules == HUNYUAN_LORA_TARGETS
    trainable = {n: p for n, p in adapter.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainable.items():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        v_lora = adapter.velocity(x, sigma, cond, *scales)
        with adapter.reference_mode():
            v_ref = adapter.velocity(x, sigma, cond, *scales)
    assert torch.equal(v_ref, v_base) and not torch.allclose(v_lora, v_base, atol=1e-3)
    adapter.save_trainable(tmp_path / "lora")

    lora_pipe = load_pipe(folders[family], family)
    lora_pipe.load_lora_weights(tmp_path / "lora")
    (name,) = lora_pipe.transformer.peft_config
    saved, loaded = get_peft_model_state_dict(adapter.transformer), get_peft_model_state_dict(
        lora_pipe.transformer, adapter_name=name)
    assert saved.keys() == loaded.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert lora_modules(lora_pipe.transformer) == set(dual + single)
    with torch.no_grad():
        g_in = torch.full((2,), scales[1])
        v_pipe = lora_pipe.transformer(
            hidden_states=adapter.transformer_inputs(x, cond.extra), timestep=sigma * 1000,
            encoder_hidden_states=cond.text.embeds, encoder_attention_mask=cond.text.mask.float(),
            pooled_projections=cond.text.pooled, guidance=g_in * 1000.0, return_dict=False)[0]
        v_cond = adapter.forward_transformer(x, sigma * 1000, cond.text, cond.extra, g_in)
    torch.testing.assert_close(v_pipe, v_cond, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(generate(lora_pipe, family), generate(pipes[family], family), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_roundtrip(family: str, folders: dict[str, Path], adapters: dict[str, HunyuanVideoAdapter],
                                 tmp_path: Path) -> None:
    tuned = load(folders[family], family)
    x, sigma, cond = random_inputs(tuned, 2)
    tuned.enable_full_finetune(keep_reference=True)
    params = list(tuned.transformer.parameters())
    assert tuned.trainable_parameters() == params and all(p.requires_grad for p in params)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        v_tuned = tuned.velocity(x, sigma, cond, 3.0, 6.0)
        with tuned.reference_mode():
            v_ref = tuned.velocity(x, sigma, cond, 3.0, 6.0)
        v_base = adapters[family].velocity(x, sigma, cond, 3.0, 6.0)
    assert torch.equal(v_ref, v_base) and not torch.allclose(v_tuned, v_base, atol=1e-3)
    tuned.save_trainable(tmp_path / "ft")
    loaded = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "ft" / "transformer")
    expected, got = tuned.transformer.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    video = generate(load_pipe(folders[family], family, transformer=loaded), family)
    assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH) and torch.isfinite(video).all()


@pytest.mark.parametrize("lora", [True, False])
def test_load_trainable_restores_what_save_trainable_wrote(folders: dict[str, Path],
                                                           adapters: dict[str, HunyuanVideoAdapter],
                                                           tmp_path: Path, lora: bool) -> None:
    trained = load(folders["hunyuan"])
    if lora:
        trained.apply_lora(rank=4, alpha=8)
    else:
        trained.enable_full_finetune(keep_reference=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    trained.save_trainable(tmp_path)
    restored = load(folders["hunyuan"])
    restored.load_trainable(tmp_path, lora=lora)
    x, sigma, cond = random_inputs(trained, 2)
    with torch.no_grad():
        expected = trained.velocity(x, sigma, cond, 1.0, 6.0)
        got = restored.velocity(x, sigma, cond, 1.0, 6.0)
        base = adapters["hunyuan"].velocity(x, sigma, cond, 1.0, 6.0)
    assert not torch.allclose(expected, base)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in restored.transformer.parameters())


# ---- the trainer --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_recipe_trains_and_exports(family: str, cache_root: Path, folders: dict[str, Path],
                                        pipes: dict[str, Any], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`megaflow train --config tiny_<family>` in process (model.path=tiny from the cache): the
    family's guidance, an on-policy first iteration, finite rewards, for SkyReels the images in the
    reward metadata, and a checkpoint whose export loads into the family pipeline and changes its output."""
    from megaflow.trainer.export import export_checkpoint
    from megaflow.trainer.loop import Trainer

    monkeypatch.setenv("MEGAFLOW_CACHE", str(cache_root))
    cfg = load_config(f"tiny_{family}", [f"output_dir={tmp_path / 'run'}", "train.iterations=1",
                                         "train.sample_every=0", "train.lr=3e-2"])
    assert cfg.model.path == "tiny" and resolve_model_path(cfg.model.path, family) == folders[family]
    trainer = Trainer(cfg, show_progress=False)
    if family == "hunyuan":
        assert trainer.settings.embedded_guidance == 6.0 and not trainer.use_cfg
    else:
        assert trainer.settings.embedded_guidance == 1.0 and trainer.settings.guidance_scale == 6.0
        assert trainer.negative is not None
    score, seen = trainer.rewards.score, []

    def spy(videos: torch.Tensor, prompts: list[str], meta: list[dict]) -> RewardScores:
        seen.extend((p, m.get("image")) for p, m in zip(prompts, meta))
        assert videos.shape[1:] == (FRAMES, 3, HEIGHT, WIDTH)
        return score(videos, prompts, meta)

    trainer.rewards.score = spy
    (metrics,) = trainer.train()
    assert metrics["policy/ratio_max_dev"] == 0.0 and metrics["optim/grad_norm"] > 0
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("reward/mean", "reward/std", "loss/total"))
    assert len(seen) == 8
    if family == "skyreels_i2v":
        by_prompt = {r["prompt"]: load_image(str(TINY_I2V_PROMPTS.parent / r["image"]), HEIGHT, WIDTH)
                     for r in RECORDS}
        assert all(torch.equal(image, by_prompt[prompt]) for prompt, image in seen)
    else:
        assert all(image is None for _, image in seen)

    exported = export_checkpoint(tmp_path / "run" / "checkpoints" / "iteration_000001", tmp_path / "export")
    tuned = load_pipe(folders[family], family)
    tuned.load_lora_weights(exported)
    assert lora_modules(tuned.transformer) == lora_modules(trainer.adapter.transformer)
    assert (generate(tuned, family) - generate(pipes[family], family)).abs().max() > 1e-6
