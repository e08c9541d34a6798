"""The synthetic shapes world: one coloured shape moving in one direction on a plain background.

A clip is `float32 [F, 3, H, W]` in [0, 1] (default 9 frames of 32×32), captioned
"a red circle moving left". Everything is a function of a seed; the prompts are split into a
training set and a held-out set that shares no (colour, shape, direction) triple with it.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch

from megaflow.seeds import generator

#: Colour name → RGB in [0, 1]; far apart so the verifier can tell them from blurry pixels.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Direction name → unit motion (dx, dy) in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND: tuple[float, float, float] = (0.10, 0.10, 0.10)
#: Clip size in pixels: 9 frames = 1 + 2·4 (Wan's VAE needs 1 + t·k frames), 32×32.
FRAMES, HEIGHT, WIDTH = 9, 32, 32
_SUPERSAMPLE = 4
_PROMPT = re.compile(r"^an? (\w+) (\w+) moving (\w+)$")


@dataclass(frozen=True)
class Attributes:
    """What a clip shows: colour, shape and direction names."""

    color: str
    shape: str
    direction: str

    @property
    def prompt(self) -> str:
        """The caption, e.g. "a red circle moving left"."""
        return f"a {self.color} {self.shape} moving {self.direction}"


def all_attributes() -> list[Attributes]:
    """Every (colour, shape, direction) combination: 4 × 3 × 4 = 48."""
    return [Attributes(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def parse_prompt(prompt: str) -> Attributes:
    """`"a red circle moving left"` → `Attributes`; `ValueError` for anything else."""
    m = _PROMPT.match(" ".join(prompt.lower().split()))
    if not m or m.group(1) not in COLORS or m.group(2) not in SHAPES or m.group(3) not in DIRECTIONS:
        raise ValueError(f"{prompt!r} is not a shapes-world caption like 'a red circle moving left' "
                         f"(colours {', '.join(COLORS)}; shapes {', '.join(SHAPES)}; "
                         f"directions {', '.join(DIRECTIONS)})")
    return Attributes(m.group(1), m.group(2), m.group(3))


def split_prompts(seed: int = 0, held_out: int = 8) -> tuple[list[str], list[str]]:
    """`(train, held_out)` prompt lists. The held-out triples are drawn by `seed` so that each
    colour, shape and direction still appears in training (held-out prompts are new combinations)."""
    combos = all_attributes()
    order = torch.randperm(len(combos), generator=generator(seed, "split")).tolist()
    chosen: list[Attributes] = []
    for i in order:
        if len(chosen) == held_out:
            break
        candidate = chosen + [combos[i]]
        rest = [a for a in combos if a not in candidate]
        if all({getattr(a, f) for a in rest} == set(vals) for f, vals in
               (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS))):
            chosen = candidate
    train = [a.prompt for a in combos if a not in chosen]
    return train, [a.prompt for a in chosen]


def _coverage(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> torch.Tensor:
    """Anti-aliased coverage `[H, W]` in [0, 1] of a shape of half-size `r` centred at (cx, cy)."""
    n = _SUPERSAMPLE
    ys = (torch.arange(height * n, dtype=torch.float32) + 0.5) / n
    xs = (torch.arange(width * n, dtype=torch.float32) + 0.5) / n
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (dx.abs() <= r) & (dy.abs() <= r)
    elif shape == "triangle":
        # apex up at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
        t = (dy + r) / (2 * r)
        inside = (dy <= r) & (t >= 0) & (dx.abs() <= r * t)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return inside.float().reshape(height, n, width, n).mean(dim=(1, 3))


def render_clip(attrs: Attributes, seed: int, index: int = 0, frames: int = FRAMES, height: int = HEIGHT,
                width: int = WIDTH) -> torch.Tensor:
    """One clip `float32 [F, 3, H, W]` in [0, 1]; size, speed and start are drawn from `(seed, index)`.

    The shape stays fully inside the frame for the whole clip.
    """
    g = generator(seed, "clip", index)
    u = torch.rand(4, generator=g).tolist()
    r = 4.5 + 2.0 * u[0]  # half-size 4.5..6.5 px
    travel = (0.30 + 0.15 * u[1]) * min(height, width)  # 9.6..14.4 px over the clip
    dx, dy = DIRECTIONS[attrs.direction]
    lo_x, hi_x = r + 0.5, width - r - 0.5
    lo_y, hi_y = r + 0.5, height - r - 0.5
    # start anywhere such that start + travel·(dx, dy) stays inside
    sx = lo_x + max(0.0, -dx * travel) + u[2] * (hi_x - lo_x - abs(dx) * travel)
    sy = lo_y + max(0.0, -dy * travel) + u[3] * (hi_y - lo_y - abs(dy) * travel)
    color = torch.tensor(COLORS[attrs.color]).view(3, 1, 1)
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    out = torch.empty(frames, 3, height, width)
    for f in range(frames):
        t = f / max(1, frames - 1)
        alpha = _coverage(attrs.shape, sx + dx * travel * t, sy + dy * travel * t, r, height, width)
        out[f] = bg + (color - bg) * alpha
    return out


def sample_dataset(n: int, seed: int, prompts: list[str] | None = None, frames: int = FRAMES, height: int = HEIGHT,
                   width: int = WIDTH) -> tuple[torch.Tensor, list[str]]:
    """`n` clips `[n, F, 3, H, W]` and their captions; prompts cycle through a seeded order of
    `prompts` (default: the training split of seed 0)."""
    prompts = prompts if prompts is not None else split_prompts(0)[0]
    order = torch.randperm(len(prompts), generator=generator(seed, "dataset-order")).tolist()
    captions = [prompts[order[i % len(prompts)]] for i in range(n)]
    clips = torch.stack([render_clip(parse_prompt(c), seed, i, frames, height, width)
                         for i, c in enumerate(captions)])
    return clips, captions
