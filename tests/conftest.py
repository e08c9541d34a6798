"""Shared pytest fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

# Triton fixes interpreter mode when it is first imported, and deepspeed and diffusers import it
# during collection: on a machine without a GPU, ask for the interpreter before anything does, so
# the kernel tests run in this process (see tests/kernels/conftest.py).
if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models' ops only wait for the other thread on a busy 2-core machine (measured: a
    HunyuanVideo trainer iteration 27.7 s with two threads, 1.7 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan 2.1 T2V diffusers folder (`megaflow.models.tiny`), written once per session."""
    from megaflow.models.tiny import write_tiny_wan

    return write_tiny_wan(tmp_path_factory.mktemp("tiny-wan") / "model")
