"""Real-size models with random weights, for benchmarks and the capacity planner.

Every family megaflow trains is built from its real transformer `config.json` (`megaflow.models.real`),
optionally shrunk by a `Scale` (width: attention heads with the head dimension kept, FFN and
text-embedding widths, VAE channels; depth: transformer blocks of every kind), so the same code runs
at 14B on an accelerator and at a few million parameters on one CPU core.

`random_model_folder` writes a diffusers-format folder the family's adapter loads with its normal
`from_pretrained`, except the transformer: `transformer/` holds only the scaled `config.json` and a
marker (`RANDOM_MARKER`), no weights. The VAE is the family's real VAE class and structure (channels
scaled); the text encoders are tiny-depth encoders whose output widths are what the scaled
transformer reads, with the tiny tokenizers at the real text lengths.

`random_transformer_loader` builds the transformer on the meta device, materialises it straight on
the target device and initialises every parameter there from a generator seeded by `(seed,
parameter name)`, so the weights are identical on every rank, in every ZeRO layout
(`megaflow.parallel.engine.zero3_transformer_loader(weights=False)` uses the same rule) and for the
KL reference copy, and a 14B model never sits whole in host memory.

Model paths `random:NAME` / `random:NAME@SCALE` (`megaflow.models.resolve_model_path`) name these
folders, e.g. `random:wan2.1_t2v_1.3b@width=0.25,depth=0.1`.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from megaflow.errors import ConfigError
from megaflow.models.base import diffusers_param_dtype, meta_build
from megaflow.models.real import REAL_MODELS, RealModel

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

#: The marker file in `transformer/` of a random folder: `{"name", "scale"}`, no weights beside it.
RANDOM_MARKER = "megaflow_random.json"
#: Prefix of `model.path` naming a random folder: `random:NAME` or `random:NAME@SCALE`.
RANDOM_PREFIX = "random:"
#: Bumped when what `random_model_folder` writes changes (part of the cached folder's name).
_FOLDER_VERSION = 1
#: Seed of the frozen parts' random weights (VAE, text and image encoders).
_FROZEN_SEED = 0
#: Text lengths the random folders' tokenizers pad to (the released models' lengths).
WAN_TEXT_LENGTH = 512
HUNYUAN_TEXT_LENGTH = 256
T5_TEXT_LENGTH = 512
#: The released CLIP ViT-H/14 of Wan I2V: 224² images, 14² patches (257 image tokens).
_WAN_IMAGE_SIZE, _WAN_IMAGE_PATCH = 224, 14
#: Released VAE widths and scaling of FLUX.1 and SD3.5 (`AutoencoderKL`).
_IMAGE_VAE_CHANNELS = (128, 256, 512, 512)
_IMAGE_VAE_FACTORS = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}
#: CLIP-L / CLIP-G pooled widths SD3's `pooled_projection_dim` (2048) is the concatenation of.
_SD3_POOLED = (768, 1280)


@dataclass(frozen=True)
class Scale:
    """How much a real model is shrunk: `width` multiplies attention heads (head dim kept, so rotary
    axes stay valid), FFN / MLP width, text-embedding dims and VAE channels; `depth` multiplies the
    number of transformer blocks of each kind (at least 1)."""

    width: float = 1.0
    depth: float = 1.0

    def __post_init__(self) -> None:
        for key in ("width", "depth"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 < value <= 1:
                raise ConfigError(f"Scale {key} must be a number in (0, 1] (a fraction of the real model), "
                                  f"got {value!r}")
            object.__setattr__(self, key, float(value))

    @classmethod
    def parse(cls, text: str) -> "Scale":
        """`"1"`, `"0.25"` (width and depth) or `"width=0.25,depth=0.1"` (either key may be left out:
        1); `ConfigError` naming the accepted forms otherwise."""
        def number(raw: str) -> float:
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(f"bad scale {text!r}: {raw.strip()!r} is not a number; write a fraction such as "
                                  "0.25, or width=0.25,depth=0.1") from None

        text = str(text).strip()
        if not text:
            raise ConfigError("empty scale; write a fraction such as 0.25, or width=0.25,depth=0.1")
        if "=" not in text:
            value = number(text)
            return cls(value, value)
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in ("width", "depth"):
                raise ConfigError(f"bad scale {text!r}: {part.strip()!r} is not width=X or depth=X; write e.g. "
                                  "width=0.25,depth=0.1")
            if key in values:
                raise ConfigError(f"bad scale {text!r}: {key} is given twice")
            values[key] = number(raw)
        return cls(**values)

    def __str__(self) -> str:
        return f"w{_number(self.width)}-d{_number(self.depth)}"

    @property
    def label(self) -> str:
        """The scale in `parse`'s syntax: `Scale.parse(s.label) == s`."""
        return f"width={_number(self.width)},depth={_number(self.depth)}"


