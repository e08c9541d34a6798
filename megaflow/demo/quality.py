"""Quality metrics of the shapes world, computed from decoded frames and never trained on.

They watch for reward hacking: a model can raise the verifier's score by painting ragged,
multi-coloured, flickering blobs, which these metrics score low. Each is in [0, 1], higher is
better, and ground-truth clips from the world's renderer score about 1 (`calibrate`):

- `quality/purity`: the share of object pixels whose colour lies along the object's dominant
  colour direction from the background (anti-aliased edges blend colour and background along
  that same direction, so a clean object scores 1 and a two-coloured smear low);
- `quality/smoothness`: how clean the outline is: the boundary length per √area of the
  object's mask against that of the renderer's shape of the same kind and area at the same place
  (torn edges, holes and fragments lengthen the boundary);
- `quality/temporal`: how stable the object's (anti-aliased) area and colour are from frame to frame;
- `quality/background`: how close the pixels away from the object stay to the world's background.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from megaflow.demo.world import BACKGROUND, SHAPES, _coverage

__all__ = ["METRICS", "quality", "video_quality"]

METRICS: tuple[str, ...] = ("quality/purity", "quality/smoothness", "quality/temporal", "quality/background")
#: A pixel counts as the object's colour when its direction from the background is within this
#: angle of the dominant direction (cosine).
_PURITY_COS = math.cos(math.radians(12.0))
#: Background pixels: farther than this many pixels from the object mask.
_BACKGROUND_MARGIN = 2
#: Mean RGB distance from the background colour at which `quality/background` reaches 0.
_BACKGROUND_SCALE = 0.2
#: Object pixels: farther from the background than this fraction of the frame's largest distance.
_MASK_FRACTION = 0.5
_MIN_CONTRAST, _MIN_AREA = 0.25, 6


def _boundary(mask: torch.Tensor) -> int:
    """Edges between object and non-object pixels of a boolean `[H, W]` mask (the frame border counts)."""
    m = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    return int((m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum())


def _reference_roughness(shape: str, mask: torch.Tensor) -> float:
    """Boundary per √area of the renderer's `shape` with the mask's area, centred on its centroid."""
    h, w = mask.shape
    area = float(mask.sum())
    ys, xs = mask.nonzero(as_tuple=True)
    cy, cx = float(ys.float().mean()) + 0.5, float(xs.float().mean()) + 0.5
    # half-size r of each shape with that area: circle πr², square 4r², triangle 2r²
    r = math.sqrt(area / {"circle": math.pi, "square": 4.0, "triangle": 2.0}[shape])
    if shape == "triangle":
        cy -= r / 3  # the centroid of the apex-up triangle sits a third of r below its box centre
    ref = _coverage(shape, cx, cy, r, h, w) > 0.5
    return _boundary(ref) / math.sqrt(max(1.0, float(ref.sum())))


def video_quality(video: torch.Tensor, shape: str | None = None) -> dict[str, float]:
    """The four metrics of one video `[F, 3, H, W]` in [0, 1]; `shape`: the object's kind for
    `quality/smoothness` (default: the verifier's estimate). A video with no object scores 0
    on the object metrics."""
    from megaflow.demo.verifier import estimate

    video = video.detach().to(device="cpu", dtype=torch.float32)
    bg_color = torch.tensor(BACKGROUND).view(3, 1, 1)
    diff = video - bg_color  # [F, 3, H, W]
    dist = diff.norm(dim=1)  # [F, H, W]
    peak = dist.flatten(1).amax(1)
    masks = dist > (_MASK_FRACTION * peak)[:, None, None]
    found = (peak > _MIN_CONTRAST) & (masks.flatten(1).sum(1) >= _MIN_AREA)
    far = ~torch.nn.functional.max_pool2d(masks.float()[:, None], 2 * _BACKGROUND_MARGIN + 1, stride=1,
                                          padding=_BACKGROUND_MARGIN)[:, 0].bool()
    background = max(0.0, 1.0 - float(dist[far].mean()) / _BACKGROUND_SCALE) if bool(far.any()) else 0.0
    frames = found.nonzero().flatten().tolist()
    if not frames:
        return {"quality/purity": 0.0, "quality/smoothness": 0.0, "quality/temporal": 0.0,
                "quality/background": background}
    shape = shape or estimate(video).shape or SHAPES[0]
    purity, smooth, areas, colors = [], [], [], []
    for f in frames:
        d = diff[f].permute(1, 2, 0)[masks[f]]  # [P, 3]
        u = torch.nn.functional.normalize(d, dim=1)
        agree = (u @ u.T) > _PURITY_COS  # [P, P]
        best = int(agree.sum(1).argmax())
        purity.append(float(agree[best].float().mean()))
        rough = _boundary(masks[f]) / math.sqrt(float(masks[f].sum()))
        smooth.append(min(1.0, _reference_roughness(shape, masks[f]) / rough))
        core = d[agree[best]]
        color = core.mean(0)  # the object's colour relative to the background
        coverage = (diff[f].permute(1, 2, 0) @ color / color.dot(color)).clamp(0, 1)
        areas.append(float(coverage.sum()))
        colors.append(color)
    temporal = 1.0
    if len(frames) > 1:
        a = torch.tensor(areas)
        c = torch.stack(colors)
        area_change = float((a[1:] - a[:-1]).abs().mean() / a.mean())
        color_change = float((c[1:] - c[:-1]).norm(dim=1).mean() / c.norm(dim=1).mean())
        temporal = max(0.0, 1.0 - area_change - color_change)
    temporal *= len(frames) / video.shape[0]  # frames without the object are unstable ones
    return {"quality/purity": sum(purity) / len(purity), "quality/smoothness": sum(smooth) / len(smooth),
            "quality/temporal": temporal, "quality/background": background}


def quality(videos: torch.Tensor, metadata: list[dict[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """Each metric of videos `[B, F, 3, H, W]`: name → float32 `[B]` (the prompt records' `shape`
    fields, when given, name the object's kind)."""
    metadata = metadata or [{} for _ in range(videos.shape[0])]
    rows = [video_quality(v, m.get("shape")) for v, m in zip(videos, metadata)]
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.float32) for name in METRICS}
