"""`shapes`: a verifier reward for the synthetic shapes world (`megaflow.demo.world`), no weights.

From decoded pixels it finds the object in every frame (pixels far from the background colour,
estimated from the frame border), and estimates its colour (nearest palette colour of the
object's median pixel), its shape (how much of its bounding box it fills, and whether it is
narrower at the top than at the bottom) and its direction (the dominant axis and sign of the
centroid's motion). The score is the fraction of the prompt's three attributes matched.

With `soft=True` each attribute earns partial credit in [0, 1] instead of 0 or 1: the colour and
shape scores are the verifier's probabilities of the prompt's colour / shape (a softmax over
distances to the palette / to each shape's typical (fill, taper) features), and the direction
score is the cosine between the object's travel and the prompt's direction, scaled down while
the travel is under 4 px. Clips the hard verifier reads correctly score near 1, and a video that
is closer to the prompt scores higher, which gives GRPO a graded signal within a group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from megaflow.demo.world import COLORS, DIRECTIONS, SHAPES, Attributes, parse_prompt
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
#: Soft colour: softmax temperature (RGB distance) over the palette.
_COLOR_TAU = 0.1
#: Soft shape: each shape's typical (bounding-box fill, top/bottom width ratio) on rendered clips,
#: and the spread of each feature.
_SHAPE_FEATURES: dict[str, tuple[float, float]] = {"circle": (0.81, 1.0), "square": (1.0, 1.0),
                                                   "triangle": (0.56, 0.18)}
_SHAPE_SPREAD = (0.06, 0.25)
#: Soft direction: full credit needs at least this much travel (pixels over the clip).
_FULL_TRAVEL = 4.0


@dataclass
class Estimate:
    """What the verifier reads from one video; None where it found no object / no motion."""

    color: str | None
    shape: str | None
    direction: str | None
    found_frames: int
    color_probs: dict[str, float] = field(default_factory=dict)  #: soft colour credit per palette colour
    shape_probs: dict[str, float] = field(default_factory=dict)  #: soft shape credit per shape
    travel: tuple[float, float] = (0.0, 0.0)  #: the object's (dx, dy) over the clip, pixels

    def soft_matches(self, target: Attributes) -> dict[str, float]:
        """Attribute name → partial credit in [0, 1] for the target's colour, shape and direction."""
        dx, dy = self.travel
        ux, uy = DIRECTIONS[target.direction]
        length = math.hypot(dx, dy)
        direction = max(0.0, dx * ux + dy * uy) / max(length, _FULL_TRAVEL)
        return {"color": self.color_probs.get(target.color, 0.0), "shape": self.shape_probs.get(target.shape, 0.0),
                "direction": direction}

    def matches(self, target: Attributes) -> dict[str, float]:
        """Attribute name → 1.0 if it matches the target's, else 0.0."""
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


