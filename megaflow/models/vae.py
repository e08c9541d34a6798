"""How the video families decode latents: spatial tiling by size, and one sample at a time.

Tiling (`model.vae_tiling`): `auto` is diffusers' `enable_tiling()`: a latent larger than one tile
(`tile_sample_min_height` / `tile_sample_min_width` over the VAE's spatial compression: 256 pixels,
32 latent rows / columns for `AutoencoderKLWan` and `AutoencoderKLHunyuanVideo`) is decoded in
overlapping tiles blended at the seams, a smaller one whole. Wan 2.1 at 480×832×81 (latent 60×104)
and HunyuanVideo at 720×1280×129 (latent 90×160) are tiled; the tiny test models are not. `off`
always decodes whole, which needs the memory of the whole frame. There is no `on`: diffusers never
tiles a latent that fits in one tile, so it would be `auto`. HunyuanVideo's VAE also decodes long
videos in overlapping groups of frames (`use_framewise_decoding`, on in diffusers and its pipeline);
that stays as diffusers has it under both settings.

Slicing (`model.vae_slicing`, default true): the samples of a batch are decoded one at a time
(diffusers' `enable_slicing()`), so a sample's video never depends on which samples it was batched
with (batched convolutions round differently, measured up to 3.6e-6): the videos, and so the
rewards, are the same for every chunk size and sequence-parallel layout (`megaflow.parallel.decode`
spreads a chunk's samples over the SP ranks), and the decoder's activation memory is one sample's.
Its price, measured on CPU (2 threads, random-weight Wan 2.1 / HunyuanVideo VAEs, 2 samples of
2×8×8 latents): Wan 1.37× the batched time, HunyuanVideo 1.02×. `false` decodes a batch at once.

The flags are set for the decode only and restored afterwards: `vae.encode` (Wan I2V's image
condition) sees the VAE as loaded.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from megaflow.errors import ConfigError

#: Values of `model.vae_tiling`.
VAE_TILING_MODES: tuple[str, ...] = ("auto", "off")
#: Families whose `decode` follows `model.vae_tiling` (FLUX and SD3 decode one image, untiled).
VIDEO_VAE_FAMILIES: tuple[str, ...] = ("wan", "wan_i2v", "hunyuan", "skyreels_i2v")


def check_vae_settings(family: str, tiling: str, slicing: bool = True) -> None:
    """`ConfigError` unless `tiling` is a value of `model.vae_tiling` and both settings apply to model
    `family` (the image families decode a batch of single images: only the defaults)."""
    if tiling not in VAE_TILING_MODES:
        raise ConfigError(f"model.vae_tiling must be one of {', '.join(VAE_TILING_MODES)}, got {tiling!r} (auto: tile "
                          "latents larger than the VAE's tile, as diffusers' enable_tiling; off: decode whole)")
    if not isinstance(slicing, bool):
        raise ConfigError(f"model.vae_slicing must be true or false, got {slicing!r}")
    if (tiling != "auto" or not slicing) and family not in VIDEO_VAE_FAMILIES:
        raise ConfigError(f"model.vae_tiling / model.vae_slicing apply to the video families "
                          f"({', '.join(VIDEO_VAE_FAMILIES)}); model family '{family}' decodes single images untiled "
                          "in one batch: remove them")


def tile_latent_size(vae: Any) -> tuple[int, int]:
    """The largest latent `(h, w)` the VAE decodes as one tile: `enable_tiling`'s sample tile size
    divided by the spatial compression, as diffusers' `_decode` computes it."""
    s = int(vae.spatial_compression_ratio)
    return int(vae.tile_sample_min_height) // s, int(vae.tile_sample_min_width) // s


def needs_tiling(vae: Any, latent_shape: Sequence[int]) -> bool:
    """Whether a latent `[..., h, w]` is larger than one tile of `vae` (diffusers' condition)."""
    tile_h, tile_w = tile_latent_size(vae)
    return int(latent_shape[-2]) > tile_h or int(latent_shape[-1]) > tile_w


def uses_tiling(vae: Any, latent_shape: Sequence[int], mode: str) -> bool:
    """Whether `decode_video` tiles a latent of `latent_shape` under `model.vae_tiling=mode`."""
    if mode not in VAE_TILING_MODES:
        raise ValueError(f"vae tiling mode must be one of {', '.join(VAE_TILING_MODES)}, got {mode!r}")
    return mode == "auto" and needs_tiling(vae, latent_shape)


@contextlib.contextmanager
def _decode_flags(vae: Any, *, tiling: bool, slicing: bool) -> Iterator[None]:
    saved = vae.use_tiling, vae.use_slicing
    vae.use_tiling, vae.use_slicing = tiling, slicing
    try:
        yield
    finally:
        vae.use_tiling, vae.use_slicing = saved


@torch.no_grad()
def decode_video(vae: Any, z: torch.Tensor, mode: str, slicing: bool = True) -> torch.Tensor:
    """`vae.decode` of scaled latents `z [B, C, F, h, w]` → `[B, 3, F', H, W]` in [-1, 1], tiled as
    `mode` (`model.vae_tiling`) says, one sample at a time with `slicing` (`model.vae_slicing`)."""
    with _decode_flags(vae, tiling=uses_tiling(vae, z.shape, mode), slicing=slicing):
        return vae.decode(z, return_dict=False)[0]


def configure_vae(adapter: Any, tiling: str, slicing: bool) -> None:
    """Give a loaded adapter the run's `model.vae_tiling` and `model.vae_slicing` (checked first)."""
    check_vae_settings(adapter.family, tiling, slicing)
    if adapter.family in VIDEO_VAE_FAMILIES:
        adapter.vae_tiling, adapter.vae_slicing = tiling, slicing