def _number(value: float) -> str:
    """The shortest text that reads back as `value` (`1.0` → `"1"`)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _heads(heads: int, width: float) -> int:
    """Attention heads × `width`, rounded to a multiple of 2 (at least 2) so sp=2 divides them."""
    return max(2, 2 * round(heads * width / 2))


def _width(dim: int, width: float, multiple: int = 16) -> int:
    """A width × `width`, rounded to a multiple of `multiple` (at least `multiple`)."""
    return max(multiple, multiple * round(dim * width / multiple))


def _depth(layers: int, depth: float) -> int:
    """Blocks × `depth`, rounded, at least 1 (0 stays 0)."""
    return 0 if layers == 0 else max(1, round(layers * depth))


def real_model(name: str) -> RealModel:
    """The `REAL_MODELS` entry `name`; `ConfigError` listing the valid names otherwise."""
    try:
        return REAL_MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown real model {name!r}; valid names: {', '.join(sorted(REAL_MODELS))}") from None


def real_model_of_recipe(recipe: str) -> RealModel:
    """The `REAL_MODELS` entry whose built-in recipe is `recipe`; `ConfigError` listing them otherwise."""
    for model in REAL_MODELS.values():
        if model.recipe == recipe:
            return model
    raise ConfigError(f"no real model has the recipe {recipe!r}; recipes of real models: "
                      f"{', '.join(sorted(m.recipe for m in REAL_MODELS.values()))}")


def scaled_transformer_config(name: str, scale: Scale) -> dict[str, Any]:
    """The transformer `config.json` of real model `name` shrunk by `scale` (`_class_name` kept):
    heads × width (multiple of 2, at least 2; head dim kept), FFN / text / pooled / image widths ×
    width (multiples of 16), blocks of every kind × depth (at least 1)."""
    config = real_model(name).config()
    w, d = scale.width, scale.depth
    heads = _heads(int(config["num_attention_heads"]), w)
    config["num_attention_heads"] = heads
    inner = heads * int(config["attention_head_dim"])
    cls = config["_class_name"]
    if cls == "WanTransformer3DModel":
        config["ffn_dim"] = _width(config["ffn_dim"], w)
        config["text_dim"] = _width(config["text_dim"], w)
        config["num_layers"] = _depth(config["num_layers"], d)
        if config.get("image_dim") is not None:
            config["image_dim"] = _width(config["image_dim"], w)
            config["added_kv_proj_dim"] = inner
    elif cls == "HunyuanVideoTransformer3DModel":
        config["text_embed_dim"] = _width(config["text_embed_dim"], w)
        config["pooled_projection_dim"] = _width(config["pooled_projection_dim"], w)
        for key in ("num_layers", "num_single_layers", "num_refiner_layers"):
            config[key] = _depth(config[key], d)
    elif cls == "FluxTransformer2DModel":
        config["joint_attention_dim"] = _width(config["joint_attention_dim"], w)
        config["pooled_projection_dim"] = _width(config["pooled_projection_dim"], w)
        for key in ("num_layers", "num_single_layers"):
            config[key] = _depth(config[key], d)
    elif cls == "SD3Transformer2DModel":
        config["joint_attention_dim"] = _width(config["joint_attention_dim"], w)
        config["caption_projection_dim"] = inner
        config["pooled_projection_dim"] = sum(_width(p, w) for p in _SD3_POOLED)
        layers = _depth(config["num_layers"], d)
        dual = list(config.get("dual_attention_layers") or ())
        config["num_layers"] = layers
        config["dual_attention_layers"] = list(range(min(layers, _depth(len(dual), d))))
    else:
        raise ConfigError(f"cannot scale a {cls} ({name}); random models exist for {', '.join(sorted(REAL_MODELS))}")
    return config


# ---- the folder -------------------------------------------------------------------------------


def random_folder_name(name: str, scale: Scale) -> str:
    """The cached folder's name of `name` at `scale` (filesystem-safe)."""
    return f"random-{name}-{scale}-v{_FOLDER_VERSION}"


