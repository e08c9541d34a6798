"""Launch `megaflow train` as real processes: one process, `torchrun`, or the DeepSpeed launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaflow.parallel.topology import free_port


def run_env() -> dict[str, str]:
    """One thread per process (so every layout runs the same CPU kernels). DS_ACCELERATOR is left
    unset: without CUDA the trainer selects DeepSpeed's CPU accelerator and gloo by itself."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        env.pop(key, None)
    return env


def train_command(nproc: int, args: list[str]) -> list[str]:
    """`python -m megaflow train ARGS` for one process, `torchrun` for several."""
    if nproc == 1:
        return [sys.executable, "-m", "megaflow", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "megaflow", "train", *args]


def run(cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def tiny_args(model_dir: Path, output_dir: Path, *overrides: str) -> list[str]:
    args = ["--config", "tiny", "--output-dir", str(output_dir), "--no-progress", "--set", f"model.path={model_dir}",
            "--set", "train.sample_every=0"]
    for o in overrides:
        args += ["--set", o]
    return args


@pytest.fixture(scope="session")
def megaflow_launch():
    """The helpers above, for tests in this folder."""
    import types

    return types.SimpleNamespace(run=run, train_command=train_command, metrics=metrics, tiny_args=tiny_args,
                                 env=run_env)
