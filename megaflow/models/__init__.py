"""Model adapters, one per family, and the registry that maps a family name to its adapter.

Families are imported when first asked for, so `import megaflow.models` (and the CLI) does not
pay for importing diffusers and transformers.
"""
from __future__ import annotations

import importlib

from megaflow.errors import ConfigError
from megaflow.models.base import Conditioning, ModelAdapter

#: Family name (recipe `model.family`) → "module:AdapterClass", imported on first use.
ADAPTERS: dict[str, str] = {"wan": "megaflow.models.wan:WanAdapter"}


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


__all__ = ["ADAPTERS", "Conditioning", "ModelAdapter", "get_adapter"]
