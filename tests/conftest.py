"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan 2.1 T2V diffusers folder (`megaflow.models.tiny`), written once per session."""
    from megaflow.models.tiny import write_tiny_wan

    return write_tiny_wan(tmp_path_factory.mktemp("tiny-wan") / "model")
