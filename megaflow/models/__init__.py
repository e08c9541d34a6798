"""Model adapters, one per family, and the registry that maps a family name to its adapter.

Families are imported when first asked for, so `import megaflow.models` (and the CLI) does not
pay for importing diffusers and transformers.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from megaflow.errors import ConfigError
from megaflow.models.base import Conditioning, ModelAdapter, TextConditioning

#: Family name (recipe `model.family`) → "module:AdapterClass", imported on first use.
ADAPTERS: dict[str, str] = {
    "wan": "megaflow.models.wan:WanAdapter",
    "wan_i2v": "megaflow.models.wan_i2v:WanI2VAdapter",
    "hunyuan": "megaflow.models.hunyuan:HunyuanVideoAdapter",
    "skyreels_i2v": "megaflow.models.hunyuan:SkyReelsI2VAdapter",
    "flux": "megaflow.models.flux:FluxAdapter",
    "sd3": "megaflow.models.sd3:SD3Adapter",
}


def get_adapter(family: str) -> type[ModelAdapter]:
    """The adapter class of a model family; `ConfigError` listing the valid families otherwise."""
    try:
        target = ADAPTERS[family]
    except KeyError:
        raise ConfigError(
            f"unknown model family {family!r}; valid families: {', '.join(sorted(ADAPTERS))}"
        ) from None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def resolve_model_path(path: str, family: str = "wan") -> Path:
    """A model folder: the aliases `tiny` (the family's tiny random model, written once to the
    cache), `demo` (the shipped shapes-world Wan model) and `random:NAME[@SCALE]` (a real model's
    folder with a weightless transformer, `megaflow.models.random_model`), else `path` itself."""
    if str(path).startswith("random:"):
        from megaflow.models.random_model import resolve_random_path

        return resolve_random_path(str(path), family)
    if path == "tiny":
        from megaflow.models.tiny import tiny_model_dir

        return tiny_model_dir(family)
    if path == "demo":
        if family != "wan":
            raise ConfigError(f"model.path=demo is the shipped Wan model of the shapes world; model.family={family!r} "
                              "has no demo model (use model.path=tiny or a downloaded folder)")
        from megaflow.demo import base_model_dir

        return base_model_dir()
    return Path(path)


__all__ = ["ADAPTERS", "Conditioning", "ModelAdapter", "TextConditioning", "get_adapter", "resolve_model_path"]
