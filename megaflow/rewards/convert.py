"""`megaflow convert-reward KIND SRC DST`: turn a published reward checkpoint into a folder that
megaflow loads with transformers (safetensors weights + configs), once, offline.

Each converter lives next to its reward and is looked up here by name, so the command imports
only the one it runs.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from megaflow.errors import ConfigError

__all__ = ["CONVERTERS", "convert_reward"]

#: kind -> "module:function"; the function is `convert(src, dst, base) -> dst`, where `base` is
#: the folder of the matching transformers model (config, tokenizer, processor) when needed.
CONVERTERS: dict[str, str] = {
    "imagereward": "megaflow.rewards.imagereward:convert_imagereward",
    "hpsv2": "megaflow.rewards.clip:convert_hpsv2",
}


def converter(kind: str) -> Callable[[Path, Path, Path | None], Path]:
    """The converter function of `kind`; ConfigError naming the kinds if unknown."""
    if kind not in CONVERTERS:
        raise ConfigError(f"no converter for {kind!r}; available: {', '.join(sorted(CONVERTERS)) or '(none)'}")
    module, function = CONVERTERS[kind].split(":")
    return getattr(importlib.import_module(module), function)


def convert_reward(kind: str, src: str | Path, dst: str | Path, base: str | Path | None = None) -> Path:
    """Convert the checkpoint `src` of reward `kind` into the folder `dst` (which must not hold
    a model already); returns `dst`."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.exists():
        raise ConfigError(f"convert-reward {kind}: source '{src}' does not exist")
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"convert-reward {kind}: destination '{dst}' is not empty; choose a new folder")
    return converter(kind)(src, dst, None if base is None else Path(base).expanduser())
