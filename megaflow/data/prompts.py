"""Prompt sets: read once, then a deterministic batch per iteration (same on every rank).

A prompt file is plain text (one prompt per line) or JSONL whose lines are
`{"prompt": "...", "image": "path", ...}`: `image` for image-to-video models (relative to the
JSONL file), and any other fields are the prompt's metadata, handed to the rewards with each of
its videos (GenEval-style `{"prompt": ..., "tag": ..., "include": [...]}`). Relative prompt-file paths are looked up in the working directory, then among the
files that ship with the built-in recipes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from megaflow.errors import DataError
from megaflow.seeds import generator


def resolve_data_path(path: str | Path) -> Path:
    """`path` as given when it exists, else the built-in recipes' file of that name."""
    from megaflow.config import RECIPES_DIR

    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    shipped = RECIPES_DIR / given
    return shipped if shipped.exists() else given


class PromptSet:
    """An ordered list of prompts (with an image each for I2V); iteration i's batch is a function
    of `(seed, i)` only.

    Batches walk through a fresh seeded permutation per epoch, so every prompt is used once
    per epoch and a resumed run picks up exactly where it stopped.
    """

    def __init__(self, prompts: Sequence[str], *, seed: int = 0, images: Sequence[Path] | None = None,
                 metadata: Sequence[dict[str, Any]] | None = None) -> None:
        if images is not None and len(images) != len(prompts):
            raise DataError(f"{len(prompts)} prompts but {len(images)} images; every prompt needs one image")
        if metadata is not None and len(metadata) != len(prompts):
            raise DataError(f"{len(prompts)} prompts but {len(metadata)} metadata records")
        keep = [i for i, p in enumerate(prompts) if p.strip()]
        if not keep:
            raise DataError("the prompt set is empty: give data.prompt_file (one prompt per line) or data.prompts")
        self.prompts = [prompts[i].strip() for i in keep]
        self.images = None if images is None else [Path(images[i]) for i in keep]
        #: Each prompt's metadata (the JSONL record's other fields; empty for plain prompts).
        self.metadata = [dict(metadata[i]) if metadata is not None else {} for i in keep]
        self.seed = seed

    @classmethod
    def from_file(cls, path: str | Path, *, seed: int = 0) -> "PromptSet":
        """Plain text or (`.jsonl`) prompt/image records; see the module docstring."""
        path = resolve_data_path(path)
        if not path.is_file():
            raise DataError(f"prompt file '{path}' does not exist; set data.prompt_file to a text file with one "
                            "prompt per line (or a .jsonl of {\"prompt\": ..., \"image\": ...} records)")
        lines = path.read_text(encoding="utf-8").splitlines()
        if not any(line.strip() for line in lines):
            raise DataError(f"prompt file '{path}' is empty; it needs one prompt per line")
        if path.suffix != ".jsonl":
            return cls(lines, seed=seed)
        prompts, images, metadata = [], [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt, image = str(record["prompt"]), record.get("image")
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}, line {number}: expected {{\"prompt\": ..., \"image\": ...}}, got "
                                f"{line[:80]!r} ({exc})") from exc
            prompts.append(prompt)
            images.append(None if image is None else path.parent / image)
            metadata.append({k: v for k, v in record.items() if k not in ("prompt", "image")})
        if all(i is None for i in images):
            return cls(prompts, seed=seed, metadata=metadata)
        missing = [str(i) for i in images if i is None or not i.is_file()]
        if missing:
            raise DataError(f"{path}: {len(missing)} image(s) missing, e.g. {missing[0]}; every record of an "
                            "image-to-video prompt file needs an existing \"image\" (relative to the file)")
        return cls(prompts, seed=seed, images=images, metadata=metadata)

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
