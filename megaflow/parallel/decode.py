"""VAE decoding spread over the ranks of a sequence-parallel group.

After a chunk's rollout every rank of an SP group holds the same whole latents `[c, C, F, h, w]`.
Instead of the group's first rank decoding all `c` samples while the others wait, each rank decodes
a contiguous share of the samples (the first `c mod sp` ranks one more) and sends its videos to the
first rank, which scores them: the decode takes the time of `ceil(c / sp)` samples.

Only whole samples are spread. A frame split is not exact: Wan's causal VAE decodes the latent
frames in order through a cache of the previous frames' features, and HunyuanVideo's blends
overlapping groups of frames, so a chunk of fewer samples than ranks leaves some ranks idle.
With `model.vae_slicing` (the default) the adapters decode one sample at a time
(`megaflow.models.vae`), so a sample's video does not depend on which rank decoded it next to which
others: the gathered videos equal one rank's decode of the whole chunk bit for bit (without it, up
to batched-convolution rounding, ~1e-6).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


def sample_shares(n: int, ranks: int) -> list[range]:
    """Contiguous shares of `n` samples over `ranks` ranks, in rank order; the first `n mod ranks`
    ranks take one more (the first rank always has a share when `n >= 1`)."""
    base, extra = divmod(n, ranks)
    bounds = [0]
    for r in range(ranks):
        bounds.append(bounds[-1] + base + (r < extra))
    return [range(bounds[r], bounds[r + 1]) for r in range(ranks)]


def spread_decode(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
                  group: Any) -> torch.Tensor | None:
    """`decode(latents)` (`[c, C, F, h, w]` → videos `[c, F', 3, H, W]`) with each rank of the SP
    `group` decoding its `sample_shares` share; the group's first rank returns every video in
    sample order, the others None. Every rank of the group calls it with the same latents (it is
    collective); `group` None: this rank decodes everything."""
    if group is None:
        return decode(latents)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    shares = sample_shares(latents.shape[0], size)
    mine = shares[rank]
    videos = decode(latents[mine.start:mine.stop]) if len(mine) else None
    if rank != 0:
        if videos is not None:
            dist.send(videos.contiguous(), dst=dist.get_global_rank(group, 0), group=group)
        return None
    parts = [videos]
    for r, share in enumerate(shares[1:], start=1):
        if len(share):
            part = videos.new_empty((len(share), *videos.shape[1:]))
            dist.recv(part, src=dist.get_global_rank(group, r), group=group)
            parts.append(part)
    return torch.cat(parts)
