"""Activation checkpointing per transformer block (non-reentrant), for a fraction of the blocks."""
from __future__ import annotations

import math
from typing import Any

import torch.utils.checkpoint
from torch import nn


def apply_activation_checkpointing(transformer: nn.Module, block_classes: tuple[type[nn.Module], ...],
                                   fraction: float) -> list[nn.Module]:
    """Checkpoint the first `ceil(fraction · n_blocks)` blocks; returns them.

    Uses the diffusers hook (`gradient_checkpointing` + `_gradient_checkpointing_func`, through
    which the model calls every block), so the block is re-entered through its `__call__` during
    recomputation and ZeRO-3's parameter hooks run again.
    """
    blocks = [m for m in transformer.modules() if isinstance(m, block_classes)]
    chosen = blocks[:math.ceil(fraction * len(blocks) - 1e-9)] if fraction > 0 else []
    if not chosen:
        return []
    if not hasattr(transformer, "gradient_checkpointing"):
        raise TypeError(f"{type(transformer).__name__} has no diffusers gradient_checkpointing hook")
    selected = {id(b) for b in chosen}

    def run(block: nn.Module, *args: Any) -> Any:
        if id(block) in selected:
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    transformer.gradient_checkpointing = True
    transformer._gradient_checkpointing_func = run
    return chosen
