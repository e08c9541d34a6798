"""`megaflow plan`: per-rank memory, communication and time of a recipe on a given cluster, and the
nearest layout that fits when it does not.

Nothing is loaded: the transformer is counted on the meta device from its `config.json` (a model
folder, a `random:NAME@SCALE` path or the real model a recipe names; two blocks of each kind stand
for all of them), and its activations are measured on fake tensors (`FakeTensorMode`, no memory)
at the run's width and token counts with two blocks of each kind: what autograd saves (storages
seen by `saved_tensors_hooks`, parameters excluded, attributed to the block that saved them first;
a checkpointed block keeps its inputs), the backward's and a no-grad forward's transients
(`megaflow.bench.memory.TensorMemoryTracker`), per sample, at two token counts fitted to a line
(so every sp size is priced without another measurement), then scaled to the real depth and batch
(the CFG batch of `velocity_shard` when guidance is on). On CPU this reproduces measured peaks of
real iterations within a few percent (`tests/test_plan.py`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megaflow.config import Config, validate_config, validate_parallel
from megaflow.errors import ConfigError
from megaflow.models.flops import train_step_flops, transformer_flops, video_tokens

if TYPE_CHECKING:
    from megaflow.models.random_model import Scale

GiB = 2**30
_CLASS_FAMILY = {"WanTransformer3DModel": ("wan", "wan_i2v"), "HunyuanVideoTransformer3DModel": ("hunyuan", "skyreels_i2v"),
                 "FluxTransformer2DModel": ("flux",), "SD3Transformer2DModel": ("sd3",)}
#: Config keys holding the block count of each block kind, per transformer class.
_DEPTH_KEYS = {"WanTransformer3DModel": ("num_layers",), "HunyuanVideoTransformer3DModel": ("num_layers", "num_single_layers"),
               "FluxTransformer2DModel": ("num_layers", "num_single_layers"), "SD3Transformer2DModel": ("num_layers",)}


# ---- the model the recipe names -----------------------------------------------------------
@dataclass
class ModelShape:
    """What the plan needs of a model: transformer config, VAE factors, text / image token counts,
    frozen-encoder parameter counts (None: unknown), the VAE's config and parameter count (the
    folder's, else the family's released VAE) and the folder (None: none on disk)."""

    config: dict[str, Any]
    temporal: int
    spatial: int
    text_tokens: int
    image_tokens: int
    encoders: dict[str, int | None]
    vae_params: int | None
    folder: Path | None
    vae_config: dict[str, Any]


def _safetensors_params(folder: Path) -> int | None:
    """Parameters in the safetensors files of a component folder, from their headers (None: none)."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_shape(cfg: Config) -> ModelShape:
    """The transformer config and the sizes around it, from the model folder when it exists, from
    `random:NAME@SCALE` without writing it, else from the real model whose recipe uses this path."""
    from megaflow.models.real import REAL_MODELS

    family, path = cfg.model.family, str(cfg.model.path)
    folder: Path | None = None
    if path.startswith("random:"):
        from megaflow.models.random_model import (HUNYUAN_TEXT_LENGTH, T5_TEXT_LENGTH, WAN_TEXT_LENGTH, Scale,
                                                  random_folder_name, real_model, scaled_transformer_config)
        from megaflow.models.tiny import cache_root

        name, _, scale = path[len("random:"):].partition("@")
        model = real_model(name)
        if model.family != family:
            raise ConfigError(f"model.path {path} is a {model.family} model but model.family is {family}")
        parsed = Scale.parse(scale) if scale else Scale()
        cached = cache_root() / random_folder_name(name, parsed)
        if (cached / "model_index.json").is_file():     # written by a run: its encoders and VAE are known
            return _shape(family, _read_json(cached / "transformer" / "config.json"), _text_tokens(family, cached), cached)
        config = scaled_transformer_config(name, parsed)
        text = {"wan": WAN_TEXT_LENGTH, "wan_i2v": WAN_TEXT_LENGTH, "hunyuan": HUNYUAN_TEXT_LENGTH,
                "skyreels_i2v": HUNYUAN_TEXT_LENGTH, "flux": T5_TEXT_LENGTH, "sd3": 77 + 128}[family]
        return _shape(family, config, text, None, parsed)
    if path in ("tiny", "demo") or Path(path).is_dir():
        from megaflow.models import resolve_model_path

        folder = resolve_model_path(path, family)
        config = _read_json(folder / "transformer" / "config.json")
        if not config:
            raise ConfigError(f"{folder}/transformer/config.json is missing: is {folder} a diffusers-format "
                              f"{family} folder?")
        return _shape(family, config, _text_tokens(family, folder), folder)
    from megaflow.config import load_config

    for model in REAL_MODELS.values():
        if model.family == family and str(load_config(model.recipe).model.path) == path:
            return _shape(family, model.config(), {"wan": 512, "wan_i2v": 512, "hunyuan": 256, "skyreels_i2v": 256,
                                                   "flux": 512, "sd3": 77 + 128}[family], None)
    raise ConfigError(f"model.path {path} is not a folder, a random:NAME[@SCALE] path, or the path of a real "
                      f"model's recipe ({', '.join(m.recipe for m in REAL_MODELS.values())}); point it at a "
                      "diffusers-format folder")


def _text_tokens(family: str, folder: Path) -> int:
    def max_len(sub: str, cap: int) -> int:
        tok = _read_json(folder / sub / "tokenizer_config.json")
        return min(int(tok.get("model_max_length", cap)), cap)

    if family == "wan_i2v":
        return 512
    if family == "wan":
        return max_len("tokenizer", 512)
    if family in ("hunyuan", "skyreels_i2v"):
        return int(_read_json(folder / "megaflow_text.json").get("max_sequence_length", 256))
    if family == "flux":
        return max_len("tokenizer_2", 512)
    return 77 + max_len("tokenizer_3", 128)


