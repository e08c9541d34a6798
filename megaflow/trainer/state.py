"""Checkpoints: everything a run needs to continue exactly, written atomically, newest k kept.

A checkpoint is `output_dir/checkpoints/iteration_NNNNNN/` holding
- the trainable weights in diffusers layout (`pytorch_lora_weights.safetensors` or
  `transformer/`), consolidated, for pipelines and `megaflow export`;
- single process: `trainable.safetensors` (trainable parameters by name) and `optimizer.pt`
  (the AdamW state dict, tensors only, read back with `weights_only=True`);
- DeepSpeed: the engine's sharded checkpoint under `engine/` (ZeRO partitions of weights and
  optimizer state of every rank);
- `rng_rank{r}.pt`: torch's CPU (and CUDA) generator state of every rank;
- with an EMA of the trainable weights (`megaflow.trainer.ema`): `ema.safetensors` (whole tensors by
  parameter name, written by rank 0) or under ZeRO-3 `ema_rank{r}.safetensors` (every rank's own
  partition, assembled by `read_ema`);
- `trainer_state.json`: the trainer's JSON-able state (e.g. an algorithm's sliding-window
  position), read back with `read_trainer_state`;
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
from megaflow.trainer.ema import EMA, has_ema

COMPLETE_MARKER = "megaflow_checkpoint.json"
ENGINE_TAG = "engine"
TRAINER_STATE_FILE = "trainer_state.json"
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
                    engine: Any = None, topo: Any = None, keep: int = 0, zero_stage: int = 0, ema: EMA | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint after `iteration` iterations (collective when `topo` is distributed);
    then delete all but the newest `keep` complete checkpoints (0: keep all).

    `ema`: the EMA of the trainable weights, written beside them (every rank passes it).
    `trainer_state`: a JSON-able dict (the same on every rank) written as `trainer_state.json`.

    A LoRA run's engine state holds no frozen base weight (`exclude_frozen_parameters`), and a
    ZeRO-3 full fine-tune is written one module at a time, so no rank ever holds the whole
    transformer."""
    from megaflow.parallel.engine import gathered
    from safetensors.torch import save_file

    rank = topo.rank if topo is not None else 0
    distributed = topo is not None and topo.distributed
    if ema is not None and ema.is_swapped:
        raise RuntimeError("save_checkpoint inside EMA.swapped(): the parameters hold the EMA, not the trained weights")
    # Serialised on every rank before any collective, so a value JSON cannot hold fails everywhere.
    trainer_json = None if trainer_state is None else json.dumps(trainer_state, indent=1)
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
                               save_latest=False, exclude_frozen_parameters=adapter.uses_lora)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    adapter.save_trainable(tmp, gather=lambda params: gathered(params, zero_stage), write=rank == 0)
    if rank == 0 and engine is None:
        named = {n: p.detach().contiguous() for n, p in adapter.transformer.named_parameters() if p.requires_grad}
        save_file(named, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if ema is not None:
        ema.save(tmp, rank)
    if rank == 0 and trainer_json is not None:
        (tmp / TRAINER_STATE_FILE).write_text(trainer_json)
    if distributed:
        topo.barrier()
    if rank == 0:
        meta = {"iteration": iteration, "family": adapter.family, "lora": adapter.uses_lora,
                "deepspeed": engine is not None, "zero_stage": zero_stage, "ema": ema is not None,
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


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint: iteration, family, LoRA or full, layout, file sizes."""
    return json.loads((path / COMPLETE_MARKER).read_text())


def _no_ema_error(path: Path) -> Exception:
    from megaflow.errors import ConfigError

    return ConfigError(
        f"this run keeps an EMA of the trainable weights (train.ema_decay is set) but checkpoint {path} has none (it "
        "was written by a run without train.ema_decay). Resume without the EMA (--set train.ema_decay=null), or, to "
        f"start an EMA from these weights, export them (`megaflow export {path} --output DIR`) and begin a new run "
        "with --set model.init_weights=DIR")


def check_resumable(path: Path, *, family: str, lora: bool, zero_stage: int, world_size: int, sp_size: int,
                    ema: bool = False) -> None:
    """`ConfigError` unless the run described by the arguments can continue from checkpoint
    `path`: the same model family, LoRA or full fine-tuning, ZeRO stage and dp × sp layout, and an
    EMA in the checkpoint when the run keeps one (`ema`). Read from the marker and file names
    alone, before any model is loaded."""
    from megaflow.errors import ConfigError

    meta = checkpoint_meta(path)
    ours = {"family": family, "lora": lora, "zero_stage": zero_stage, "world_size": world_size, "sp_size": sp_size}
    names = {"family": "model.family", "lora": "model.lora", "zero_stage": "parallel.zero_stage",
             "world_size": "processes", "sp_size": "parallel.sp_size"}
    differ = [f"{names[k]}: checkpoint {meta[k]}, this run {v}" for k, v in ours.items() if k in meta and meta[k] != v]
    if differ:
        raise ConfigError(
            f"cannot resume from {path}: it was written by a different setup ({'; '.join(differ)}). Resume with the "
            "checkpoint's settings and the same number of processes (resuming on another number of ranks is not "
            "supported: megaflow does not build DeepSpeed universal checkpoints). To continue with the new setup, "
            f"export the weights (`megaflow export {path} --output DIR`) and start a new run from them with "
            "`--set model.init_weights=DIR` (optimizer state and iteration count start afresh)")
    if ema and not has_ema(path):
        raise _no_ema_error(path)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The `trainer_state` a checkpoint was saved with; {} when it has none (older checkpoints)."""
    file = Path(path) / TRAINER_STATE_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def load_checkpoint(path: Path, adapter: ModelAdapter, *, optimizer: Any = None, engine: Any = None,
                    topo: Any = None, ema: EMA | None = None) -> int:
    """Restore weights, optimizer state and RNG from `path`, and the EMA when `ema` is given (every
    rank passes it; `ConfigError` if the checkpoint has none); returns the iteration it was taken
    at. `read_trainer_state(path)` gives the trainer state."""
    from megaflow.errors import ConfigError
    from safetensors.torch import load_file

    meta = checkpoint_meta(path)
    if ema is not None and not has_ema(path):
        raise _no_ema_error(path)
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
    if ema is None and has_ema(path) and rank == 0:
        log.info("checkpoint %s holds an EMA of the trainable weights; this run keeps none (train.ema_decay unset), "
                 "so it continues without it", path)
    if ema is not None:
        try:
            ema.load(path, rank)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"cannot restore the EMA of the trainable weights from {path}: {exc}. Resume with the "
                              "checkpoint's model and parallel settings, or without the EMA (--set "
                              "train.ema_decay=null)") from exc
    state = torch.load(path / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return int(meta["iteration"])
