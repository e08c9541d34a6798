"""`megaflow export`: consolidated trainable weights (LoRA or full, diffusers layout) from a
checkpoint, including a DeepSpeed ZeRO-2/3 checkpoint whose weights are sharded over ranks."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megaflow.config import load_config
from megaflow.errors import ConfigError
from megaflow.trainer.state import COMPLETE_MARKER, ENGINE_TAG, find_resumable


def consolidated_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (fp32, whole) from a checkpoint directory."""
    meta = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    if meta.get("deepspeed"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "engine"), tag=ENGINE_TAG,
                                                        exclude_frozen_parameters=bool(meta.get("lora")))
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "trainable.safetensors"))


def export_checkpoint(checkpoint: str | Path, output: str | Path, config: str | Path | None = None) -> Path:
    """Write `output/pytorch_lora_weights.safetensors` (LoRA) or `output/transformer/` (full
    fine-tune) from `checkpoint`; the run's `config.yaml` (two levels up, or `config`) names the
    base model. Runs in one process on CPU."""
    from megaflow.trainer.loop import load_adapter

    checkpoint = find_resumable(Path(checkpoint).parent, str(checkpoint), warn=False)
    config = Path(config) if config else checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"cannot find the run's config {config}; pass --config with the run's config.yaml")
    cfg = load_config(str(config), ["parallel.zero_stage=0", "parallel.sp_size=1", "rollout.gather_weights=false",
                                    "parallel.offload=false", "parallel.hpz_partition_size=1", "parallel.ds_config=null"])
    state = consolidated_state(checkpoint)
    adapter = load_adapter(cfg, torch.device("cpu"))
    named = dict(adapter.transformer.named_parameters())
    missing = [k for k in state if k not in named]
    if missing:
        raise ConfigError(f"checkpoint {checkpoint} holds weights the model of {config} does not have "
                          f"({', '.join(missing[:3])}…); export with the run's own config")
    with torch.no_grad():
        for name, tensor in state.items():
            named[name].copy_(tensor.to(named[name].dtype))
    output = Path(output)
    adapter.save_trainable(output)
    return output
