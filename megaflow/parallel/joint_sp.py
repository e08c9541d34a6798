"""Ulysses sequence parallelism for diffusers' joint-attention (MMDiT-style) transformers:
`HunyuanVideoTransformer3DModel` (also SkyReels-V1 I2V), `FluxTransformer2DModel` and
`SD3Transformer2DModel`, in the style of `megaflow.parallel.wan_sp`.

Each sharded forward follows diffusers' forward step by step. The prefix (patch embedding,
positional / rotary tables, timestep-text-guidance embedding, text embedder or token refiner) is
computed in full on every rank. Then the image/video tokens and the text tokens are each
zero-padded to a multiple of `sp` and every rank keeps its contiguous `1/sp` of both (with the
rotary rows sharded the same way), so inside the blocks every token lives on exactly one rank and
every replicated tensor is consumed only through this rank's slice: the SP ranks' parameter
gradients sum to the one-process gradient. Joint attention runs through one all-to-all
(tokens → heads) over `[image shard; text shard]` of every rank, with a key mask that drops the
padding (and, for Hunyuan, the text past each prompt's mask), and one all-to-all back. Norms,
modulation and FFNs are per-token and run locally. The model returns this rank's zero-padded
shard of the output projection's tokens; the `SequenceShards` subclasses map latents to and from
that layout.
"""
from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.utils import apply_lora_scale

from megaflow.errors import ConfigError
from megaflow.parallel.attention import attention
from megaflow.parallel.ulysses import (
    SequenceShards, check_heads_divisible, heads_to_seq, pad_to_multiple, seq_to_heads, shard,
)


def shard_padded(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """This rank's contiguous `1/sp` of `x` zero-padded along `dim` to a multiple of sp:
    e.g. tokens `[B, L, D]` → `[B, L_pad/sp, D]`, rotary tables `[L, d]` → `[L_pad/sp, d]`."""
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    return shard(pad_to_multiple(x, dim, sp), dim, rank, sp).contiguous()


def local_length(length: int, sp: int) -> int:
    """Tokens per rank of a sequence of `length` tokens zero-padded to a multiple of `sp`."""
    return (length + sp - 1) // sp


def joint_key_mask(parts: Sequence[tuple[int, int | torch.Tensor]], sp: int,
                   device: torch.device) -> torch.Tensor | None:
    """Key mask `[B or 1, 1, 1, sp·Σ l]` (True = attend) of the sequence that `seq_to_heads`
    gathers when every rank holds `[part_0 shard; part_1 shard; …]`. Part `(l, n)` has `l` slots per
    rank (its padded length / sp), and its slot `r·l + i` of rank `r` is real when below `n` (an int,
    or per-sample counts `[B]`). None when every `n` is an int that fills its `sp·l` slots."""
    if all(not torch.is_tensor(n) and n == sp * local for local, n in parts):
        return None
    blocks = []
    for local, n in parts:
        positions = torch.arange(sp * local, device=device).view(1, sp, local)
        limit = n.to(device).view(-1, 1, 1) if torch.is_tensor(n) else n
        blocks.append(positions < limit)
    batch = max(b.shape[0] for b in blocks)
    mask = torch.cat([b.expand(batch, -1, -1) for b in blocks], dim=2)
    return mask.flatten(1)[:, None, None, :]


def leading_part_mask(mask: torch.Tensor | None, local: int, sp: int) -> torch.Tensor | None:
    """From a joint key mask `[B, 1, 1, sp·(l0 + l1)]` whose first part has `local = l0` slots per
    rank, the key mask `[B, 1, 1, sp·l0]` of attention over that part alone."""
    if mask is None:
        return None
    return mask.unflatten(-1, (sp, -1))[..., :local].flatten(-2)


def part_major_order(lengths: Sequence[int], sp: int, device: torch.device) -> torch.Tensor:
    """Positions, in the gathered sequence `[rank 0: part 0 (l0), part 1 (l1), …; rank 1: …]`, of
    the part-major order `[part 0 of every rank; part 1 of every rank; …]`: the one-process token
    order, so attention sums over its keys in the same order with or without SP."""
    total = sum(lengths)
    starts = [sum(lengths[:j]) for j in range(len(lengths))]
    return torch.cat([torch.arange(r * total + s, r * total + s + n) for s, n in zip(starts, lengths)
                      for r in range(sp)]).to(device)


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      group: Any, parts: Sequence[int] | None = None, backend: str = "native") -> torch.Tensor:
    """Attention of this rank's queries `[B, l, H, d]` over every rank's keys / values (same
    layout): all-to-all to `[B, sp·l, H/sp, d]`, attention on `backend` (`megaflow.parallel.attention`)
    with the key mask `[B, 1, 1, sp·l]`, all-to-all back. Returns `[B, l, H·d]` in `query`'s dtype.
    `parts`: the per-rank lengths of the concatenated parts (image, text); keys, values and mask are
    then put in one-process order, so the softmax sums round as on one process."""
    q, k, v = (seq_to_heads(t, group) for t in (query, key, value))
    if parts is not None and len(parts) > 1:
        order = part_major_order(parts, dist.get_world_size(group), k.device)
        k, v = k[:, order], v[:, order]
        mask = None if mask is None else mask[..., order]
    out = attention(q, k, v, mask, backend)
    return heads_to_seq(out, group).flatten(2, 3).to(query.dtype)


