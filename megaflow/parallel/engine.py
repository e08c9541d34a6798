"""DeepSpeed set-up: config templates filled from the recipe, ZeRO-3 construction under
`deepspeed.zero.Init` (no rank ever holds the whole transformer), leaf modules, the engine, and
gathering trainable weights for saving.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from megaflow.config import Config
from megaflow.errors import ConfigError
from megaflow.models.base import diffusers_param_dtype, meta_build

AUTO = "auto"


def template_path(cfg: Config) -> Path:
    """The DeepSpeed JSON of this run: `parallel.ds_config`, else the built-in template of the
    stage (package data `megaflow.ds_configs`, the repository's ds_configs/ folder)."""
    if cfg.parallel.ds_config:
        return Path(cfg.parallel.ds_config)
    from importlib.resources import files

    name = "zero3_offload.json" if cfg.parallel.offload else f"zero{cfg.parallel.zero_stage}.json"
    path = Path(str(files("megaflow.ds_configs") / name))
    if not path.is_file():
        raise ConfigError(f"the DeepSpeed template {name} is missing from {path.parent}; reinstall megaflow or "
                          "set parallel.ds_config to your own DeepSpeed JSON")
    return path


def fill_ds_config(raw: dict[str, Any], cfg: Config, *, grad_accum_steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace every "auto" in a DeepSpeed config with the recipe's value.

    Returns `(ds_config, adamw_kwargs)`: the optimizer section is taken out and built by megaflow
    as `torch.optim.AdamW(**adamw_kwargs)` (a client optimizer, identical in every layout).
    `grad_accum_steps`: backward calls per optimizer step on one rank.
    """
    c = copy.deepcopy(raw)
    t = cfg.train
    fills = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": max(t.grad_clip, 0.0),
    }
    for key, value in fills.items():
        if c.get(key, AUTO) == AUTO:
            c[key] = value
    c.pop("train_batch_size", None)
    # megaflow applies its precision itself (bf16 autocast around the transformer, fp32 trainable
    # weights), the same way in every layout; DeepSpeed's bf16 mode is used only if a file asks for it.
    if "bf16" in c and c["bf16"].get("enabled") == AUTO:
        c["bf16"]["enabled"] = False
    if "fp16" in c and c["fp16"].get("enabled") == AUTO:
        c["fp16"]["enabled"] = False
    zero = c.setdefault("zero_optimization", {})
    if zero.get("stage", AUTO) == AUTO:
        zero["stage"] = cfg.parallel.zero_stage
    if zero["stage"] != cfg.parallel.zero_stage:
        raise ConfigError(f"the DeepSpeed config sets zero_optimization.stage={zero['stage']} but "
                          f"parallel.zero_stage={cfg.parallel.zero_stage}; make them agree")
    if zero["stage"] == 3:
        # DeepSpeed's default replaces torch.nn.functional.linear process-wide with a matmul and a
        # separate bias add, which rounds differently from one process's fused addmm in bf16.
        zero.setdefault("memory_efficient_linear", False)
    if zero.get("zero_hpz_partition_size") == AUTO:
        zero["zero_hpz_partition_size"] = cfg.parallel.hpz_partition_size
    elif zero["stage"] == 3 and cfg.parallel.hpz_partition_size > 1:
        zero["zero_hpz_partition_size"] = cfg.parallel.hpz_partition_size
    if zero["stage"] == 3 and cfg.parallel.sp_size > 1 and zero.get("reduce_scatter", True) is not True:
        raise ConfigError("zero_optimization.reduce_scatter=false with sequence parallelism makes ZeRO-3's gradient "
                          "averaging depend on bucket sizes; remove it from the DeepSpeed config")
    opt = c.pop("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "AdamW")).lower() not in ("adamw", "adam_w"):
        raise ConfigError(f"the DeepSpeed config's optimizer type {opt.get('type')!r} is not supported; megaflow "
                          "trains with AdamW (remove the optimizer section or set its type to AdamW)")
    params = dict(opt.get("params", {}))
    defaults = {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps, "weight_decay": t.weight_decay}
    adamw = {k: (defaults[k] if params.get(k, AUTO) == AUTO else params[k]) for k in defaults}
    adamw["betas"] = tuple(adamw["betas"])
    left = [k for k, v in _walk(c) if v == AUTO]
    if left:
        raise ConfigError(f"the DeepSpeed config has \"auto\" values megaflow cannot fill: {', '.join(left)}; "
                          "set them explicitly")
    return c, adamw


def _walk(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _walk(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), node)]


def load_ds_config(cfg: Config, *, grad_accum_steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read the template or the user's file and fill it (see `fill_ds_config`)."""
    path = template_path(cfg)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the DeepSpeed config {path}: {exc}") from exc
    return fill_ds_config(raw, cfg, grad_accum_steps=grad_accum_steps)


def gradient_divisor(ds_config: dict[str, Any], world_size: int, sp_size: int) -> int:
    """What DeepSpeed divides the summed gradients of the sequence × data group by.

    ZeRO-2 corrects its average for sequence parallelism (divides by dp = world / sp); ZeRO-3's
    reduce-scatter path divides by the whole group (world). Multiplying each rank's loss by this
    number makes the reduced gradient the sum over ranks, i.e. the one-process gradient.
    """
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    return world_size if stage == 3 else world_size // sp_size


def diffusers_layout(model_cls: type, config: dict[str, Any],
                     dtype: torch.dtype) -> tuple[dict[str, torch.dtype], dict[str, torch.Tensor]]:
    """What `model_cls.from_pretrained(..., torch_dtype=dtype)` makes, without any weights:
    each parameter's dtype (diffusers keeps `_keep_in_fp32_modules` in fp32 under a half dtype)
    and the buffers computed at construction (rotary tables), built under the same default dtype."""
    plain = meta_build(model_cls, config, dtype)
    param_dtypes = {name: diffusers_param_dtype(model_cls, name, dtype) if p.is_floating_point() else p.dtype
                    for name, p in plain.named_parameters()}
    return param_dtypes, dict(plain.named_buffers())


def _zero_init_config(ds_config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config `zero.Init` builds `dtype` parameters from. `zero.Init(dtype=...)` is
    not used: on an accelerator without fp16 (DeepSpeed's CPU accelerator) it ignores the
    argument and builds bf16; with `dtype=None` the config's bf16 / fp16 flags decide."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"ZeRO-3 builds transformers in float32, bfloat16 or float16, not {dtype}")
    c = copy.deepcopy(ds_config)
    c["bf16"] = {**c.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    c["fp16"] = {**c.get("fp16", {}), "enabled": dtype == torch.float16}
    return c


def _cast_partitioned(param: nn.Parameter, dtype: torch.dtype) -> None:
    """Change the dtype of a ZeRO-3 parameter in place: its partition and its (empty, or whole
    when persisted) data; gathers then run in that dtype."""
    param.ds_tensor.data = param.ds_tensor.data.to(dtype)
    param.data = param.data.to(dtype)


def zero3_transformer_loader(ds_config: dict[str, Any], *, weights: bool = True,
                             seed: int = 0) -> Callable[[type, Path, torch.dtype], nn.Module]:
    """A loader that builds a diffusers model from `folder/config.json` under `deepspeed.zero.Init`
    (parameters partitioned as they are created) and fills it module by module from the
    safetensors files, gathering one module's parameters at a time. `weights=False` (a random
    folder, `megaflow.models.random_model`) fills it with random weights instead, the values
    `random_transformer_loader(seed=seed)` gives on one process.

    The result has the dtypes `from_pretrained(torch_dtype=dtype)` gives on one process: every
    parameter in `dtype` except diffusers' keep-in-fp32 modules, and the construction-time buffers
    (rotary tables) exactly as a plain build computes them."""

    def load(model_cls: type, folder: Path, dtype: torch.dtype) -> nn.Module:
        import deepspeed
        import torch.distributed as dist

        config = model_cls.load_config(folder)
        param_dtypes, plain_buffers = diffusers_layout(model_cls, config, dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with deepspeed.zero.Init(config_dict_or_path=_zero_init_config(ds_config, dtype), dtype=None,
                                    data_parallel_group=dist.group.WORLD):
                model = model_cls.from_config(config)
        finally:
            torch.set_default_dtype(previous)
        for name, param in model.named_parameters():
            if param.dtype != param_dtypes[name]:
                _cast_partitioned(param, param_dtypes[name])
        # zero.Init casts buffers made in __init__ to its dtype: take them from the plain build.
        for name, buf in model.named_buffers():
            buf.data = plain_buffers[name].to(buf.device)
        if weights:
            from megaflow.models.streaming import load_model_streaming

            load_model_streaming(model, folder, gather=lambda params: gathered_for_write(params, 3),
                                 read=dist.get_rank() == 0)
        else:
            from megaflow.models.random_model import init_random_parameter

            for module_name, module in model.named_modules():
                own = list(module.named_parameters(prefix=module_name, recurse=False))
                if own:
                    with gathered_for_write([p for _, p in own], 3):
                        if dist.get_rank() == 0:
                            for name, param in own:
                                init_random_parameter(name, param.data, seed)
        model.eval()
        return model

    return load


def _input_requires_grad(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    hidden = args[0] if args else None
    if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and not hidden.requires_grad:
        return (hidden.detach().requires_grad_(True),) + tuple(args[1:])
    return None


def set_leaf_modules(transformer: nn.Module, block_classes: tuple[type[nn.Module], ...]) -> None:
    """ZeRO-3 gathers each transformer block's parameters as one unit (one fetch per block).

    A leaf module's parameters are released by its backward hook; when the block's input needs
    no gradient (LoRA: the frozen patch embedding feeds the first block) that hook fires before
    the block's parameter gradients are accumulated, so block inputs are made to require grad."""
    from deepspeed.utils import set_z3_leaf_modules

    blocks = set_z3_leaf_modules(transformer, list(block_classes))
    for block in blocks:
        block.register_forward_pre_hook(_input_requires_grad)


def initialize_engine(transformer: nn.Module, trainable: list[nn.Parameter], ds_config: dict[str, Any],
                      adamw: dict[str, Any], mpu: Any) -> tuple[Any, torch.optim.Optimizer]:
    """`deepspeed.initialize` with a client AdamW over the trainable parameters; returns the
    engine and the client optimizer (whose param_groups carry the learning rate)."""
    import deepspeed

    optimizer = torch.optim.AdamW(trainable, **adamw)
    engine, _, _, _ = deepspeed.initialize(model=transformer, optimizer=optimizer, config=ds_config, mpu=mpu)
    return engine, optimizer


def reference_engine(transformer: nn.Module, ds_config: dict[str, Any], mpu: Any) -> Any:
    """A second engine without optimizer for the frozen KL reference (ZeRO-3 inference)."""
    import deepspeed

    cfg = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
    engine, _, _, _ = deepspeed.initialize(model=transformer, config=cfg, mpu=mpu)
    return engine


def gathered(params: list[nn.Parameter], zero_stage: int):
    """Context in which ZeRO-3 partitioned `params` are whole (read-only); a no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def gathered_for_write(params: list[nn.Parameter], zero_stage: int):
    """Context in which ZeRO-3 partitioned `params` are whole and rank 0's changes to them are
    kept (broadcast and re-partitioned on exit); a no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


#: Marks parameters held whole by `gathered_for_rollout` (a ZeRO-3 module id never uses it).
_ROLLOUT_HOLD = -1


@contextlib.contextmanager
def gathered_for_rollout(module: nn.Module) -> Iterator[None]:
    """Gather every ZeRO-3 parameter of `module` once and keep it whole until the context ends,
    then re-partition. ZeRO-3 releases a parameter after a module's forward only when no active
    sub-module holds it, so the parameters are held by a marker for the whole rollout."""
    import deepspeed

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in params:
            p.ds_active_sub_modules.add(_ROLLOUT_HOLD)
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(_ROLLOUT_HOLD)