def random_model_folder(name: str, scale: Scale = Scale(), *, cache_root: str | Path | None = None) -> Path:
    """The random-weight diffusers folder of real model `name` at `scale`, written once (atomically)
    into `cache_root`, else `$MEGAFLOW_CACHE`, else `~/.cache/megaflow`. Its `transformer/` holds
    the scaled `config.json` and `RANDOM_MARKER` only: load it with `random_transformer_loader`."""
    from megaflow.models.tiny import cached_folder

    real_model(name)
    return cached_folder(random_folder_name(name, scale), "megaflow.models.random_model:write_random_model",
                         [name, scale.label], cache_root)


def is_random_folder(path: str | Path) -> bool:
    """Whether `path` is a folder `random_model_folder` wrote (its transformer has no weights)."""
    return (Path(path) / "transformer" / RANDOM_MARKER).is_file()


def resolve_random_path(path: str, family: str) -> Path:
    """The folder of a `random:NAME[@SCALE]` model path for `family`; `ConfigError` for an unknown
    name or one of another family (naming the valid ones) and for a bad scale."""
    spec = path[len(RANDOM_PREFIX):]
    name, sep, scale_text = spec.partition("@")
    name = name.strip()
    matching = sorted(n for n, m in REAL_MODELS.items() if m.family == family)
    if name not in REAL_MODELS or REAL_MODELS[name].family != family:
        what = "unknown model" if name not in REAL_MODELS else f"a {REAL_MODELS[name].family} model"
        valid = ", ".join(f"random:{n}" for n in matching) or f"none (family {family!r} has no real model)"
        raise ConfigError(f"model.path={path!r} names {what} {name!r}, but model.family={family!r}; valid paths: "
                          f"{valid} (optionally @SCALE, e.g. @0.25 or @width=0.25,depth=0.1)")
    scale = Scale.parse(scale_text) if sep else Scale()
    return random_model_folder(name, scale)


def write_random_model(name: str, scale: Scale | str, folder: str | Path) -> Path:
    """Write the random folder of `name` at `scale` into `folder` (see `random_model_folder`): the
    pipeline's `save_pretrained` without a transformer, then `transformer/` with the scaled config
    and the marker. The frozen parts' random weights (seeded, the same in every process) are saved
    in bf16."""
    folder = Path(folder)
    scale = Scale.parse(scale) if isinstance(scale, str) else scale
    model = real_model(name)
    config = scaled_transformer_config(name, scale)
    build = _BUILDERS.get(model.family)
    if build is None:
        raise ConfigError(f"random models of family {model.family!r} are not supported; supported families: "
                          f"{', '.join(sorted(_BUILDERS))}")
    pipeline = build(config, scale, _FROZEN_SEED)
    for module in pipeline.components.values():
        if isinstance(module, nn.Module):
            module.to(torch.bfloat16)
    pipeline.save_pretrained(folder, safe_serialization=True)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = ["diffusers", config["_class_name"]]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    transformer = folder / "transformer"
    transformer.mkdir(exist_ok=True)
    import diffusers

    (transformer / "config.json").write_text(
        json.dumps({**config, "_diffusers_version": diffusers.__version__}, indent=2) + "\n")
    (transformer / RANDOM_MARKER).write_text(json.dumps({"name": name, "scale": scale.label}, indent=2) + "\n")
    if model.family in ("hunyuan", "skyreels_i2v"):
        from megaflow.models.hunyuan import write_text_settings
        from megaflow.models.tiny import TINY_HUNYUAN_PROMPT_TEMPLATE

        write_text_settings(folder, TINY_HUNYUAN_PROMPT_TEMPLATE, HUNYUAN_TEXT_LENGTH)
    return folder


