"""SIGTERM / SIGUSR1 become a stop request the loop polls between iterations; a repeat after the
grace period exits at once; repeats within it are the same request delivered twice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from megaflow.trainer.preemption import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_becomes_a_request_and_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with StopRequest(repeat_grace_s=60) as stop:
        assert stop.agreed() is None and not stop.requested
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)  # the same request delivered twice: still running
        assert stop.requested and stop.agreed() == sig.name
    assert signal.getsignal(sig) is before


def test_a_repeat_after_the_grace_period_exits_at_once():
    script = ("import os, signal, time\n"
              "from megaflow.trainer.preemption import StopRequest\n"
              "with StopRequest(repeat_grace_s=0.2) as stop:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('requested', stop.requested, flush=True)\n"
              "    time.sleep(0.5)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(5)\n"
              "    print('still running', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM
    assert "requested True" in proc.stdout and "still running" not in proc.stdout
    assert "exiting at once" in proc.stderr
