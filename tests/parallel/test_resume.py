"""Kill -9 after a checkpoint, then `--resume auto`: the run continues exactly as if it had
never stopped (one process, and two ranks under DeepSpeed ZeRO-3)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

COMPARED = ("reward/mean", "reward/std", "loss/total", "loss/policy", "optim/grad_norm", "policy/ratio_mean",
            "policy/approx_kl", "advantage/abs_mean")
COMMON = ("train.iterations=3", "train.save_every=1", "train.keep_checkpoints=2", "train.lr=3e-2")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_after_first_checkpoint(cmd, env, output_dir):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = output_dir / "checkpoints" / "iteration_000001" / "megaflow_checkpoint.json"
    deadline = time.monotonic() + 300
    while not marker.is_file():
        assert proc.poll() is None, "the run ended before writing its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # SIGKILL the launcher and every worker (torchrun starts its workers in their own sessions).
    victims = [proc.pid] + _descendants(proc.pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert not (output_dir / "checkpoints" / "iteration_000003").exists(), "killed too late to test resuming"


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


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path, tiny_wan_dir, megaflow_launch, nproc):
    L = megaflow_launch
    extra = ("parallel.zero_stage=3",) if nproc > 1 else ()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    L.run(L.train_command(nproc, L.tiny_args(tiny_wan_dir, straight, *COMMON, *extra)))
    # keep_checkpoints=2: only the newest two of the three survive.
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["iteration_000002", "iteration_000003"]

    args = L.tiny_args(tiny_wan_dir, killed, *COMMON, *extra)
    _kill_after_first_checkpoint(L.train_command(nproc, args), L.env(), killed)
    fake = _truncated_copy(killed)
    before = len(L.metrics(killed)) if (killed / "logs" / "metrics.jsonl").is_file() else 0
    resumed = L.run(L.train_command(nproc, args + ["--resume", "auto"]))
    assert f"skipping checkpoint {fake}" in resumed.stderr
    after = L.metrics(killed)[before:]  # the lines the resumed run wrote
    start = after[0]["iteration"]
    assert f"at iteration {start - 1}" in resumed.stderr and start in (2, 3)
    assert [m["iteration"] for m in after] == list(range(start, 4))
    expected = {m["iteration"]: m for m in L.metrics(straight)}
    for m in after:
        for key in COMPARED:
            assert m[key] == pytest.approx(expected[m["iteration"]][key], rel=1e-6, abs=1e-12), (m["iteration"], key)
    assert after[-1]["optim/grad_norm"] > 0
