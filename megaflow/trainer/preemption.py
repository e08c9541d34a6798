"""Stopping on SIGTERM / SIGUSR1 (what Slurm and Kubernetes send before they kill a job): finish
the current iteration, write a checkpoint, exit 0 on every rank.

A repeat of the signal more than `repeat_grace_s` after the first exits at once. Repeats within
the grace period are the same request delivered twice (Slurm signals every process of a job step,
and the DeepSpeed launcher and torchrun forward the signal they get to their workers as well).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("megaflow")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Context that turns the stop signals into a request the training loop polls between
    iterations with `agreed()`; the previous handlers come back on exit."""

    def __init__(self, repeat_grace_s: float = 5.0) -> None:
        self.repeat_grace_s = repeat_grace_s
        self.signal_name: str | None = None
        self._at: float | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self._at is None:
            self._at, self.signal_name = now, name
            log.warning("%s received: finishing this iteration, then writing a checkpoint and exiting "
                        "(send it again to exit at once)", name)
        elif now - self._at > self.repeat_grace_s:
            log.warning("%s received again: exiting at once, without a checkpoint", name)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self._at is not None

    def agreed(self, device: torch.device | None = None) -> str | None:
        """The name of the stop signal any rank received, or None (collective in a distributed
        run, so that every rank stops after the same iteration)."""
        number = int(signal.Signals[self.signal_name]) if self.signal_name else 0
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([number], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            number = int(flag.item())
        return signal.Signals(number).name if number else None
