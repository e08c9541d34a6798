"""Ulysses sequence parallelism applied to diffusers' `WanTransformer3DModel` (torchtitan style:
one function applies the parallelism to one model family).

The sharded forward follows diffusers' `WanTransformer3DModel.forward` step by step: patch
embedding, rotary tables and condition embedding are computed in full; then the video tokens
(and the rotary tables) are zero-padded to a multiple of `sp` and each rank keeps its contiguous
`1/sp`. In every block the self-attention runs through `UlyssesWanAttnProcessor` (all-to-all
tokens → heads, attention over all tokens with the pad tokens masked out as keys, all-to-all
back); cross-attention, norms, modulation and the FFN are per-token and run locally with the
full context. For Wan 2.1 image-to-video the CLIP image embeddings go through the condition
embedder like the text and are concatenated in front of it, replicated on every rank (attn2 is
per query token, so the image part needs no communication either). The model returns this
rank's padded token shard `[B, L_pad/sp, pt·ph·pw·C_out]` of the output projection;
`WanSequenceParallel` maps latents to and from that layout. The model input may have more
channels than the output (I2V: latent + mask + image latent); only the output's `C_out`
channels appear in the token layout.
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from megaflow.errors import ConfigError
from megaflow.parallel.attention import attention
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
        #: `model.attention_backend` (`megaflow.parallel.attention`); set by `apply_attention_backend`.
        self.backend = "native"

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
        query, key, value = (seq_to_heads(t, self.group) for t in (query, key, value))
        out = attention(query, key, value, None if mask is None else mask[None, None, None, :], self.backend)
        out = heads_to_seq(out, self.group).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


#: Text tokens diffusers' `WanAttnProcessor` assumes at the end of the I2V context: it splits the
#: image part off as `context[:, :L − 512]` (hard-coded), so other text lengths mis-split silently.
I2V_TEXT_TOKENS = 512


def _check_image_context(model: Any, text: torch.Tensor) -> None:
    """ValueError unless `model` embeds images and the text `[B, L_text, D]` has the 512 tokens
    its cross-attention assumes."""
    if model.condition_embedder.image_embedder is None:
        raise ValueError("encoder_hidden_states_image was given to a Wan transformer without image_dim "
                         "(a text-to-video model); pass image embeddings only to Wan image-to-video")
    if text.shape[1] != I2V_TEXT_TOKENS:
        raise ValueError(f"Wan image-to-video needs the text embeddings padded to exactly {I2V_TEXT_TOKENS} "
                         f"tokens (diffusers' WanAttnProcessor takes the last {I2V_TEXT_TOKENS} context tokens "
                         f"as text and the rest as image); got {text.shape[1]}")


def _sharded_forward(self: Any, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = False,
                     attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor]:
    """Replaces `WanTransformer3DModel.forward` (bound to the instance, so ZeRO-3 hooks still run):
    `hidden_states [B, C_in, F, H, W]`, `timestep [B]`, text `[B, L_text, D_text]` and, for I2V,
    `encoder_hidden_states_image [B, L_img, D_img]` → `(tokens [B, L_pad/sp, pt·ph·pw·C_out],)` of this rank."""
    if timestep.ndim != 1:
        raise ConfigError(f"parallel.sp_size > 1 needs one timestep per sample (timestep [B]); got timestep of "
                          f"shape {tuple(timestep.shape)} (per-token timesteps, as in Wan 2.2 TI2V, are not "
                          f"sharded). Run this model with parallel.sp_size=1")
    if encoder_hidden_states_image is not None:
        _check_image_context(self, encoder_hidden_states)
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
    temb, timestep_proj, context, image = self.condition_embedder(
        timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=None)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    if image is not None:
        context = torch.concat([image, context], dim=1)
    for block in self.blocks:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            tokens = self._gradient_checkpointing_func(block, tokens, context, timestep_proj, rotary)
        else:
            tokens = block(tokens, context, timestep_proj, rotary)
    shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
    return (self.proj_out(tokens),)


class WanSequenceParallel(SequenceShards):
    """Applies Ulysses SP to a `WanTransformer3DModel` and converts latents to / from the token
    shards it computes. `patch = (pt, ph, pw)`; latents are `[B, C_out, F, H, W]`. Where only the
    token grid matters (`valid`, the `like` of `unshard`), the model input `[B, C_in, F, H, W]`
    serves as well."""

    def __init__(self, transformer: Any, group: Any) -> None:
        super().__init__(group)
        config = transformer.config
        check_heads_divisible(int(config.num_attention_heads), self.sp)
        self.patch = tuple(int(p) for p in config.patch_size)
        self.out_channels = int(config.out_channels or config.in_channels)
        transformer._megaflow_sp_group = group
        for block in transformer.blocks:
            block.attn1.set_processor(UlyssesWanAttnProcessor(group))
        transformer.forward = types.MethodType(_sharded_forward, transformer)

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """`[B, C, F, H, W]` → tokens `[B, L, pt·ph·pw·C]` in the output projection's channel order."""
        b, c = latent.shape[:2]
        f, h, w = self.grid(latent)
        pt, ph, pw = self.patch
        x = latent.reshape(b, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, f * h * w, pt * ph * pw * c)

    def unpatchify(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, L, pt·ph·pw·C]` → latent `[B, C, F, H, W]` with `like`'s batch, frames, height
        and width; `C` comes from the tokens, so `like` may be the model input with `C_in` channels."""
        b = like.shape[0]
        f, h, w = self.grid(like)
        pt, ph, pw = self.patch
        x = tokens.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, *like.shape[2:])

    def shard_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """This rank's real tokens `[B, L_r, pt·ph·pw·C_out]` of a latent `[B, C_out, F, H, W]` (the
        model's output layout; an I2V model input with `C_in` channels is refused)."""
        if latent.shape[1] != self.out_channels:
            raise ValueError(f"shard_latent takes a latent with the transformer's out_channels="
                             f"{self.out_channels} channels (the velocity's layout), got {latent.shape[1]}; "
                             f"for Wan image-to-video pass the noisy latent, not the model input with the "
                             f"mask and image latent concatenated")
        return super().shard_latent(latent)