def _seeded_build(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with torch's CPU generator seeded to `seed` (restored afterwards), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _group_width(dim: int, width: float, groups: int) -> int:
    """A VAE width × `width`, a multiple of its GroupNorm `groups` (at least `groups`)."""
    return max(groups, groups * round(dim * width / groups))


def released_vae(family: str, scale: Scale = Scale()) -> nn.Module:
    """The family's released VAE structure with widths × `scale.width` (`Scale()`: the real one),
    built in the current device context (`torch.device("meta")`: shapes only):
    Wan 2.1's `AutoencoderKLWan` (base width 96, a multiple of 8; RMS norms, no groups),
    HunyuanVideo's `AutoencoderKLHunyuanVideo` (channels multiples of its 32 groups), or FLUX.1 /
    SD3.5's `AutoencoderKL` (`_image_vae`)."""
    if family in ("wan", "wan_i2v"):
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan(base_dim=_width(96, scale.width, 8))
    if family in ("hunyuan", "skyreels_i2v"):
        from diffusers import AutoencoderKLHunyuanVideo

        return AutoencoderKLHunyuanVideo(block_out_channels=tuple(_group_width(c, scale.width, 32)
                                                                  for c in (128, 256, 512, 512)))
    if family in ("flux", "sd3"):
        return _image_vae(family, scale)
    raise ConfigError(f"no released VAE is known for model family '{family}'")


def _build_wan(config: dict[str, Any], scale: Scale, seed: int) -> DiffusionPipeline:
    """Wan 2.1 T2V / I2V: the released VAE (`released_vae`), a 1-layer UMT5 of width `text_dim`,
    and for I2V a 2-layer CLIP-vision encoder of width `image_dim` (257 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    from megaflow.models.tiny import _build_tokenizer, _umt5

    tokenizer = _build_tokenizer(WAN_TEXT_LENGTH)
    vae = _seeded_build(seed + 1, lambda: released_vae("wan", scale))
    text_encoder = _seeded_build(seed + 2, lambda: _umt5(tokenizer, config["text_dim"], d_kv=16, d_ff=32,
                                                         num_layers=1, num_heads=1))
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=None)
    if config.get("image_dim") is None:
        return WanPipeline(**parts)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    image_encoder = _seeded_build(seed + 3, lambda: CLIPVisionModel(CLIPVisionConfig(
        hidden_size=config["image_dim"], intermediate_size=32, num_hidden_layers=2, num_attention_heads=1,
        image_size=_WAN_IMAGE_SIZE, patch_size=_WAN_IMAGE_PATCH, projection_dim=config["image_dim"],
        hidden_act="gelu")))
    processor = CLIPImageProcessor(size={"shortest_edge": _WAN_IMAGE_SIZE},
                                   crop_size={"height": _WAN_IMAGE_SIZE, "width": _WAN_IMAGE_SIZE})
    return WanImageToVideoPipeline(**parts, image_encoder=image_encoder, image_processor=processor)


def _build_hunyuan(config: dict[str, Any], scale: Scale, seed: int) -> DiffusionPipeline:
    """HunyuanVideo T2V / SkyReels-V1 I2V: the released VAE (`released_vae`), a 3-layer Llama of
    width `text_embed_dim` (the pipeline reads `hidden_states[-3]`) and a 1-layer CLIP-L of width
    `pooled_projection_dim`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoPipeline

    from megaflow.models.tiny import _build_clip_tokenizer, _build_tokenizer, _clip_text, _llama

    tokenizer, tokenizer_2 = _build_tokenizer(HUNYUAN_TEXT_LENGTH), _build_clip_tokenizer()
    vae = _seeded_build(seed + 1, lambda: released_vae("hunyuan", scale))
    text_encoder = _seeded_build(seed + 2, lambda: _llama(tokenizer, config["text_embed_dim"], intermediate=32,
                                                          heads=1, head_dim=16))
    text_encoder_2 = _seeded_build(seed + 3, lambda: _clip_text(tokenizer_2, config["pooled_projection_dim"], layers=1,
                                                                heads=1, intermediate=32))
    pipeline = (HunyuanVideoPipeline if config["in_channels"] == config["out_channels"]
                else HunyuanSkyreelsImageToVideoPipeline)
    return pipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=None, vae=vae,
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
                    tokenizer_2=tokenizer_2)


