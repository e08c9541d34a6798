"""Prompt sets: read once, then a deterministic batch per iteration (same on every rank)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from megaflow.errors import DataError
from megaflow.seeds import generator


class PromptSet:
    """An ordered list of prompts; iteration i's batch is a function of `(seed, i)` only.

    Batches walk through a fresh seeded permutation per epoch, so every prompt is used once
    per epoch and a resumed run picks up exactly where it stopped.
    """

    def __init__(self, prompts: Sequence[str], *, seed: int = 0) -> None:
        prompts = [p.strip() for p in prompts if p.strip()]
        if not prompts:
            raise DataError("the prompt set is empty: give data.prompt_file (one prompt per line) or data.prompts")
        self.prompts = prompts
        self.seed = seed

    @classmethod
    def from_file(cls, path: str | Path, *, seed: int = 0) -> "PromptSet":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"prompt file '{path}' does not exist; set data.prompt_file to a text file with one prompt per line")
        lines = path.read_text(encoding="utf-8").splitlines()
        if not any(line.strip() for line in lines):
            raise DataError(f"prompt file '{path}' is empty; it needs one prompt per line")
        return cls(lines, seed=seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.prompts), generator=generator(self.seed, "prompts", epoch))

    def batch(self, iteration: int, size: int) -> list[tuple[int, str]]:
        """The `(prompt id, text)` pairs of an iteration: `size` consecutive permuted prompts."""
        out = []
        for q in range(iteration * size, (iteration + 1) * size):
            epoch, pos = divmod(q, len(self.prompts))
            idx = int(self._epoch_order(epoch)[pos])
            out.append((idx, self.prompts[idx]))
        return out
