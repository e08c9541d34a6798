"""The built-in demo: a tiny pretrained Wan text-to-video model of the synthetic shapes world.

`base_model_dir()` is the diffusers-format folder shipped in the package (written by
`megaflow pretrain-demo`); `megaflow.demo.world` renders and captions clips; the `shapes`
reward (`megaflow.demo.verifier`) verifies them.
"""
from __future__ import annotations

from pathlib import Path

from megaflow.errors import ModelLoadError

#: Where the shipped weights live (package data).
BASE_MODEL_DIR = Path(__file__).parent / "base_model"


def base_model_dir() -> Path:
    """The shipped demo model folder (`WanPipeline.from_pretrained` loads it); `ModelLoadError` if absent."""
    if not (BASE_MODEL_DIR / "model_index.json").is_file():
        raise ModelLoadError(f"the demo model is missing from {BASE_MODEL_DIR}; rebuild it with "
                             "`megaflow pretrain-demo` (about 20 minutes on a 2-core CPU) or reinstall megaflow")
    return BASE_MODEL_DIR


__all__ = ["BASE_MODEL_DIR", "base_model_dir"]