def _project(attn: Any, x: torch.Tensor, added: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key, value `[B, l, H, d]` of tokens `x [B, l, D]`: through `to_q/k/v` and
    `norm_q/k`, or (`added`) the text-stream `add_q/k/v_proj` and `norm_added_q/k`."""
    names = (("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k") if added
             else ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
    q, k, v = (getattr(attn, n)(x).unflatten(2, (attn.heads, -1)) for n in names[:3])
    norm_q, norm_k = getattr(attn, names[3], None), getattr(attn, names[4], None)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


def _output(attn: Any, image: torch.Tensor, text: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output projections where the attention has them: `to_out` on image tokens `[B, l, H·d]`,
    `to_add_out` on text tokens."""
    to_out, to_add_out = getattr(attn, "to_out", None), getattr(attn, "to_add_out", None)
    if to_out is not None:
        image = to_out[1](to_out[0](image))
    if text is not None and to_add_out is not None:
        text = to_add_out(text)
    return image, text


def _has_added(attn: Any) -> bool:
    """Whether the attention has text-stream projections (dual-stream block) or shares its own."""
    return getattr(attn, "add_q_proj", None) is not None


class UlyssesJointAttnProcessor:
    """Joint attention over `[image; text]` for an SP group (HunyuanVideo's
    `HunyuanVideoAttnProcessor2_0` and SD3's `JointAttnProcessor2_0` math): shards
    `[B, l, D]` in, the same shards out."""

    def __init__(self, group: Any) -> None:
        self.group = group
        #: `model.attention_backend` (`megaflow.parallel.attention`); set by `apply_attention_backend`.
        self.backend = "native"

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_mask`: the joint key mask `[B, 1, 1, sp·(l_img + l_txt)]` (`joint_key_mask`);
        `image_rotary_emb`: `(cos, sin)` `[l_img, d]` of this rank's image tokens. Without text
        (SD3.5's image-only `attn2`) the image part of the mask is used."""
        n = hidden_states.shape[1]
        q, k, v = _project(attn, hidden_states, added=False)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        if encoder_hidden_states is None:
            mask = leading_part_mask(attention_mask, n, dist.get_world_size(self.group))
            return _output(attn, ulysses_attention(q, k, v, mask, self.group, backend=self.backend), None)[0]
        eq, ek, ev = _project(attn, encoder_hidden_states, added=_has_added(attn))
        q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)
        out = ulysses_attention(q, k, v, attention_mask, self.group, parts=(n, eq.shape[1]), backend=self.backend)
        return _output(attn, out[:, :n], out[:, n:])


class UlyssesFluxAttnProcessor:
    """Joint attention over `[text; image]` for an SP group (`FluxAttnProcessor` math, rotary
    embedding on the whole joint sequence): shards `[B, l, D]` in, the same shards out."""

    def __init__(self, group: Any) -> None:
        self.group = group
        #: `model.attention_backend` (`megaflow.parallel.attention`); set by `apply_attention_backend`.
        self.backend = "native"

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, text_tokens: int = 0
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`attention_mask`: key mask `[B, 1, 1, sp·(l_txt + l_img)]`; `image_rotary_emb`: `(cos, sin)`
        `[l_txt + l_img, d]` of this rank's `[text; image]` tokens; `text_tokens`: `l_txt` (so the
        keys are summed in one-process order). A single-stream block passes the concatenation as
        `hidden_states` and no text."""
        q, k, v = _project(attn, hidden_states, added=False)
        m = text_tokens
        if encoder_hidden_states is not None:
            m = encoder_hidden_states.shape[1]
            eq, ek, ev = _project(attn, encoder_hidden_states, added=True)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = ulysses_attention(q, k, v, attention_mask, self.group, parts=(m, q.shape[1] - m),
                                backend=self.backend)
        if encoder_hidden_states is None:
            return out
        return _output(attn, out[:, m:], out[:, :m])


def _run_block(model: Any, block: Any, *args: Any) -> Any:
    """`block(*args)`, through the model's activation-checkpointing function when it is enabled."""
    if torch.is_grad_enabled() and model.gradient_checkpointing:
        return model._gradient_checkpointing_func(block, *args)
    return block(*args)


def _refuse_extra_kwargs(kwargs: dict[str, Any] | None, name: str) -> None:
    """ConfigError if attention kwargs other than the LoRA `scale` (already applied) are given."""
    if kwargs:
        raise ConfigError(f"parallel.sp_size > 1 does not support {name} {sorted(kwargs)} (IP-adapter and similar "
                          f"extras); run this model with parallel.sp_size=1")


def _shard_rotary(tables: tuple[torch.Tensor, torch.Tensor], lengths: Sequence[int],
                  group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables `(cos, sin)` `[Σ L_i, d]` of consecutive parts (e.g. text, image) → this rank's
    rows `[Σ L_i_pad/sp, d]`, each part padded and sharded like its tokens."""
    cos, sin = (torch.cat([shard_padded(part, 0, group) for part in t.split(list(lengths))]) for t in tables)
    return cos, sin


@apply_lora_scale("attention_kwargs")
def _hunyuan_forward(self: Any, hidden_states: torch.Tensor, timestep: torch.Tensor,
                     encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                     pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None,
                     attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True) -> tuple[torch.Tensor]:
    """Replaces `HunyuanVideoTransformer3DModel.forward`: `hidden_states [B, C_in, F, H, W]`, text
    `[B, L_txt, D_txt]` with mask `[B, L_txt]` → `(tokens [B, L_pad/sp, C·pt·p·p],)` of this rank."""
    _refuse_extra_kwargs(attention_kwargs, "attention_kwargs")
    group = self._megaflow_sp_group
    sp = dist.get_world_size(group)
    rotary = self.rope(hidden_states)
    temb, _ = self.time_text_embed(timestep, pooled_projections, guidance)
    video = self.x_embedder(hidden_states)
    text = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    prompt_lengths = encoder_attention_mask.sum(dim=1, dtype=torch.int)
    mask = joint_key_mask([(local_length(video.shape[1], sp), video.shape[1]),
                           (local_length(text.shape[1], sp), prompt_lengths)], sp, video.device)
    video, text = shard_padded(video, 1, group), shard_padded(text, 1, group)
    rotary = _shard_rotary(rotary, [rotary[0].shape[0]], group)
    for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
        video, text = _run_block(self, block, video, text, temb, mask, rotary)
    return (self.proj_out(self.norm_out(video, temb)),)


@apply_lora_scale("joint_attention_kwargs")
def _flux_forward(self: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                  pooled_projections: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                  img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None,
                  guidance: torch.Tensor | None = None, joint_attention_kwargs: dict[str, Any] | None = None,
                  controlnet_block_samples: Any = None, controlnet_single_block_samples: Any = None,
                  return_dict: bool = True, controlnet_blocks_repeat: bool = False) -> tuple[torch.Tensor]:
    """Replaces `FluxTransformer2DModel.forward`: packed tokens `hidden_states [B, L_img, 4C]`, text
    `[B, L_txt, D_txt]`, ids `[L, 3]`, `timestep [B]` in [0, 1] → `(tokens [B, L_img_pad/sp, 4C],)`
    of this rank."""
    _refuse_extra_kwargs(joint_attention_kwargs, "joint_attention_kwargs")
    if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
        raise ConfigError("parallel.sp_size > 1 does not support Flux ControlNet residuals; use parallel.sp_size=1")
    group = self._megaflow_sp_group
    sp = dist.get_world_size(group)
    image = self.x_embedder(hidden_states)
    timestep = timestep.to(image.dtype) * 1000
    if guidance is None:
        temb = self.time_text_embed(timestep, pooled_projections)
    else:
        temb = self.time_text_embed(timestep, guidance.to(image.dtype) * 1000, pooled_projections)
    text = self.context_embedder(encoder_hidden_states)
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    n_txt, n_img = text.shape[1], image.shape[1]
    rotary = _shard_rotary(self.pos_embed(torch.cat((txt_ids, img_ids), dim=0)), [n_txt, n_img], group)
    mask = joint_key_mask([(local_length(n_txt, sp), n_txt), (local_length(n_img, sp), n_img)], sp, image.device)
    kwargs = {"text_tokens": local_length(n_txt, sp)}
    if mask is not None:
        kwargs["attention_mask"] = mask
    text, image = shard_padded(text, 1, group), shard_padded(image, 1, group)
    for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
        text, image = _run_block(self, block, image, text, temb, rotary, kwargs)
    return (self.proj_out(self.norm_out(image, temb)),)


@apply_lora_scale("joint_attention_kwargs")
def _sd3_forward(self: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 pooled_projections: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                 block_controlnet_hidden_states: list | None = None,
                 joint_attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True,
                 skip_layers: list[int] | None = None) -> tuple[torch.Tensor]:
    """Replaces `SD3Transformer2DModel.forward`: `hidden_states [B, C, H, W]`, text
    `[B, L_txt, D_txt]` → `(tokens [B, L_pad/sp, p·p·C],)` of this rank."""
    _refuse_extra_kwargs(joint_attention_kwargs, "joint_attention_kwargs")
    if block_controlnet_hidden_states is not None:
        raise ConfigError("parallel.sp_size > 1 does not support SD3 ControlNet residuals; use parallel.sp_size=1")
    group = self._megaflow_sp_group
    sp = dist.get_world_size(group)
    image = self.pos_embed(hidden_states).contiguous()
    temb = self.time_text_embed(timestep, pooled_projections)
    text = self.context_embedder(encoder_hidden_states)
    n_img, n_txt = image.shape[1], text.shape[1]
    mask = joint_key_mask([(local_length(n_img, sp), n_img), (local_length(n_txt, sp), n_txt)], sp, image.device)
    kwargs = None if mask is None else {"attention_mask": mask}
    image, text = shard_padded(image, 1, group), shard_padded(text, 1, group)
    for index, block in enumerate(self.transformer_blocks):
        if skip_layers is None or index not in skip_layers:
            text, image = _run_block(self, block, image, text, temb, kwargs)
    return (self.proj_out(self.norm_out(image, temb)),)


def _apply(transformer: Any, group: Any, processor: Any, attentions: Sequence[Any], forward: Any) -> None:
    """Install `processor` on `attentions` and bind `forward` as `transformer.forward` (so the
    module's `__call__` and its ZeRO-3 hooks still run)."""
    if any(getattr(attn, "fused_projections", False) for attn in attentions):
        raise ConfigError("parallel.sp_size > 1 needs unfused q/k/v projections; call unfuse_qkv_projections()")
    transformer._megaflow_sp_group = group
    for attn in attentions:
        attn.set_processor(processor)
    transformer.forward = types.MethodType(forward, transformer)


class HunyuanSequenceParallel(SequenceShards):
    """Applies Ulysses SP to a `HunyuanVideoTransformer3DModel` (HunyuanVideo T2V, SkyReels-V1 I2V)
    and converts latents `[B, C_out, F, H, W]` to / from its token shards (channels `(C, pt, p, p)`)."""

    def __init__(self, transformer: Any, group: Any) -> None:
        super().__init__(group)
        config = transformer.config
        check_heads_divisible(int(config.num_attention_heads), self.sp)
        if config.image_condition_type == "token_replace":
            raise ConfigError("parallel.sp_size > 1 does not support HunyuanVideo image_condition_type="
                              "'token_replace'; use parallel.sp_size=1")
        self.patch = (int(config.patch_size_t), int(config.patch_size), int(config.patch_size))
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        _apply(transformer, group, UlyssesJointAttnProcessor(group), [b.attn for b in blocks], _hunyuan_forward)

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """`[B, C, F, H, W]` → tokens `[B, L, C·pt·p·p]` in the output projection's channel order."""
        b, c = latent.shape[:2]
        f, h, w = self.grid(latent)
        pt, ph, pw = self.patch
        x = latent.reshape(b, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, f * h * w, c * pt * ph * pw)

    def unpatchify(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, L, C·pt·p·p]` → latent of `like`'s shape `[B, C, F, H, W]`."""
        b, c = like.shape[:2]
        f, h, w = self.grid(like)
        pt, ph, pw = self.patch
        x = tokens.reshape(b, f, h, w, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(like.shape)


class FluxSequenceParallel(SequenceShards):
    """Applies Ulysses SP to a `FluxTransformer2DModel` and converts latents `[B, C, 1, H, W]` to /
    from its token shards: 2×2 packing as `FluxPipeline._pack_latents`, tokens `[B, (H/2)(W/2), 4C]`."""

    def __init__(self, transformer: Any, group: Any) -> None:
        super().__init__(group)
        check_heads_divisible(int(transformer.config.num_attention_heads), self.sp)
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        _apply(transformer, group, UlyssesFluxAttnProcessor(group), [b.attn for b in blocks], _flux_forward)

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """`[B, C, 1, H, W]` → packed tokens `[B, (H/2)(W/2), C·2·2]` (`FluxPipeline._pack_latents`)."""
        b, c, _, h, w = latent.shape
        x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpatchify(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Packed tokens `[B, (H/2)(W/2), C·2·2]` → latent of `like`'s shape `[B, C, 1, H, W]`."""
        b, c, _, h, w = like.shape
        x = tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(like.shape)


class SD3SequenceParallel(SequenceShards):
    """Applies Ulysses SP to an `SD3Transformer2DModel` (SD3 / SD3.5, with `dual_attention_layers`)
    and converts latents `[B, C, 1, H, W]` to / from its token shards (channels `(p, q, C)`)."""

    def __init__(self, transformer: Any, group: Any) -> None:
        super().__init__(group)
        check_heads_divisible(int(transformer.config.num_attention_heads), self.sp)
        self.patch = int(transformer.config.patch_size)
        attentions = [b.attn for b in transformer.transformer_blocks]
        attentions += [b.attn2 for b in transformer.transformer_blocks if b.attn2 is not None]
        _apply(transformer, group, UlyssesJointAttnProcessor(group), attentions, _sd3_forward)

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """`[B, C, 1, H, W]` → tokens `[B, (H/p)(W/p), p·p·C]` in the output projection's order."""
        b, c, _, h, w = latent.shape
        p = self.patch
        x = latent.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, (H/p)(W/p), p·p·C]` → latent of `like`'s shape `[B, C, 1, H, W]`."""
        b, c, _, h, w = like.shape
        p = self.patch
        x = tokens.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(like.shape)
