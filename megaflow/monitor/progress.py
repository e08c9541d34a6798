"""Progress bars: tqdm, shown on rank 0 only."""
from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress"]

T = TypeVar("T")


def _rank() -> int:
    """This process's global rank: torch.distributed when initialised, else `$RANK`, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def progress(
    iterable_or_total: Iterable[T] | int,
    desc: str,
    enabled: bool = True,
    unit: str = "it",
    leave: bool = True,
) -> tqdm:
    """A tqdm bar over an iterable, or a manual bar (`.update(n)`) when given an int total.

    Hidden (but still iterable/updatable) on non-zero ranks or when `enabled` is False;
    pass `leave=False` for inner bars.
    """
    disable = not enabled or _rank() != 0
    if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
        return tqdm(total=iterable_or_total, desc=desc, unit=unit, leave=leave, disable=disable)
    return tqdm(iterable_or_total, desc=desc, unit=unit, leave=leave, disable=disable)