def _image_vae(family: str, scale: Scale) -> nn.Module:
    """The released FLUX.1 / SD3.5 `AutoencoderKL` structure (channels × `width`, multiples of its
    32 groups; 16 latent channels, no quant convs) with the family's scaling and shift factors."""
    from diffusers import AutoencoderKL

    scaling, shift = _IMAGE_VAE_FACTORS[family]
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(_group_width(c, scale.width, 32) for c in _IMAGE_VAE_CHANNELS), layers_per_block=2,
        latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=scaling, shift_factor=shift,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def _build_flux(config: dict[str, Any], scale: Scale, seed: int) -> DiffusionPipeline:
    """FLUX.1: the released VAE structure, a 1-layer CLIP-L of width `pooled_projection_dim` (its
    `pooler_output` is the pooled vector) and a 1-layer T5 of width `joint_attention_dim`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from megaflow.models.tiny import _build_clip_tokenizer, _build_tokenizer, _clip_text, _t5

    tokenizer, tokenizer_2 = _build_clip_tokenizer(), _build_tokenizer(T5_TEXT_LENGTH)
    vae = _seeded_build(seed + 1, lambda: released_vae("flux", scale))
    text_encoder = _seeded_build(seed + 2, lambda: _clip_text(tokenizer, config["pooled_projection_dim"], layers=1,
                                                              heads=1, intermediate=32))
    text_encoder_2 = _seeded_build(seed + 3, lambda: _t5(tokenizer_2, config["joint_attention_dim"], d_kv=16, d_ff=32,
                                                         num_layers=1, num_heads=1))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=None)


def _build_sd3(config: dict[str, Any], scale: Scale, seed: int) -> DiffusionPipeline:
    """SD3.5: the released VAE structure, CLIP-L and CLIP-G (1 layer, hidden 16 each, projections
    = the scaled 768 / 1280 pooled widths), a 1-layer T5 of width `joint_attention_dim`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from megaflow.models.tiny import _build_clip_tokenizer, _build_tokenizer, _clip_text, _t5

    tokenizer, tokenizer_3 = _build_clip_tokenizer(), _build_tokenizer(T5_TEXT_LENGTH)
    pooled_l, pooled_g = (_width(p, scale.width) for p in _SD3_POOLED)
    vae = _seeded_build(seed + 1, lambda: released_vae("sd3", scale))
    text_encoder = _seeded_build(seed + 2, lambda: _clip_text(tokenizer, 16, pooled_l, layers=1, heads=1,
                                                              intermediate=32))
    text_encoder_2 = _seeded_build(seed + 3, lambda: _clip_text(tokenizer, 16, pooled_g, layers=1, heads=1,
                                                                intermediate=32))
    text_encoder_3 = _seeded_build(seed + 4, lambda: _t5(tokenizer_3, config["joint_attention_dim"], d_kv=16, d_ff=32,
                                                         num_layers=1, num_heads=1))
    return StableDiffusion3Pipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


