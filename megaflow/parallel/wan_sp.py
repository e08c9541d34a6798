"""Ulysses sequence parallelism applied to diffusers' `WanTransformer3DModel` (torchtitan style:
one function applies the parallelism to one model family).

The sharded forward follows diffusers' `WanTransformer3DModel.forward` step by step: patch
embedding, rotary tables and condition embedding are computed in full; then the video tokens
(and the rotary tables) are zero-padded to a multiple of `sp` and each rank keeps its contiguous
`1/sp`. In every block the self-attention runs through `UlyssesWanAttnProcessor` (all-to-all
tokens → heads, attention over all tokens with the pad tokens masked out as keys, all-to-all
back); cross-attention, norms, modulation and the FFN are per-token and run locally with the
full text. The model returns this rank's padded token shard `[B, L_pad/sp, pt·ph·pw·C]` of the
output projection; `WanSequenceParallel` maps latents to and from that layout.
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from megaflow.errors import ConfigError
from megaflow.parallel.ulysses import (
    SequenceShards, check_heads_divisible, heads_to_seq, pad_to_multiple, seq_to_heads, shard,
)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding: `x [B, L, H, d]`, tables `[1, L, 1, d]`."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class UlyssesWanAttnProcessor:
    """Self-attention over an SP group: `[B, L/sp, D]` tokens in, the same shard out."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """`rotary_emb`: `(cos, sin)` of this rank's tokens `[1, L_pad/sp, 1, d]`, plus the key mask
        `[L_pad]` (bool, True = real token) as a third element when the sequence was padded."""
        if encoder_hidden_states is not None:
            raise RuntimeError("UlyssesWanAttnProcessor is for self-attention (attn1) only")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        mask = None
        if rotary_emb is not None:
            query = _rotate(query, rotary_emb[0], rotary_emb[1])
            key = _rotate(key, rotary_emb[0], rotary_emb[1])
            mask = rotary_emb[2] if len(rotary_emb) > 2 else None
        query, key, value = (seq_to_heads(t, self.group).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None if mask is None else mask[None, None, None, :],
                                             dropout_p=0.0, is_causal=False)
        out = heads_to_seq(out.transpose(1, 2), self.group).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _sharded_forward(self: Any, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = False,
                     attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor]:
    """Replaces `WanTransformer3DModel.forward` (bound to the instance, so ZeRO-3 hooks still run):
    `hidden_states [B, C, F, H, W]` → `(tokens [B, L_pad/sp, pt·ph·pw·C],)` of this rank."""
    if encoder_hidden_states_image is not None or timestep.ndim != 1:
        raise ConfigError("parallel.sp_size > 1 supports Wan 2.1 text-to-video only (no image embeddings, one "
                          "timestep per sample); run this model with parallel.sp_size=1")
    group = self._megaflow_sp_group
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    cos, sin = self.rope(hidden_states)
    tokens = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
    length = tokens.shape[1]
    padded = length + (-length) % sp
    key_mask = None
    if padded != length:
        key_mask = torch.arange(padded, device=tokens.device) < length
    tokens = shard(pad_to_multiple(tokens, 1, sp), 1, rank, sp).contiguous()
    rotary = (shard(pad_to_multiple(cos, 1, sp), 1, rank, sp), shard(pad_to_multiple(sin, 1, sp), 1, rank, sp))
    if key_mask is not None:
        rotary = rotary + (key_mask,)
    temb, timestep_proj, text, _ = self.condition_embedder(timestep, encoder_hidden_states, None, timestep_seq_len=None)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    for block in self.blocks:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            tokens = self._gradient_checkpointing_func(block, tokens, text, timestep_proj, rotary)
        else:
            tokens = block(tokens, text, timestep_proj, rotary)
    shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
    return (self.proj_out(tokens),)


class WanSequenceParallel(SequenceShards):
    """Applies Ulysses SP to a `WanTransformer3DModel` and converts latents to / from the token
    shards it computes. `patch = (pt, ph, pw)`; latents are `[B, C, F, H, W]`."""

    def __init__(self, transformer: Any, group: Any) -> None:
        super().__init__(group)
        config = transformer.config
        check_heads_divisible(int(config.num_attention_heads), self.sp)
        self.patch = tuple(int(p) for p in config.patch_size)
        transformer._megaflow_sp_group = group
        for block in transformer.blocks:
            block.attn1.set_processor(UlyssesWanAttnProcessor(group))
        transformer.forward = types.MethodType(_sharded_forward, transformer)

    def _grid(self, latent: torch.Tensor) -> tuple[int, int, int]:
        _, _, f, h, w = latent.shape
        pt, ph, pw = self.patch
        return f // pt, h // ph, w // pw

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """`[B, C, F, H, W]` → tokens `[B, L, pt·ph·pw·C]` in the output projection's channel order."""
        b, c = latent.shape[:2]
        f, h, w = self._grid(latent)
        pt, ph, pw = self.patch
        x = latent.reshape(b, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, f * h * w, pt * ph * pw * c)

    def unpatchify(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, L, pt·ph·pw·C]` → latent of `like`'s shape `[B, C, F, H, W]`."""
        b, c = like.shape[:2]
        f, h, w = self._grid(like)
        pt, ph, pw = self.patch
        x = tokens.reshape(b, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(like.shape)
