"""Checkpoints: trainable weights written atomically, newest k kept."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megaflow.models.base import ModelAdapter

COMPLETE_MARKER = "megaflow_checkpoint.json"


def checkpoint_dir(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"iteration_{iteration:06d}"


def save_checkpoint(adapter: ModelAdapter, output_dir: str | Path, iteration: int) -> Path:
    """Write the trainable weights after `iteration` iterations; a crash mid-write leaves no
    directory under the final name (written to a temporary name, marker last, then renamed)."""
    final = checkpoint_dir(output_dir, iteration)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    adapter.save_trainable(tmp)
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"iteration": iteration, "lora": adapter.uses_lora}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