_BUILDERS: dict[str, Callable[[dict[str, Any], Scale, int], "DiffusionPipeline"]] = {
    "wan": _build_wan,
    "wan_i2v": _build_wan,
    "hunyuan": _build_hunyuan,
    "skyreels_i2v": _build_hunyuan,
    "flux": _build_flux,
    "sd3": _build_sd3,
}


# ---- random weights -----------------------------------------------------------------------------


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of parameter `name` (a function of `seed` and the name alone, so every
    rank, layout and build order gives the parameter the same values)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_random_parameter(name: str, param: torch.Tensor, seed: int) -> None:
    """Fill `param` in place, on its device and in its dtype: biases 0, other 1-D parameters (norm
    weights) 1, the rest normal with std `1/sqrt(fan_in)` (`fan_in = shape[1] · prod(shape[2:])`,
    torch's convention for Linear `[out, in]` and conv weights), which keeps activations O(1)."""
    if name.rsplit(".", 1)[-1] == "bias":
        param.zero_()
    elif param.ndim <= 1:
        param.fill_(1.0)
    else:
        fan_in = param[0].numel()
        generator = torch.Generator(device=param.device).manual_seed(parameter_seed(seed, name))
        param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)


def random_transformer_loader(device: torch.device | str, *,
                              seed: int = 0) -> Callable[[type, Path, torch.dtype], nn.Module]:
    """A `transformer_loader(model_cls, folder, dtype)` (see `ModelAdapter.from_pretrained`) that
    builds the model from `folder/config.json` on the meta device, materialises it on `device` and
    fills every parameter there (`init_random_parameter`, seeded by `seed` and the parameter's
    name): dtypes as `from_pretrained(torch_dtype=dtype)` (keep-in-fp32 modules), the
    construction-time buffers (rotary tables) as a plain build computes them. On `device="meta"`
    the parameters stay meta (shapes only). Weights are never allocated on the host for an
    accelerator `device`."""
    device = torch.device(device)

    def load(model_cls: type, folder: Path, dtype: torch.dtype) -> nn.Module:
        config = model_cls.load_config(folder)
        model = meta_build(model_cls, config, dtype)
        buffers = dict(model.named_buffers())
        for module_name, module in model.named_modules():
            for key, param in list(module._parameters.items()):
                if param is None:
                    continue
                name = f"{module_name}.{key}" if module_name else key
                target = diffusers_param_dtype(model_cls, name, dtype) if param.is_floating_point() else param.dtype
                data = torch.empty(param.shape, dtype=target, device=device)
                if device.type != "meta":
                    init_random_parameter(name, data, seed)
                module._parameters[key] = nn.Parameter(data, requires_grad=param.requires_grad)
        for module_name, module in model.named_modules():
            for key, buf in list(module._buffers.items()):
                if buf is not None:
                    name = f"{module_name}.{key}" if module_name else key
                    module._buffers[key] = buffers[name].to(device)
        return model.eval()

    return load


def random_weights_seed(seed: int) -> int:
    """The seed of a random folder's transformer weights for a run seeded `seed` (`cfg.seed`): the
    same in every process, layout and command (train, export, eval)."""
    from megaflow.seeds import derive_seed

    return derive_seed(seed, "random_weights") % 2**62


def folder_transformer_loader(folder: str | Path, device: torch.device | str,
                              seed: int) -> Callable[[type, Path, torch.dtype], nn.Module] | None:
    """The transformer loader `ModelAdapter.from_pretrained` needs for `folder`: the random-weight
    one (seeded from the run's `seed`) for a random folder, whose transformer has no weights on
    disk, else None (the folder's own weights)."""
    return random_transformer_loader(device, seed=random_weights_seed(seed)) if is_random_folder(folder) else None
