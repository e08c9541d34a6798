"""Regional torch.compile (`train.compile: true`): each transformer block's `forward` is compiled in
place, so the module's `__call__` and its hooks stay eager around the compiled graph: ZeRO-3's
parameter fetch and release, activation checkpointing (diffusers' `_gradient_checkpointing_func`
calls the block, whose compiled forward then runs inside the checkpoint and again in its
recomputation) and sequence parallelism's processors (traced as part of the block). peft's LoRA
layers are submodules of the block and are traced with it (enabling / disabling the adapters for
the KL reference is a guard: the reference gets its own compiled variant).

The blocks of a model share one code object, so dynamo compiles a variant once and reuses it for
every block with the same guards (the first block, whose input needs no gradient, is a second
variant during training; no-grad rollouts another). Compilation is lazy: the first forward traces.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_blocks(transformer: nn.Module, block_classes: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """Replace `forward` of every block of `block_classes` in `transformer` by `torch.compile(forward)`
    (an instance attribute; the class is untouched); returns the blocks. Apply after LoRA, sequence
    parallelism and activation checkpointing; `ValueError` if no module is such a block."""
    blocks = [m for m in transformer.modules() if isinstance(m, block_classes)]
    if not blocks:
        names = ", ".join(c.__name__ for c in block_classes)
        raise ValueError(f"{type(transformer).__name__} has no {names} blocks to compile")
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return blocks
