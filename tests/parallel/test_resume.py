"""Stopping and continuing: kill -9 between checkpoints, or SIGTERM (what Slurm and Kubernetes send
before a kill), then `--resume auto`. The run continues exactly as if it had never stopped (one
process, and two ranks under DeepSpeed ZeRO-3), every iteration logged once; the LoRA run's
ZeRO-3 checkpoints hold no frozen base weight."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaflow.monitor.writer import METRICS_FILE
from megaflow.parallel.topology import free_port

COMPARED = ("reward/mean", "reward/std", "loss/total", "loss/policy", "optim/grad_norm", "policy/ratio_mean",
            "policy/approx_kl", "advantage/abs_mean")
ITERATIONS = 4
COMMON = (f"train.iterations={ITERATIONS}", "train.save_every=1", "train.keep_checkpoints=2", "train.lr=3e-2")
ZERO3 = ("parallel.zero_stage=3",)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, tiny_wan_dir, megaflow_launch):
    """The uninterrupted run of each layout (1 process; 2 ranks on ZeRO-3), made once."""
    L = megaflow_launch
    made: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in made:
            out = tmp_path_factory.mktemp(f"straight{nproc}")
            L.run(L.train_command(nproc, L.tiny_args(tiny_wan_dir, out, *COMMON, *(ZERO3 if nproc > 1 else ()))))
            # keep_checkpoints=2: only the newest two survive.
            assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iteration_000003", "iteration_000004"]
            made[nproc] = out
        return made[nproc]

    return get


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc)."""
    children, out, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _logged(output_dir: Path) -> int:
    path = output_dir / "logs" / METRICS_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _truncated_copy(output_dir):
    """A checkpoint newer than every real one whose weights file was cut short (a crash while
    copying it in, or a disk that filled up): the marker exists, the sizes do not match."""
    ckpts = sorted((output_dir / "checkpoints").glob("iteration_*"))
    fake = output_dir / "checkpoints" / "iteration_000099"
    shutil.copytree(ckpts[-1], fake)
    victim = max((p for p in fake.rglob("*") if p.is_file() and p.name != "megaflow_checkpoint.json"),
                 key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return fake


def assert_logs_once_and_equal(run_dir: Path, straight: Path) -> None:
    """Every iteration appears once in metrics.jsonl and in TensorBoard (what a stopped run logged
    after its last checkpoint was dropped when it resumed), with the uninterrupted run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def rows(d: Path) -> list[dict]:
        return [json.loads(line) for line in (d / "logs" / METRICS_FILE).read_text().splitlines()]

    got, expected = rows(run_dir), {m["iteration"]: m for m in rows(straight)}
    assert [m["iteration"] for m in got] == list(range(1, ITERATIONS + 1))
    for m in got:
        for key in COMPARED:
            assert m[key] == pytest.approx(expected[m["iteration"]][key], rel=1e-6, abs=1e-12), (m["iteration"], key)
    assert got[-1]["optim/grad_norm"] > 0
    events = EventAccumulator(str(run_dir / "logs"))
    events.Reload()
    scalars = events.Scalars("reward/mean")
    assert [e.step for e in scalars] == list(range(1, ITERATIONS + 1))
    assert [e.value for e in scalars] == pytest.approx([m["reward/mean"] for m in got])


def assert_lora_checkpoint_holds_no_frozen_weight(checkpoint: Path) -> None:
    """A LoRA run's ZeRO-3 checkpoint stores the adapters and their optimizer state, not the frozen
    base model: every tensor of its engine files belongs to a LoRA weight."""
    from safetensors.torch import load_file

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    lora = sum(t.numel() for t in load_file(str(checkpoint / "pytorch_lora_weights.safetensors")).values())
    tensors = 0
    for f in (checkpoint / "engine").rglob("*.pt"):
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):  # what DeepSpeed's optimizer files hold
            state = torch.load(f, map_location="cpu", weights_only=True)
        assert not state.get("frozen_param_fragments"), f
        assert all("lora_" in name for name in state.get("module") or {}), f
        tensors += sum(t.numel() for t in _tensors(state))
    # fp32 partitions plus Adam's two moments of the LoRA elements over both ranks; the frozen base
    # model (18x the LoRA here) is not there.
    assert 0 < tensors <= 3 * lora + 1024, (tensors, lora)


def _tensors(node):
    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _tensors(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _tensors(v)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path, tiny_wan_dir, megaflow_launch, nproc,
                                                                straight_runs):
    L = megaflow_launch
    straight, killed = straight_runs(nproc), tmp_path / "killed"
    # Checkpoints every 2 iterations; killed once iteration 3 is logged, so the resumed run redoes
    # iteration 3 from checkpoint 2 and must not log it twice.
    args = L.tiny_args(tiny_wan_dir, killed, *COMMON, *(ZERO3 if nproc > 1 else ()), "train.save_every=2")
    proc = subprocess.Popen(L.train_command(nproc, args), env=L.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(proc, lambda: _logged(killed) >= 3, "it logged iteration 3")
    for pid in [proc.pid] + _descendants(proc.pid):  # torchrun starts its workers in their own sessions
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert not (killed / "checkpoints" / "iteration_000004").exists(), "killed too late to test resuming"
    assert _logged(killed) == 3
    fake = _truncated_copy(killed)
    resumed = L.run(L.train_command(nproc, args + ["--resume", "auto"]))
    assert f"skipping checkpoint {fake}" in resumed.stderr
    assert "at iteration 2" in resumed.stderr
    assert_logs_once_and_equal(killed, straight)
    if nproc > 1:
        assert_lora_checkpoint_holds_no_frozen_weight(killed / "checkpoints" / "iteration_000004")


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, tiny_wan_dir, megaflow_launch, straight_runs):
    """2 ranks under the DeepSpeed launcher; SIGTERM reaches rank 1 only (as from a node's own
    agent), during iteration 2: both ranks finish it, checkpoint it, and exit 0, and so does the
    launcher. No checkpoint is due before the end (save_every=0), so the one there is the signal's."""
    L = megaflow_launch
    out = tmp_path / "stopped"
    args = L.tiny_args(tiny_wan_dir, out, *COMMON, *ZERO3, "train.save_every=0")
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=2", f"--master_port={free_port()}",
                "--module", "megaflow", "train", *args]
    proc = subprocess.Popen(launcher, env=L.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def rank1() -> int | None:
        for pid in _descendants(proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--local_rank=1" in cmdline and b"megaflow" in cmdline:
                return pid
        return None

    _wait_for(proc, lambda: _logged(out) >= 1, "it logged iteration 1")
    os.kill(rank1(), signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-6000:]
    stopped_at = _logged(out)
    assert stopped_at < ITERATIONS, "the signal came too late to test stopping"
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"iteration_{stopped_at:06d}"]
    assert f"stopped by SIGTERM after iteration {stopped_at}" in output
    resumed = L.run(L.train_command(2, args + ["--resume", "auto"]))
    assert f"at iteration {stopped_at}" in resumed.stderr
    assert_logs_once_and_equal(out, straight_runs(2))