def _shape(family: str, config: dict[str, Any], text: int, folder: Path | None,
           scale: "Scale | None" = None) -> ModelShape:
    """Without a folder, the VAE is the family's released one at `scale` (default: the real size)."""
    from megaflow.models.random_model import Scale, released_vae

    cls = config.get("_class_name")
    if family not in _CLASS_FAMILY.get(cls, ()):
        raise ConfigError(f"the transformer class {cls} does not belong to model.family {family}")
    if folder:
        vae = _read_json(folder / "vae" / "config.json")
        vae_params = _safetensors_params(folder / "vae")
    else:
        with torch.device("meta"):
            released = released_vae(family, scale or Scale())
        vae = {"_class_name": type(released).__name__, **released.config}
        vae_params = sum(p.numel() for p in released.parameters())
    if family in ("wan", "wan_i2v"):
        temporal, spatial = int(vae.get("scale_factor_temporal", 4)), int(vae.get("scale_factor_spatial", 8))
    elif family in ("hunyuan", "skyreels_i2v"):
        temporal, spatial = int(vae.get("temporal_compression_ratio", 4)), int(vae.get("spatial_compression_ratio", 8))
    else:
        temporal, spatial = 1, 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    image = 0
    if family == "wan_i2v":
        enc = _read_json(folder / "image_encoder" / "config.json") if folder else {}
        image = (int(enc.get("image_size", 224)) // int(enc.get("patch_size", 14))) ** 2 + 1
    names = {"wan": ("text_encoder",), "wan_i2v": ("text_encoder", "image_encoder"),
             "hunyuan": ("text_encoder", "text_encoder_2"), "skyreels_i2v": ("text_encoder", "text_encoder_2"),
             "flux": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3")}
    encoders = {n: (_safetensors_params(folder / n) if folder else None) for n in names[family]}
    return ModelShape(config, temporal, spatial, text, image, encoders, vae_params, folder, vae)


def latent_shape(cfg: Config, shape: ModelShape) -> tuple[int, int, int, int]:
    """`[C, F, H, W]` of one sample's latent (image families: `F = 1`)."""
    c, v = shape.config, cfg.video
    if cfg.model.family in ("flux", "sd3"):
        channels = int(c.get("out_channels") or c["in_channels"]) // (4 if cfg.model.family == "flux" else 1)
        return channels, 1, v.height // shape.spatial, v.width // shape.spatial
    frames = (v.frames - 1) // shape.temporal + 1
    return int(c.get("out_channels") or c["in_channels"]), frames, v.height // shape.spatial, v.width // shape.spatial


# ---- parameters ---------------------------------------------------------------------------
@dataclass
class ParamCounts:
    """Transformer parameter bytes in the run's dtypes: frozen, trainable (fp32), the largest block."""

    frozen_bytes: int
    trainable: int
    total: int
    largest_block_bytes: int
    reference_bytes: int


def _meta_model(config: dict[str, Any]) -> torch.nn.Module:
    """The diffusers model a `config.json` (`_class_name`) describes, on the meta device."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        return cls(**{k: v for k, v in config.items() if not k.startswith("_")})


def count_parameters(cfg: Config, config: dict[str, Any]) -> ParamCounts:
    """Parameters on the meta device with the codebase's precision rules: frozen weights in bf16
    with `train.precision: bf16` (diffusers' keep-in-fp32 modules fp32), trainable ones fp32."""
    from megaflow.models import get_adapter
    from megaflow.models.base import diffusers_param_dtype

    # Two blocks of each kind stand for all of them (SD3, whose blocks differ, is built whole):
    # the second block's parameters count once per block after the first.
    short = config["_class_name"] != "SD3Transformer2DModel"
    n_kinds = len(_DEPTH_KEYS[config["_class_name"]])
    model = _meta_model({**_depth_config(config, (2,) * n_kinds), **{k: config[k] for k in ("num_refiner_layers",)
                                                                          if k in config}} if short else config)
    cls = type(model)
    depth = dict(zip(adapter_block_classes(cfg.model.family), _block_counts(config)))
    weight_of: dict[str, int] = {}
    if short:
        seen: dict[str, int] = {}
        for module_name, m in model.named_modules():
            kind = type(m).__name__
            if kind in depth:
                seen[kind] = seen.get(kind, 0) + 1
                weight_of[module_name + "."] = depth[kind] - 1 if seen[kind] == 2 else 1
    frozen_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    adapter = get_adapter(cfg.model.family)
    if cfg.model.lora:
        from peft import LoraConfig

        targets = cfg.model.lora_targets or adapter.default_lora_targets
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha,
                                     target_modules=targets if isinstance(targets, str) else list(targets)))
    frozen = trainable = total = 0
    reference = 0
    for name, p in model.named_parameters():
        n = p.numel() * next((w for prefix, w in weight_of.items() if name.startswith(prefix)), 1)
        total += n
        if cfg.model.lora and not p.requires_grad:
            frozen += n * diffusers_param_dtype(cls, name, frozen_dtype).itemsize
        elif p.requires_grad:
            trainable += n
            reference += n * diffusers_param_dtype(cls, name, frozen_dtype).itemsize
    blocks = adapter_block_classes(cfg.model.family)
    largest = max((sum(p.numel() * (4 if p.requires_grad else diffusers_param_dtype(cls, "x", frozen_dtype).itemsize)
                       for p in m.parameters()) for m in model.modules() if type(m).__name__ in blocks), default=0)
    keep_reference = not cfg.model.lora and cfg.algorithm.kl_beta > 0
    return ParamCounts(frozen, trainable, total, largest, reference if keep_reference else 0)


def adapter_block_classes(family: str) -> tuple[str, ...]:
    """Names of the family's transformer block classes (`ModelAdapter.block_classes`)."""
    return {"wan": ("WanTransformerBlock",), "wan_i2v": ("WanTransformerBlock",),
            "hunyuan": ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"),
            "skyreels_i2v": ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"),
            "flux": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
            "sd3": ("JointTransformerBlock",)}[family]


# ---- activations, measured on fake tensors --------------------------------------------------
def example_inputs(family: str, config: dict[str, Any], batch: int, latent: tuple[int, int, int, int],
                   text: int, image: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Transformer forward kwargs for `batch` samples of `latent [C, F, H, W]` with `text` text
    tokens (`image`: Wan I2V image tokens): random tensors in the current tensor mode."""
    B, (_, F, H, W) = batch, latent
    t = torch.full((B,), 500.0)
    cin = int(config["in_channels"])
    if family.startswith("wan"):
        kw = dict(hidden_states=torch.randn(B, cin, F, H, W, dtype=dtype), timestep=t,
                  encoder_hidden_states=torch.randn(B, text, int(config["text_dim"]), dtype=dtype))
        if image:
            kw["encoder_hidden_states_image"] = torch.randn(B, image, int(config["image_dim"]), dtype=dtype)
        return kw
    if family in ("hunyuan", "skyreels_i2v"):
        return dict(hidden_states=torch.randn(B, cin, F, H, W, dtype=dtype), timestep=t,
                    encoder_hidden_states=torch.randn(B, text, int(config["text_embed_dim"]), dtype=dtype),
                    encoder_attention_mask=torch.ones(B, text), guidance=torch.full((B,), 6000.0),
                    pooled_projections=torch.randn(B, int(config["pooled_projection_dim"]), dtype=dtype))
    if family == "flux":
        n = F * H * W // 4
        return dict(hidden_states=torch.randn(B, n, cin, dtype=dtype), timestep=t / 1000,
                    encoder_hidden_states=torch.randn(B, text, int(config["joint_attention_dim"]), dtype=dtype),
                    pooled_projections=torch.randn(B, int(config["pooled_projection_dim"]), dtype=dtype),
                    img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(text, 3), guidance=torch.full((B,), 3.5))
    return dict(hidden_states=torch.randn(B, cin, H, W, dtype=dtype), timestep=t,
                encoder_hidden_states=torch.randn(B, text, int(config["joint_attention_dim"]), dtype=dtype),
                pooled_projections=torch.randn(B, int(config["pooled_projection_dim"]), dtype=dtype))


@dataclass
class Activations:
    """Activation bytes of ONE sample per transformer call, each a line `a + b·x` in the rank's
    tokens `x` (video tokens / sp, plus text tokens / sp for joint-attention families): `base`
    (embedders, head, what blocks share), per block kind `saved` (what autograd keeps for backward)
    and `checkpointed` (a checkpointed block: its inputs), the transient above what is kept during
    the update's forward+backward without (`transient`) and with (`transient_ckpt`, recompute
    included) checkpointing, `rollout` (peak of a no-grad forward) and the tokens `x` of sp 1."""

    base: tuple[float, float]
    base_ckpt: tuple[float, float]
    saved: dict[str, tuple[float, float]]
    checkpointed: dict[str, tuple[float, float]]
    transient: tuple[float, float]
    transient_ckpt: tuple[float, float]
    rollout: tuple[float, float]
    tokens: int

    @staticmethod
    def at(line: tuple[float, float], x: float) -> float:
        """A line's bytes at `x` tokens (never below 0)."""
        return max(0.0, line[0] + line[1] * x)


def _depth_config(config: dict[str, Any], depths: tuple[int, ...]) -> dict[str, Any]:
    """`config` with `depths` blocks of each kind (SD3 keeps its context-pre-only last block apart)."""
    c = dict(config)
    for key, n in zip(_DEPTH_KEYS[config["_class_name"]], depths):
        c[key] = n
    if config["_class_name"] == "SD3Transformer2DModel":
        c["dual_attention_layers"] = list(range(depths[0])) if config.get("dual_attention_layers") else []
        c["num_layers"] = depths[0] + 1
    if "num_refiner_layers" in c:
        c["num_refiner_layers"] = min(int(c["num_refiner_layers"]), 1)
    return c


def local_tokens(family: str, shape: ModelShape, latent: tuple[int, int, int, int], sp: int) -> int:
    """Tokens one rank's blocks run on: its video tokens (`1/sp`), plus its share of the text for the
    joint-attention families (HunyuanVideo, FLUX, SD3 shard text with the video)."""
    video = math.ceil(video_tokens(family, shape.config, latent) / sp)
    return video + (math.ceil(shape.text_tokens / sp) if family not in ("wan", "wan_i2v") else 0)


def _block_kinds(model: torch.nn.Module, kinds: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [(type(m).__name__, m) for m in model.modules() if type(m).__name__ in kinds]


def _measure_point(cfg: Config, shape: ModelShape, latent: tuple[int, int, int, int], text: int,
                   dtype: torch.dtype) -> dict[str, Any]:
    """One sample's activation bytes at one token count, on fake tensors: what autograd saves
    (deduplicated storages, parameters excluded) per block and outside blocks, with and without
    checkpointing (two blocks of each kind: the second's share is the per-block value), and the
    transients of the backward and of a no-grad forward (`TensorMemoryTracker`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megaflow.bench.memory import TensorMemoryTracker

    family = cfg.model.family
    kinds = adapter_block_classes(family)
    n_kinds = len(_DEPTH_KEYS[shape.config["_class_name"]])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    result: dict[str, Any] = {}
    with FakeTensorMode():
        for checkpoint in (False, True):
            model = _meta_free_build(_depth_config(shape.config, (2,) * n_kinds), cfg, dtype)
            kw = example_inputs(family, shape.config, 1, latent, text, shape.image_tokens, dtype)
            skip = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
            owner: dict[int, int] = {}            # storage -> block index (-1: outside blocks)
            sizes: dict[int, int] = {}
            current = [-1]
            blocks = _block_kinds(model, kinds)

            def note(t: Any) -> Any:
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    if s._cdata not in skip and s._cdata not in owner:
                        owner[s._cdata], sizes[s._cdata] = current[0], s.nbytes()
                return t

            for i, (_, block) in enumerate(blocks):
                block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
                block.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1))
            if checkpoint:
                index = {id(block): i for i, (_, block) in enumerate(blocks)}

                def run_checkpointed(block: Any, *args: Any) -> Any:
                    current[0] = index[id(block)]       # the checkpoint keeps the block's inputs
                    for a in args:
                        note(a)
                    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

                model.gradient_checkpointing = True
                model._gradient_checkpointing_func = run_checkpointed
            tracker = TensorMemoryTracker("cpu")
            with tracker, autocast, torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
                out = model(**kw, return_dict=False)[0]
                kept = tracker.live
                forward_extra = tracker.peak - kept
                tracker.reset_peak()
                out.float().sum().backward()
                grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
                backward_extra = tracker.peak - kept - grads
            per_block = {}
            for i, (kind, _) in enumerate(blocks):
                per_block.setdefault(kind, []).append(sum(n for k, n in sizes.items() if owner[k] == i))
            second = {kind: v[1] for kind, v in per_block.items()}
            total = sum(sizes.values())
            tag = "ckpt" if checkpoint else "saved"
            result[tag] = second
            result["base_" + tag] = total - 2 * sum(second.values())
            result["transient_" + tag] = max(forward_extra, backward_extra)
        model = _meta_free_build(_depth_config(shape.config, (1,) * n_kinds), cfg, dtype)
        kw = example_inputs(family, shape.config, 1, latent, text, shape.image_tokens, dtype)
        tracker = TensorMemoryTracker("cpu")
        with tracker, autocast, torch.no_grad():
            model(**kw, return_dict=False)
        result["rollout"] = tracker.peak
    return result


def measure_activations(cfg: Config, shape: ModelShape, *, fit: bool = True,
                        _points: dict | None = None) -> Activations:
    """Activation bytes per sample as lines in the rank's tokens, measured on fake tensors at the
    run's width at two token counts (the whole latent and about half of it) and fitted: saved
    activations are linear in tokens (flash-style SDPA keeps `O(tokens)` state; the test checks
    a third point), so every sp size of the layout search is priced without another measurement.
    `fit=False`: only the whole latent is measured (constant lines, exact at sp 1 only)."""
    family = cfg.model.family
    C, F, H, W = latent_shape(cfg, shape)
    joint = family not in ("wan", "wan_i2v")
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    points = [((C, F, H, W), shape.text_tokens)]
    if W >= 4:
        points.append(((C, F, H, (W // 2) // 2 * 2), math.ceil(shape.text_tokens / 2) if joint else shape.text_tokens))
    elif H >= 4:
        points.append(((C, F, (H // 2) // 2 * 2, W), math.ceil(shape.text_tokens / 2) if joint else shape.text_tokens))
    points = points if fit else points[:1]
    xs = [video_tokens(family, shape.config, lat) + (text if joint else 0) for lat, text in points]
    done = _points if _points is not None else {}
    ms = [done[(lat, text)] if (lat, text) in done else done.setdefault((lat, text), _measure_point(
        cfg, shape, lat, text, dtype)) for lat, text in points]

    def line(get: Any) -> tuple[float, float]:
        ys = [float(get(m)) for m in ms]
        if len(ys) == 1 or xs[0] == xs[1]:
            return ys[0], 0.0
        slope = (ys[0] - ys[1]) / (xs[0] - xs[1])
        return ys[0] - slope * xs[0], slope

    kinds = list(ms[0]["saved"])
    return Activations(base=line(lambda m: m["base_saved"]), base_ckpt=line(lambda m: m["base_ckpt"]),
                       saved={k: line(lambda m, k=k: m["saved"][k]) for k in kinds},
                       checkpointed={k: line(lambda m, k=k: m["ckpt"][k]) for k in kinds},
                       transient=line(lambda m: m["transient_saved"]), transient_ckpt=line(lambda m: m["transient_ckpt"]),
                       rollout=line(lambda m: m["rollout"]), tokens=xs[0])


def _meta_free_build(config: dict[str, Any], cfg: Config, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer with LoRA or fully trainable as the run has it, built on the meta device and
    then given fake CPU tensors of the current `FakeTensorMode` (no memory, CPU kernels' choices)."""
    from megaflow.models.base import diffusers_param_dtype

    with torch._C._DisableTorchDispatch():
        model = _meta_model(config)
        if cfg.model.lora:
            from peft import LoraConfig

            from megaflow.models import get_adapter

            for name, p in model.named_parameters():
                p.data = p.data.to(diffusers_param_dtype(type(model), name, dtype))
            model.requires_grad_(False)
            targets = cfg.model.lora_targets or get_adapter(cfg.model.family).default_lora_targets
            model.add_adapter(LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha,
                                         target_modules=targets if isinstance(targets, str) else list(targets)))
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                              requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    return model


# ---- the plan ---------------------------------------------------------------------------------
@dataclass
class Layout:
    """The knobs the search varies."""

    sp_size: int
    grad_checkpointing: float
    chunk_size: int
    micro_batch_size: int
    zero_stage: int
    offload: bool

    def overrides(self, base: "Layout") -> list[str]:
        """`--set` overrides turning `base` into this layout."""
        keys = {"sp_size": "parallel.sp_size", "grad_checkpointing": "train.grad_checkpointing",
                "chunk_size": "rollout.chunk_size", "micro_batch_size": "train.micro_batch_size",
                "zero_stage": "parallel.zero_stage", "offload": "parallel.offload"}
        return [f"{keys[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in asdict(self).items()
                if getattr(base, k) != v]


@dataclass
class PlanReport:
    """Per-rank memory (bytes), communication (bytes per iteration), time (s) and the verdict."""

    recipe: str
    gpus: int
    gpu_memory: float
    layout: Layout
    device: dict[str, float]
    host: dict[str, float]
    activations_per_block: dict[str, dict[str, float]]
    communication: dict[str, float]
    time: dict[str, float]
    assumptions: dict[str, Any]
    notes: list[str]
    fits: bool
    nearest: dict[str, Any] | None = None
    #: The device / host items of an iteration: gradients (allocated by the first backward, kept
    #: until the next update starts, so they coexist with every phase), activations, conditioning,
    #: latents, rollout store; the rest (weights, optimizer states, encoders, VAE) is resident.
    iteration_terms: list[str] = field(default_factory=list)

    def iteration_total(self) -> float:
        """Bytes of the iteration-time items, device and host together (one CPU process: both)."""
        return sum(v for k, v in {**self.device, **self.host}.items() if k in self.iteration_terms)

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["device_total"], d["host_total"] = self.device_total, self.host_total
        return d

    def table(self) -> str:
        """A readable report."""
        lines = [f"megaflow plan: {self.recipe} on {self.gpus} GPUs × {self.gpu_memory:g} GiB  "
                 f"(sp {self.layout.sp_size}, ZeRO-{self.layout.zero_stage}{' + offload' if self.layout.offload else ''}, "
                 f"checkpointing {self.layout.grad_checkpointing:g}, chunk {self.layout.chunk_size}, "
                 f"micro-batch {self.layout.micro_batch_size})", "", "per-rank GPU memory:"]
        lines += [f"  {k:<46}{v / GiB:>10.2f} GiB" for k, v in self.device.items()]
        lines += [f"  {'total':<46}{self.device_total / GiB:>10.2f} GiB", "", "host memory (per rank):"]
        lines += [f"  {k:<46}{v / GiB:>10.2f} GiB" for k, v in self.host.items()]
        lines += ["", "activations per block and sample at the rank's tokens (GiB): kept for backward / checkpointed"]
        lines += [f"  {k:<46}{v['saved'] / GiB:>8.3f} /{v['checkpointed'] / GiB:>8.3f}" for k, v in
                  self.activations_per_block.items()]
        lines += ["", "communication per iteration and rank:"]
        lines += [f"  {k:<46}{v / GiB:>10.2f} GiB" for k, v in self.communication.items()]
        lines += ["", "time per iteration (estimate):"]
        lines += [f"  {k:<46}{v:>10.1f} s" for k, v in self.time.items()]
        lines += ["", "assumptions: " + ", ".join(f"{k}={v}" for k, v in self.assumptions.items())]
        lines += [f"note: {n}" for n in self.notes]
        lines += ["", "verdict: " + ("fits" if self.fits else "does NOT fit")]
        if not self.fits:
            if self.nearest:
                lines.append(f"nearest layout that fits ({self.nearest['device_total'] / GiB:.1f} GiB per rank): "
                             + " ".join(f"--set {o}" for o in self.nearest["overrides"]))
            else:
                lines.append("no nearby layout fits (more GPUs or memory needed)")
        return "\n".join(lines)


def _layout(cfg: Config) -> Layout:
    return Layout(cfg.parallel.sp_size, cfg.train.grad_checkpointing, cfg.rollout.chunk_size,
                  cfg.train.micro_batch_size, cfg.parallel.zero_stage, cfg.parallel.offload)


def _apply(cfg: Config, layout: Layout) -> Config:
    import copy

    c = copy.deepcopy(cfg)
    c.parallel.sp_size, c.train.grad_checkpointing = layout.sp_size, layout.grad_checkpointing
    c.rollout.chunk_size, c.train.micro_batch_size = layout.chunk_size, layout.micro_batch_size
    c.parallel.zero_stage, c.parallel.offload = layout.zero_stage, layout.offload
    if layout.zero_stage != 3:
        c.parallel.hpz_partition_size, c.rollout.gather_weights = 1, False
    return c


def validate_layout(cfg: Config, gpus: int, shape: ModelShape) -> None:
    """The checks `Trainer.__init__` makes before loading anything (same ConfigErrors)."""
    validate_config(cfg)
    validate_parallel(cfg, gpus)
    if cfg.parallel.sp_size > 1:
        from megaflow.parallel.ulysses import check_heads_divisible

        check_heads_divisible(int(shape.config["num_attention_heads"]), cfg.parallel.sp_size)


def _ds_buckets(cfg: Config) -> dict[str, int]:
    from megaflow.parallel.engine import load_ds_config

    if cfg.parallel.zero_stage == 0:
        return {}
    ds, _ = load_ds_config(cfg, grad_accum_steps=1)
    z = ds.get("zero_optimization", {})
    return {k: int(v) for k, v in z.items() if k.endswith("bucket_size") and isinstance(v, (int, float))}


def estimate(cfg: Config, gpus: int, gpu_memory: float, *, recipe: str = "", shape: ModelShape | None = None,
             host_memory: float | None = None, gpus_per_node: int = 8, reserve: float = 0.1, mfu: float = 0.4,
             peak_tflops: float = 989.0, convolution_workspace: bool = False,
             _cache: dict | None = None) -> PlanReport:
    """The plan of `cfg` on `gpus` ranks of `gpu_memory` GiB (no layout search).
    `convolution_workspace`: count the unfolded-input (im2col) buffer CPU convolutions allocate
    in the VAE decode (what a CPU run measures); GPU convolutions' bounded cuDNN workspaces fall
    under `reserve` instead."""
    from megaflow.algorithms.registry import PlanContext, get_algorithm

    shape = shape or model_shape(cfg)
    validate_layout(cfg, gpus, shape)
    cache = _cache if _cache is not None else {}
    p, t, r = cfg.parallel, cfg.train, cfg.rollout
    world, sp = gpus, p.sp_size
    dp = world // sp
    family = cfg.model.family
    key = ("params", cfg.model.lora, cfg.train.precision, cfg.algorithm.kl_beta > 0)
    params = cache.get(key) or cache.setdefault(key, count_parameters(cfg, shape.config))
    fit = local_tokens(family, shape, latent_shape(cfg, shape), sp) != local_tokens(family, shape,
                                                                                  latent_shape(cfg, shape), 1)
    key = ("act", cfg.model.lora, cfg.model.lora_rank, cfg.train.precision)
    points = cache.setdefault(key + ("points",), {})
    act = cache.get(key + (fit,)) or cache.setdefault(key + (fit,), measure_activations(cfg, shape, fit=fit,
                                                                                        _points=points))
    frozen_bytes, trainable_bytes = params.frozen_bytes, params.trainable * 4
    device: dict[str, float] = {}
    host: dict[str, float] = {}
    notes: list[str] = []
    weights = frozen_bytes + trainable_bytes
    # -- parameters, gradients, optimizer
    if p.zero_stage == 3:
        part = weights / world
        (host if p.offload else device)["transformer weights (ZeRO-3 partition)"] = part
        if p.hpz_partition_size > 1:
            device["hpZ secondary partition"] = weights / p.hpz_partition_size
        device["gathered weights (live)"] = weights if r.gather_weights else 2 * params.largest_block_bytes
        # ZeRO-Offload keeps the fp32 gradient partitions on the host, where CPU Adam steps them
        (host if p.offload else device)["gradients fp32 (partition)"] = trainable_bytes / world
        (host if p.offload else device)["AdamW states fp32 (partition)"] = 2 * trainable_bytes / world
    else:
        device["transformer weights"] = weights
        device["gradients fp32" + (" (partition)" if p.zero_stage == 2 else "")] = \
            trainable_bytes / (world if p.zero_stage == 2 else 1)
        device["AdamW states fp32" + (" (partition)" if p.zero_stage == 2 else "")] = \
            2 * trainable_bytes / (world if p.zero_stage == 2 else 1)
    buckets = _ds_buckets(cfg)
    if buckets.get("reduce_bucket_size"):
        device["ZeRO reduce bucket"] = buckets["reduce_bucket_size"] * 4
    if params.reference_bytes:
        device["KL reference copy"] = params.reference_bytes / (world if p.zero_stage == 3 else 1)
    # -- activations: the update's micro-batch (the CFG batch when guidance is on, as velocity_shard
    # runs it), the rollout's chunk forward and the VAE decode never overlap; the largest counts
    use_cfg = cfg.sampling.guidance_scale > 1.0
    cfg_mult = 2 if use_cfg else 1
    counts = {kind: n for kind, n in zip(adapter_block_classes(family), _block_counts(shape.config))}
    order = [kind for kind, n in counts.items() for _ in range(n)]
    n_ckpt = math.ceil(t.grad_checkpointing * len(order) - 1e-9) if t.grad_checkpointing > 0 else 0
    C, F, H, W = latent_shape(cfg, shape)
    x = local_tokens(family, shape, (C, F, H, W), sp)
    at = Activations.at
    base = at(act.base, x) if n_ckpt == 0 else at(act.base_ckpt, x) if n_ckpt == len(order) else \
        max(at(act.base, x), at(act.base_ckpt, x))
    kept = base + sum(at(act.checkpointed[k], x) for k in order[:n_ckpt]) + sum(at(act.saved[k], x) for k in order[n_ckpt:])
    transient = at(act.transient_ckpt if n_ckpt else act.transient, x)
    cond_row = _conditioning_bytes(cfg, shape)
    cat = cond_row if use_cfg else 0       # velocity_shard's [negative, text] concatenation of the CFG batch
    update = t.micro_batch_size * cfg_mult * (kept + transient)      # the CFG inputs are among the saved tensors
    rollout = r.chunk_size * cfg_mult * (at(act.rollout, x) + cat)
    decode = _decode_bytes(cfg, shape, cache, convolution_workspace)
    phases = {"update forward+backward": update, "rollout forward": rollout}
    if decode is not None:
        phases["VAE decode"] = decode
    else:
        notes.append("VAE decode buffers: unknown (no VAE config in the model folder)")
    peak_phase = max(phases, key=phases.get)
    device[f"activations (peak: {peak_phase})"] = phases[peak_phase]
    # -- conditioning, rollout store, latents
    local = cfg.samples_per_iteration // dp
    device["text conditioning"] = (cfg.data.prompts_per_iteration + local * cfg_mult) * cond_row
    latent = C * F * H * W * 4
    ctx = PlanContext(num_steps=cfg.sampling.num_steps, shift=cfg.sampling.shift,
                      fraction=cfg.algorithm.timestep_fraction or get_algorithm(cfg.algorithm.name).timestep_fraction,
                      options=cfg.algorithm, sample_keys=[(0, 0)], group_size=r.group_size, seed=cfg.seed, iteration=0)
    step_plan = get_algorithm(cfg.algorithm.name).build_plan(ctx, get_algorithm(cfg.algorithm.name).initial_state())
    k_steps = step_plan.steps_per_sample
    keep_mean = cfg.algorithm.loss == "grpo_guard" or cfg.algorithm.kl_beta > 0
    host["rollout store (x, x_next" + (", mean" if keep_mean else "") + ")"] = \
        local * k_steps * (latent * (3 if keep_mean else 2) + 4)
    device["chunk latents and velocities"] = r.chunk_size * latent * 4
    # -- frozen encoders, VAE, rewards
    frozen_itemsize = 2 if t.precision == "bf16" else 4
    if cfg.data.text_cache:
        notes.append("text encoders: none loaded (data.text_cache)")
    else:
        known = {n: v for n, v in shape.encoders.items() if v is not None}
        if known:
            device["text encoders"] = sum(known.values()) * frozen_itemsize
        unknown = [n for n, v in shape.encoders.items() if v is None]
        if unknown:
            notes.append(f"text encoders {', '.join(unknown)}: size unknown (no weights in the model folder)")
    if shape.vae_params is not None:
        device["VAE"] = shape.vae_params * frozen_itemsize
        if shape.folder is None:
            notes.append(f"VAE: the family's released {shape.vae_config['_class_name']} structure (no model folder "
                         "on disk)")
    else:
        notes.append("VAE: weights' size unknown (no weights in the model folder)")
    where = "the rank's GPU" if cfg.reward.device == "same" else cfg.reward.device
    notes.append(f"rewards {', '.join(cfg.reward.components)} on {where}{' (offloaded between uses)' if cfg.reward.offload else ''}"
                 "; model-based rewards' weights are not included")
    # -- communication
    text_local = shape.text_tokens if family in ("wan", "wan_i2v") else math.ceil(shape.text_tokens / sp)
    tokens = video_tokens(family, shape.config, (C, F, H, W))
    chunks = local // r.chunk_size
    rollout_calls = chunks * cfg.sampling.num_steps
    micro_local = local // t.micro_batch_size
    update_calls = micro_local * k_steps
    comm: dict[str, float] = {}
    gathered = (frozen_bytes + params.trainable * frozen_itemsize) * (1 - 1 / world)
    if p.zero_stage == 3:
        rollout_gathers = 1 if r.gather_weights else rollout_calls
        comm["ZeRO-3 all-gather (rollout)"] = rollout_gathers * gathered
        comm["ZeRO-3 all-gather (update fwd+bwd+recompute)"] = update_calls * gathered * (2 + t.grad_checkpointing)
        comm["ZeRO-3 reduce-scatter grads"] = update_calls * trainable_bytes * (1 - 1 / world)
    elif p.zero_stage == 2:
        comm["ZeRO-2 gradient reduce"] = update_calls * trainable_bytes * (1 - 1 / world)
    if sp > 1:
        D = int(shape.config["num_attention_heads"]) * int(shape.config["attention_head_dim"])
        attn_layers = sum(counts.values())
        per_forward = 4 * attn_layers * (tokens / sp + (text_local if family not in ("wan", "wan_i2v") else 0)) \
            * D * (2 if t.precision == "bf16" else 4) * (sp - 1) / sp
        comm["Ulysses all-to-all (rollout)"] = rollout_calls * r.chunk_size * (2 if use_cfg else 1) * per_forward
        comm["Ulysses all-to-all (update)"] = update_calls * t.micro_batch_size * (2 if use_cfg else 1) \
            * per_forward * (3 + t.grad_checkpointing)
    # -- time
    flops_fwd = transformer_flops(family, shape.config, batch=1, video_tokens=tokens, text_tokens=shape.text_tokens,
                                  image_tokens=shape.image_tokens)
    cfg_mult = 2 if use_cfg else 1
    rate = mfu * peak_tflops * 1e12
    rollout_flops = local * cfg.sampling.num_steps * cfg_mult * flops_fwd.total / sp
    update_flops = local * k_steps * cfg_mult * train_step_flops(flops_fwd, checkpoint_fraction=t.grad_checkpointing) / sp
    times = {"rollout": rollout_flops / rate, "update": update_flops / rate}
    times["total"] = times["rollout"] + times["update"]
    usable = gpu_memory * GiB * (1 - reserve)
    host_ok = host_memory is None or sum(host.values()) * gpus_per_node <= host_memory * GiB
    fits = sum(device.values()) <= usable and host_ok
    if not host_ok:
        notes.append(f"host memory: {sum(host.values()) * gpus_per_node / GiB:.1f} GiB per node of {gpus_per_node} "
                     f"ranks exceeds --host-memory {host_memory:g} GiB")
    iteration = [k for k in [*device, *host] if k.startswith(("gradients", "activations", "text conditioning",
                                                             "chunk latents", "rollout store"))]
    per_block = {k: {"saved": at(act.saved[k], x), "checkpointed": at(act.checkpointed[k], x)} for k in act.saved}
    return PlanReport(recipe, gpus, gpu_memory, _layout(cfg), device, host, per_block, comm, times,
                      {"mfu": mfu, "gpu_peak_tflops": peak_tflops, "reserve": reserve,
                       "usable_gpu_GiB": round(usable / GiB, 2), "trained_steps_per_sample": k_steps,
                       "video_tokens": tokens, "text_tokens": shape.text_tokens,
                       "activation_phases_GiB": {k: round(v / GiB, 4) for k, v in phases.items()}}, notes, fits,
                      iteration_terms=iteration)


def _conditioning_bytes(cfg: Config, shape: ModelShape) -> int:
    """Bytes of one sample's transformer conditioning (text embeddings, mask, pooled vector, Wan I2V
    image embeddings) in the text encoders' dtype: the rows the trainer keeps per sample and branch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    with FakeTensorMode():
        kw = example_inputs(cfg.model.family, shape.config, 1, latent_shape(cfg, shape), shape.text_tokens,
                            shape.image_tokens, dtype)
    keys = ("encoder_hidden_states", "encoder_hidden_states_image", "encoder_attention_mask", "pooled_projections")
    return sum(kw[k].nbytes for k in keys if k in kw)


def _conv_workspace_tracker() -> Any:
    from megaflow.bench.memory import TensorMemoryTracker

    class ConvWorkspaceTracker(TensorMemoryTracker):
        """`TensorMemoryTracker` that also counts, while a convolution runs, its unfolded-input
        (im2col) buffer `[B, C_in/groups·∏kernel, ∏out]`: what CPU convolutions allocate besides
        their output (measured: a 24-channel 3×3×3 `Conv3d` peaks at exactly that plus its output;
        oneDNN's path, taken for some large shapes, needs less, as do cuDNN's workspaces on a GPU,
        so the decode estimate is an upper bound)."""

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is not torch.ops.aten.convolution.default:
                return super().__torch_dispatch__(func, types, args, kwargs)
            before = self.live
            out = super().__torch_dispatch__(func, types, args, kwargs)
            x, weight, groups = args[0], args[1], int(args[8])
            kernel = math.prod(weight.shape[2:])
            columns = x.shape[0] * x.shape[1] // groups * kernel * math.prod(out.shape[2:]) * x.element_size()
            self.peak = max(self.peak, before + (columns if kernel > 1 else 0) + out.untyped_storage().nbytes())
            return out

    return ConvWorkspaceTracker


def _decode_bytes(cfg: Config, shape: ModelShape, cache: dict, convolution_workspace: bool) -> float | None:
    """Peak bytes of decoding one rollout chunk (None: no VAE config to build it from): the VAE
    run on fake tensors for one sample with `model.vae_slicing` (else the whole chunk), tiled as
    `model.vae_tiling` decides, plus the chunk's decoded videos and their [0, 1] copy. One VAE run
    per decode batch: a sliced decode prices every chunk size with the same run."""
    vae_cfg = shape.vae_config
    if not vae_cfg.get("_class_name"):
        return None
    batch = 1 if cfg.model.vae_slicing else cfg.rollout.chunk_size
    key = ("decode", cfg.model.vae_tiling, batch, cfg.train.precision, convolution_workspace)
    if key not in cache:
        cache[key] = _decode_run(cfg, shape, batch, convolution_workspace)
    peak, video_bytes = cache[key]
    return peak + 2 * video_bytes * cfg.rollout.chunk_size


def _decode_run(cfg: Config, shape: ModelShape, batch: int, convolution_workspace: bool) -> tuple[int, int]:
    """The peak bytes of the VAE decoding `batch` samples on fake tensors (with each convolution's
    im2col buffer when `convolution_workspace`), and one decoded video's bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megaflow.bench.memory import TensorMemoryTracker
    from megaflow.models.vae import VIDEO_VAE_FAMILIES, uses_tiling

    vae_cfg = shape.vae_config
    family = cfg.model.family
    C, F, H, W = latent_shape(cfg, shape)
    C = int(vae_cfg.get("z_dim") or vae_cfg.get("latent_channels") or C)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    with FakeTensorMode():
        with torch._C._DisableTorchDispatch():
            vae = _meta_model(vae_cfg)
        for module in vae.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
        video = family in VIDEO_VAE_FAMILIES
        z = torch.randn((batch, C, F, H, W) if video else (batch, C, H, W), dtype=dtype)
        if video:
            vae.use_tiling = uses_tiling(vae, z.shape, cfg.model.vae_tiling)
        tracker = (_conv_workspace_tracker() if convolution_workspace else TensorMemoryTracker)("cpu")
        with tracker, torch.no_grad():
            out = vae.decode(z, return_dict=False)[0]
    return tracker.peak, out.nbytes // batch


def _block_counts(config: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(config.get(k) or 0) for k in _DEPTH_KEYS[config["_class_name"]])


def plan(cfg: Config, gpus: int, gpu_memory: float, *, recipe: str = "", host_memory: float | None = None,
         gpus_per_node: int = 8, reserve: float = 0.1, mfu: float = 0.4, peak_tflops: float = 989.0) -> PlanReport:
    """The plan of `cfg`; when it does not fit, the nearest layout that does (fewest changed knobs,
    then least memory) among sp sizes dividing gpus and the heads, checkpointing 0 / 0.5 / 1,
    chunk sizes down to the micro-batch, ZeRO-3 and offload."""
    if gpus < 1 or gpu_memory <= 0:
        raise ConfigError(f"--gpus must be >= 1 and --gpu-memory > 0; got {gpus} and {gpu_memory}")
    if not 0 <= reserve < 1:
        raise ConfigError(f"--reserve is a fraction of GPU memory in [0, 1), got {reserve}")
    shape = model_shape(cfg)
    cache: dict = {}
    kw = dict(recipe=recipe, shape=shape, host_memory=host_memory, gpus_per_node=gpus_per_node, reserve=reserve,
              mfu=mfu, peak_tflops=peak_tflops, _cache=cache)
    report = estimate(cfg, gpus, gpu_memory, **kw)
    if report.fits:
        return report
    base = _layout(cfg)
    heads = int(shape.config["num_attention_heads"])
    sps = [s for s in range(1, gpus + 1) if gpus % s == 0 and heads % s == 0 and s <= gpus_per_node]
    chunks = sorted({c for c in range(cfg.train.micro_batch_size, cfg.rollout.chunk_size + 1)
                     if c % cfg.train.micro_batch_size == 0})
    candidates = []
    for sp in sps:
        for ck in (0.0, 0.5, 1.0):
            for chunk in chunks:
                for stage, offload in ((0, False), (2, False), (3, False), (3, True)):
                    if stage == 0 and (gpus > 1 or sp > 1):
                        continue
                    layout = Layout(sp, ck, chunk, cfg.train.micro_batch_size, stage, offload)
                    changes = len(layout.overrides(base))
                    if changes:
                        candidates.append((changes, layout))
    best = None
    for changes, layout in sorted(candidates, key=lambda c: c[0]):
        if best is not None and changes > best[0]:
            break
        try:
            r = estimate(_apply(cfg, layout), gpus, gpu_memory, **kw)
        except ConfigError:
            continue
        if r.fits and (best is None or r.device_total < best[1].device_total):
            best = (changes, r, layout)
    if best is not None:
        report.nearest = {"overrides": best[2].overrides(base), "layout": asdict(best[2]),
                          "device_total": best[1].device_total}
    return report


def load_plan_config(recipe: str, overrides: list[str]) -> Config:
    """The recipe with `--set` overrides, exactly as `megaflow train` reads it."""
    from megaflow.config import load_config

    return load_config(recipe, overrides)
