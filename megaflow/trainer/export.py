"""`megaflow export`: consolidated trainable weights (LoRA or full, diffusers layout) from a
checkpoint, including a DeepSpeed ZeRO-2/3 checkpoint whose weights are sharded over ranks.

A full fine-tune is streamed tensor by tensor from the shards (memory-mapped) into safetensors
files, so exporting a 14B transformer needs about one tensor of memory, not the whole model.

When the checkpoint holds an EMA of the trainable weights (`train.ema_decay`), the EMA is exported
by default (`ema=False`, `megaflow export --no-ema`: the raw trained weights); a ZeRO-3 run's EMA
shards are assembled one tensor at a time as well (`megaflow.trainer.ema.read_ema`)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch

from megaflow.config import load_config
from megaflow.errors import ConfigError
from megaflow.trainer.ema import describe_weights, read_ema, weights_used
from megaflow.trainer.state import ENGINE_TAG, checkpoint_meta, find_resumable

#: Parameter name → a function that reads that parameter (fp32, whole).
LazyState = dict[str, Callable[[], torch.Tensor]]

log = logging.getLogger("megaflow")


def checkpoint_state(checkpoint: Path, ema: bool = True) -> LazyState:
    """`consolidated_state`, with the EMA's tensors in place of the trained ones when `ema` and the
    checkpoint has an EMA (parameters the EMA does not follow keep their trained values)."""
    state = consolidated_state(checkpoint)
    if weights_used(checkpoint, ema) != "ema":
        return state
    averaged = read_ema(checkpoint)
    unknown = [k for k in averaged if k not in state]
    if unknown:
        raise ConfigError(f"the EMA of checkpoint {checkpoint} follows parameters its trained weights do not have "
                          f"({', '.join(unknown[:3])}); export the raw weights with --no-ema")
    return {**state, **averaged}


def consolidated_state(checkpoint: Path) -> LazyState:
    """The trainable parameters of a checkpoint directory, each read only when asked for: from
    the DeepSpeed shards (zero_to_fp32's lazy, memory-mapped mode) or from a single process's
    `trainable.safetensors`."""
    meta = checkpoint_meta(checkpoint)
    if meta.get("deepspeed"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "engine"), tag=ENGINE_TAG, lazy_mode=True,
                                                        exclude_frozen_parameters=bool(meta.get("lora")))
        return {name: (lambda t=t: t.contiguous() if not isinstance(t, torch.Tensor) else t)
                for name, t in lazy.items()}
    from safetensors import safe_open

    handle = safe_open(str(checkpoint / "trainable.safetensors"), framework="pt")
    return {name: (lambda n=name: handle.get_tensor(n)) for name in handle.keys()}


def base_tensor_shapes(transformer: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor of a base model's `transformer/` folder: from its safetensors
    headers, or, for a random folder (`model.path=random:...`, no weights on disk), from the model
    its `config.json` builds on the meta device."""
    from megaflow.models.random_model import is_random_folder, random_transformer_loader
    from megaflow.models.streaming import open_weights

    if is_random_folder(transformer.parent):
        import diffusers

        model_cls = getattr(diffusers, json.loads((transformer / "config.json").read_text())["_class_name"])
        model = random_transformer_loader("meta")(model_cls, transformer, torch.float32)
        return {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return {name: tuple(handle.get_slice(name).get_shape()) for name, handle in open_weights(transformer).items()}


def _export_full(checkpoint: Path, state: LazyState, base_transformer: Path, output: Path) -> None:
    """`output/transformer/`: the checkpoint's config and its weights in the base model's tensor
    order, streamed one tensor at a time."""
    from megaflow.models.streaming import TensorSpec, write_safetensors_folder

    base = base_tensor_shapes(base_transformer)
    missing = [k for k in base if k not in state]
    extra = [k for k in state if k not in base]
    if missing or extra:
        raise ConfigError(f"checkpoint {checkpoint} does not hold the weights of the transformer in {base_transformer} "
                          f"(missing {missing[:3]}, unknown {extra[:3]}); export with the run's own config")
    specs = {name: TensorSpec(torch.float32, shape) for name, shape in base.items()}
    folder = output / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    config = checkpoint / "transformer" / "config.json"
    shutil.copyfile(config if config.is_file() else base_transformer / "config.json", folder / "config.json")
    write_safetensors_folder(folder, specs, ((name, state[name]().float()) for name in specs))


def export_checkpoint(checkpoint: str | Path, output: str | Path, config: str | Path | None = None, *,
                      ema: bool = True) -> Path:
    """Write `output/pytorch_lora_weights.safetensors` (LoRA) or `output/transformer/` (full
    fine-tune) from `checkpoint`; the run's `config.yaml` (two levels up, or `config`) names the
    base model. The checkpoint's EMA weights when it has them and `ema` (see `weights_used`),
    else the trained ones. Runs in one process on CPU."""
    from megaflow.models import resolve_model_path
    from megaflow.trainer.loop import load_adapter

    checkpoint = find_resumable(Path(checkpoint).parent, str(checkpoint), warn=False)
    config = Path(config) if config else checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"cannot find the run's config {config}; pass --config with the run's config.yaml")
    cfg = load_config(str(config), ["parallel.zero_stage=0", "parallel.sp_size=1", "rollout.gather_weights=false",
                                    "parallel.offload=false", "parallel.hpz_partition_size=1", "parallel.ds_config=null",
                                    "model.init_weights=null", "algorithm.kl_beta=0"])
    state = checkpoint_state(checkpoint, ema)
    log.info("exporting %s of %s", describe_weights(checkpoint, ema), checkpoint)
    output = Path(output)
    if not checkpoint_meta(checkpoint).get("lora"):
        _export_full(checkpoint, state, resolve_model_path(cfg.model.path, cfg.model.family) / "transformer", output)
        return output
    adapter = load_adapter(cfg, torch.device("cpu"))
    named = dict(adapter.transformer.named_parameters())
    missing = [k for k in state if k not in named]
    if missing:
        raise ConfigError(f"checkpoint {checkpoint} holds weights the model of {config} does not have "
                          f"({', '.join(missing[:3])}…); export with the run's own config")
    with torch.no_grad():
        for name, read in state.items():
            named[name].copy_(read().to(named[name].dtype))
    adapter.save_trainable(output)
    return output
