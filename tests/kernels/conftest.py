"""Kernel tests: run the real Triton kernels, compiled on a GPU or in Triton's interpreter on CPU.

Triton decides interpreter mode when it is first imported (its own helpers such as `tl.sum` are
decorated then), so without a GPU this file sets TRITON_INTERPRET=1 as pytest imports it, before
the kernel tests import triton. Nothing else in the suite runs Triton on CPU; deepspeed, diffusers
and torch.compile's CPU backend import and run the same with the variable set. If something
imported triton before this file (a test collected earlier), the variable is left alone, the
in-process Triton tests skip, and `test_triton_suite_in_fresh_process` runs them in a fresh
interpreter instead, so they run under any collection order.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

TRITON_IMPORTED_EARLIER = "triton" in sys.modules
if not torch.cuda.is_available() and not TRITON_IMPORTED_EARLIER:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernel tests put their tensors: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def triton_import_error() -> str | None:
    """None when triton imports, else why not."""
    from megaflow.kernels.logprob import triton_import_error as reason

    return reason()


@pytest.fixture(scope="session")
def triton_in_process(triton_import_error: str | None) -> bool:
    """Whether the Triton kernels run in this process (compiled on CUDA, or interpreted on CPU)."""
    if triton_import_error is not None:
        return False
    if torch.cuda.is_available():
        return True
    from megaflow.kernels import logprob_triton

    return logprob_triton.interpreted()


@pytest.fixture
def triton_ready(triton_import_error: str | None, triton_in_process: bool) -> None:
    """Skip (with the reason) when this process cannot run the Triton kernels."""
    if triton_import_error is not None:
        pytest.skip(f"triton does not import here ({triton_import_error})")
    if not triton_in_process:
        pytest.skip("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
                    "test_triton_suite_in_fresh_process runs these tests in a fresh interpreter")
