"""Checkpoints: everything a run needs to continue exactly, written atomically, newest k kept.

A checkpoint is `output_dir/checkpoints/iteration_NNNNNN/` holding
- the trainable weights in diffusers layout (`pytorch_lora_weights.safetensors` or
  `transformer/`), consolidated, for pipelines and `megaflow export`;
- single process: `trainable.safetensors` (trainable parameters by name) and `optimizer.pt`
  (the AdamW state dict, tensors only, read back with `weights_only=True`);
- DeepSpeed: the engine's sharded checkpoint under `engine/` (ZeRO partitions of weights and
  optimizer state of every rank);
- `rng_rank{r}.pt`: torch's CPU (and CUDA) generator state of every rank;
- `megaflow_checkpoint.json`, written last: iteration, world layout and the size of every file.
Prompts and noise are functions of `(seed, iteration, …)`, so the iteration is the data position.

Every rank writes into `.tmp-iteration_NNNNNN/`; after a barrier rank 0 writes the marker and
renames the directory, so a crash leaves either the previous checkpoint or a directory that
`find_resumable` recognises as incomplete and skips with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from megaflow.models.base import ModelAdapter

COMPLETE_MARKER = "megaflow_checkpoint.json"
ENGINE_TAG = "engine"
_NAME = re.compile(r"^iteration_(\d{6,})$")

log = logging.getLogger("megaflow")


def checkpoint_dir(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"iteration_{iteration:06d}"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def save_checkpoint(adapter: ModelAdapter, output_dir: str | Path, iteration: int, *, optimizer: Any = None,
                    engine: Any = None, topo: Any = None, keep: int = 0, zero_stage: int = 0) -> Path:
    """Write the checkpoint after `iteration` iterations (collective when `topo` is distributed);
    then delete all but the newest `keep` complete checkpoints (0: keep all)."""
    from megaflow.parallel.engine import gathered
    from safetensors.torch import save_file

    rank = topo.rank if topo is not None else 0
    distributed = topo is not None and topo.distributed
    final = checkpoint_dir(output_dir, iteration)
    tmp = final.with_name(f".tmp-{final.name}")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if distributed:
        topo.barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp / "engine"), tag=ENGINE_TAG, client_state={"iteration": iteration},
                               save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    trainable = adapter.trainable_parameters() if adapter.uses_lora else list(adapter.transformer.parameters())
    with gathered(trainable, zero_stage):
        if rank == 0:
            adapter.save_trainable(tmp)
            if engine is None:
                named = {n: p.detach().contiguous() for n, p in adapter.transformer.named_parameters() if p.requires_grad}
                save_file(named, str(tmp / "trainable.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if distributed:
        topo.barrier()
    if rank == 0:
        meta = {"iteration": iteration, "lora": adapter.uses_lora, "deepspeed": engine is not None,
                "world_size": topo.world_size if topo is not None else 1,
                "sp_size": topo.sp_size if topo is not None else 1, "files": _file_sizes(tmp)}
        marker = tmp / COMPLETE_MARKER
        marker.write_text(json.dumps(meta, indent=1))
        with open(marker, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in complete_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    if distributed:
        topo.barrier()
    return final


def _is_complete(directory: Path) -> str | None:
    """None if `directory` is a complete checkpoint, else why not."""
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        return f"it has no {COMPLETE_MARKER} (the write did not finish)"
    try:
        meta = json.loads(marker.read_text())
    except ValueError:
        return f"its {COMPLETE_MARKER} is not valid JSON"
    for name, size in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or truncated"
    return None


def complete_checkpoints(output_dir: str | Path, *, warn: bool = False) -> list[Path]:
    """Complete checkpoint directories, oldest first; incomplete ones are skipped (with a
    warning when `warn`)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            continue
        if not _NAME.match(d.name):
            if warn and d.name.startswith(".tmp-"):
                log.warning("skipping %s: an unfinished checkpoint write", d)
            continue
        problem = _is_complete(d)
        if problem is None:
            found.append(d)
        elif warn:
            log.warning("skipping checkpoint %s: %s", d, problem)
    return sorted(found, key=lambda d: int(_NAME.match(d.name).group(1)))


def find_resumable(output_dir: str | Path, resume: str, *, warn: bool = True) -> Path | None:
    """`resume` = "auto": the newest complete checkpoint under `output_dir` (None if there is
    none); otherwise a checkpoint directory path, which must be complete."""
    if resume == "auto":
        found = complete_checkpoints(output_dir, warn=warn)
        return found[-1] if found else None
    from megaflow.errors import ConfigError

    path = Path(resume)
    problem = _is_complete(path) if path.is_dir() else "it does not exist"
    if problem is not None:
        raise ConfigError(f"cannot resume from {path}: {problem}; pass --resume auto or a complete "
                          "checkpoints/iteration_NNNNNN directory")
    return path


def load_checkpoint(path: Path, adapter: ModelAdapter, *, optimizer: Any = None, engine: Any = None,
                    topo: Any = None) -> int:
    """Restore weights, optimizer state and RNG from `path`; returns the iteration it was taken at."""
    from megaflow.errors import ConfigError
    from safetensors.torch import load_file

    meta = json.loads((path / COMPLETE_MARKER).read_text())
    world = topo.world_size if topo is not None else 1
    if bool(meta.get("deepspeed")) != (engine is not None):
        raise ConfigError(f"checkpoint {path} was written {'with' if meta.get('deepspeed') else 'without'} "
                          "DeepSpeed; resume it with the same parallel.zero_stage kind (0 vs 2/3)")
    if engine is not None:
        load_path, _ = engine.load_checkpoint(str(path / "engine"), tag=ENGINE_TAG, load_module_strict=False)
        if load_path is None:
            raise ConfigError(f"DeepSpeed could not load the engine checkpoint in {path / 'engine'}")
    else:
        named = dict(adapter.transformer.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(path / "trainable.safetensors")).items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rank = topo.rank if topo is not None else 0
    rng = path / f"rng_rank{rank}.pt"
    if rng.is_file() and meta.get("world_size", 1) == world:
        state = torch.load(rng, weights_only=True)
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    return int(meta["iteration"])