def _shape_features(mask: torch.Tensor) -> tuple[float, float]:
    """A boolean `[H, W]` mask → (bounding-box fill, mean width of the top quarter / of the bottom quarter)."""
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].float()
    widths = box.sum(1)
    k = max(1, box.shape[0] // 4)
    top, bottom = float(widths[:k].mean()), float(widths[-k:].mean())
    return float(box.mean()), (top / bottom if bottom > 0 else 2.0)


def _shape_of(fill: float, taper: float) -> str:
    """"circle", "square" or "triangle" from a mask's fill and taper (narrower at the top: triangle)."""
    if taper < 0.6 and fill < 0.75:
        return "triangle"
    if fill > 0.88:
        return "square"
    return "circle"


def _shape_probs(fill: float, taper: float) -> torch.Tensor:
    """Soft shape credit `[len(SHAPES)]`: a softmax over scaled distances to each shape's typical features."""
    feats = torch.tensor([_SHAPE_FEATURES[s] for s in SHAPES])
    z = (torch.tensor([fill, min(taper, 2.0)]) - feats) / torch.tensor(_SHAPE_SPREAD)
    return torch.softmax(-0.5 * z.pow(2).sum(1), dim=0)


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
    dist = (palette - rgb).norm(dim=1)
    color = list(COLORS)[int(dist.argmin())]
    color_probs = torch.softmax(-0.5 * (dist / _COLOR_TAU).pow(2), dim=0)
    feats = [_shape_features(masks[f]) for f in frames.tolist()]
    votes = [_shape_of(*f) for f in feats]
    shape = max(SHAPES, key=votes.count)
    shape_probs = torch.stack([_shape_probs(*f) for f in feats]).mean(0)
    direction, travel = None, (0.0, 0.0)
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
        travel = (vx * span, vy * span)
        if max(abs(vx), abs(vy)) * span >= 2.0:  # at least 2 px of travel
            if abs(vx) >= abs(vy):
                direction = "right" if vx > 0 else "left"
            else:
                direction = "down" if vy > 0 else "up"
    return Estimate(color, shape, direction, n_found, dict(zip(COLORS, color_probs.tolist())),
                    dict(zip(SHAPES, shape_probs.tolist())), travel)


@register_reward("shapes")
class ShapesReward:
    """Fraction of the prompt's colour, shape and direction that the video shows: float32 `[B]`
    in {0, 1/3, 2/3, 1} (in [0, 1] with `soft`). Prompts must be shapes-world captions
    ("a red circle moving left").

    Option `weights`: per-attribute weights (default equal), normalised to sum 1. Option `soft`:
    partial credit per attribute (see the module docstring) instead of 0/1.
    """

    def __init__(self, weights: dict[str, float] | None = None, soft: bool = False) -> None:
        """Score attributes with `weights` (keys among color, shape, direction); `soft` for partial credit."""
        if not isinstance(soft, bool):
            raise ConfigError(f"reward 'shapes': option soft must be true or false, got {soft!r}")
        self.soft = soft
        weights = dict(weights or {a: 1.0 for a in ATTRIBUTES})
        unknown = sorted(set(weights) - set(ATTRIBUTES))
        if unknown or not weights or any(float(v) < 0 for v in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"reward 'shapes': option weights must map some of {', '.join(ATTRIBUTES)} to "
                              f"non-negative numbers with a positive sum, got {weights!r}")
        total = float(sum(weights.values()))
        self.weights = {a: float(weights.get(a, 0.0)) / total for a in ATTRIBUTES}

    def attribute_scores(self, videos: torch.Tensor, prompts: list[str],
                         metadata: list[dict[str, Any]] | None = None) -> dict[str, torch.Tensor]:
        """Per-attribute matches of videos `[B, F, 3, H, W]`: attribute → float32 `[B]` of 0/1
        (partial credit in [0, 1] with `soft`), against each prompt's attributes (`target`)."""
        metadata = metadata or [{} for _ in prompts]
        rows = []
        for video, prompt, meta in zip(videos.float(), prompts, metadata):
            found, want = estimate(video), target(prompt, meta)
            rows.append(found.soft_matches(want) if self.soft else found.matches(want))
        return {a: torch.tensor([r[a] for r in rows], dtype=torch.float32) for a in ATTRIBUTES}

    def __call__(self, videos: torch.Tensor, prompts: list[str],
                 metadata: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Weighted fraction of matched attributes of videos `[B, F, 3, H, W]` (`score`, float32
        `[B]`) and each attribute's match as a sub-score."""
        scores = self.attribute_scores(videos, prompts, metadata)
        return {"score": sum(self.weights[a] * scores[a] for a in ATTRIBUTES), **scores}

    def monitor(self, videos: torch.Tensor, prompts: list[str],
                metadata: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The world's quality metrics (`megaflow.demo.quality`), which watch for reward hacking."""
        from megaflow.demo.quality import quality

        return quality(videos, [{"shape": target(p, m).shape} for p, m in zip(prompts, metadata)])


def target(prompt: str, metadata: dict[str, Any]) -> Attributes:
    """What a video should show: the prompt record's `color`, `shape` and `direction` fields when it
    has them (JSONL prompt files), else the attributes parsed from the caption."""
    if all(a in metadata for a in ATTRIBUTES):
        want = Attributes(*(str(metadata[a]) for a in ATTRIBUTES))
        for name, value, valid in (("color", want.color, COLORS), ("shape", want.shape, SHAPES),
                                   ("direction", want.direction, DIRECTIONS)):
            if value not in valid:
                raise ValueError(f"prompt {prompt!r}: metadata {name} {value!r} is not one of {', '.join(valid)}")
        return want
    return parse_prompt(prompt)
