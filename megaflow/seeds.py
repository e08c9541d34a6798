"""Seeds as functions of logical coordinates, never of rank or layout (ARCHITECTURE.md principle 3)."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*key: int | str) -> int:
    """A 63-bit seed from a tuple such as `(seed, "noise", iteration, prompt, sample, step)`."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*key: int | str) -> torch.Generator:
    """A CPU generator seeded by `derive_seed(*key)`."""
    return torch.Generator().manual_seed(derive_seed(*key))
