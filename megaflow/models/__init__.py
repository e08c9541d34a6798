"""Model adapters, one per family, and the registry that maps a family name to its adapter."""
from __future__ import annotations

from megaflow.errors import ConfigError
from megaflow.models.base import Conditioning, ModelAdapter
from megaflow.models.wan import WanAdapter

#: Family name (recipe `model.family`) → adapter class.
ADAPTERS: dict[str, type[ModelAdapter]] = {"wan": WanAdapter}


def get_adapter(family: str) -> type[ModelAdapter]:
    """The adapter class of a model family; `ConfigError` listing the valid families otherwise."""
    try:
        return ADAPTERS[family]
    except KeyError:
        raise ConfigError(
            f"unknown model family {family!r}; valid families: {', '.join(sorted(ADAPTERS))}"
        ) from None


__all__ = ["ADAPTERS", "Conditioning", "ModelAdapter", "WanAdapter", "get_adapter"]
