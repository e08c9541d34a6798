"""`shapes`: a verifier reward for the synthetic shapes world (`megaflow.demo.world`), no weights.

From decoded pixels it finds the object in every frame (pixels far from the background colour,
estimated from the frame border), and estimates its colour (nearest palette colour of the
object's median pixel), its shape (how much of its bounding box it fills, and whether it is
narrower at the top than at the bottom) and its direction (the dominant axis and sign of the
centroid's motion). The score is the fraction of the prompt's three attributes matched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megaflow.demo.world import COLORS, DIRECTIONS, SHAPES, parse_prompt
from megaflow.errors import ConfigError
from megaflow.rewards.base import register_reward

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "direction")
#: A pixel belongs to the object when its distance from the background is over this fraction
#: of the frame's largest distance.
_MASK_FRACTION = 0.5
#: A frame holds an object when its largest RGB distance from the background exceeds this.
_MIN_CONTRAST = 0.25
#: ... and the object covers at least this many pixels.
_MIN_AREA = 6


@dataclass
class Estimate:
    """What the verifier reads from one video; None where it found no object / no motion."""

    color: str | None
    shape: str | None
    direction: str | None
    found_frames: int

    def matches(self, prompt: str) -> dict[str, float]:
        """Attribute name → 1.0 if it matches the prompt's, else 0.0."""
        target = parse_prompt(prompt)
        return {a: float(getattr(self, a) == getattr(target, a)) for a in ATTRIBUTES}


def _object_masks(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Video `[F, 3, H, W]` → boolean masks `[F, H, W]` and per-frame "found" flags `[F]`."""
    border = torch.cat([video[:, :, 0], video[:, :, -1], video[:, :, :, 0], video[:, :, :, -1]], dim=2)
    bg = border.median(dim=2).values  # [F, 3]
    dist = (video - bg[:, :, None, None]).norm(dim=1)  # [F, H, W]
    peak = dist.flatten(1).amax(1)
    masks = dist > (_MASK_FRACTION * peak)[:, None, None]
    found = (peak > _MIN_CONTRAST) & (masks.flatten(1).sum(1) >= _MIN_AREA)
    return masks, found


def _shape_of(mask: torch.Tensor) -> str:
    """A boolean `[H, W]` mask → "circle", "square" or "triangle" from its bounding-box fill
    and its width near the top vs near the bottom."""
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].float()
    fill = float(box.mean())
    widths = box.sum(1)
    h = box.shape[0]
    k = max(1, h // 4)
    top, bottom = float(widths[:k].mean()), float(widths[-k:].mean())
    if bottom > 0 and top / bottom < 0.6 and fill < 0.75:
        return "triangle"
    if fill > 0.88:
        return "square"
    return "circle"


def estimate(video: torch.Tensor) -> Estimate:
    """Read colour, shape and direction from one video `float [F, 3, H, W]` in [0, 1]."""
    video = video.detach().to(device="cpu", dtype=torch.float32)
    masks, found = _object_masks(video)
    n_found = int(found.sum())
    if n_found == 0:
        return Estimate(None, None, None, 0)
    frames = found.nonzero().flatten()
    pixels = torch.cat([video[f].permute(1, 2, 0)[masks[f]] for f in frames.tolist()])  # [P, 3]
    rgb = pixels.median(dim=0).values
    palette = torch.tensor(list(COLORS.values()))
    color = list(COLORS)[int((palette - rgb).norm(dim=1).argmin())]
    votes = [_shape_of(masks[f]) for f in frames.tolist()]
    shape = max(SHAPES, key=votes.count)
    direction = None
    if n_found >= 2:
        h, w = masks.shape[1:]
        ys = torch.arange(h, dtype=torch.float32)[:, None]
        xs = torch.arange(w, dtype=torch.float32)[None, :]
        m = masks[frames].float()
        area = m.flatten(1).sum(1)
        cx = (m * xs).flatten(1).sum(1) / area
        cy = (m * ys).flatten(1).sum(1) / area
        t = frames.float() - frames.float().mean()
        vx = float((t * (cx - cx.mean())).sum() / (t * t).sum())
        vy = float((t * (cy - cy.mean())).sum() / (t * t).sum())
        span = float(frames[-1] - frames[0])
        if max(abs(vx), abs(vy)) * span >= 2.0:  # at least 2 px of travel
            if abs(vx) >= abs(vy):
                direction = "right" if vx > 0 else "left"
            else:
                direction = "down" if vy > 0 else "up"
    return Estimate(color, shape, direction, n_found)


@register_reward("shapes")
class ShapesReward:
    """Fraction of the prompt's colour, shape and direction that the video shows: float32 `[B]`
    in {0, 1/3, 2/3, 1}. Prompts must be shapes-world captions ("a red circle moving left").

    Option `weights`: per-attribute weights (default equal), normalised to sum 1.
    """

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        """Score attributes with `weights` (keys among color, shape, direction)."""
        weights = dict(weights or {a: 1.0 for a in ATTRIBUTES})
        unknown = sorted(set(weights) - set(ATTRIBUTES))
        if unknown or not weights or any(float(v) < 0 for v in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"reward 'shapes': option weights must map some of {', '.join(ATTRIBUTES)} to "
                              f"non-negative numbers with a positive sum, got {weights!r}")
        total = float(sum(weights.values()))
        self.weights = {a: float(weights.get(a, 0.0)) / total for a in ATTRIBUTES}

    def attribute_scores(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-attribute matches of videos `[B, F, 3, H, W]`: attribute → float32 `[B]` of 0/1."""
        rows = [estimate(v).matches(p) for v, p in zip(videos, prompts)]
        return {a: torch.tensor([r[a] for r in rows], dtype=torch.float32) for a in ATTRIBUTES}

    def __call__(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> torch.Tensor:
        """Weighted fraction of matched attributes of videos `[B, F, 3, H, W]`: float32 `[B]`."""
        scores = self.attribute_scores(videos, prompts)
        return sum(self.weights[a] * scores[a] for a in ATTRIBUTES)
