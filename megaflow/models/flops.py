"""Analytic FLOP model of one transformer forward of every family megaflow trains.

Counted from diffusers' module structure (`WanTransformer3DModel`, `HunyuanVideoTransformer3DModel`,
`FluxTransformer2DModel`, `SD3Transformer2DModel`) and a `config.json` dict, without building a
model: every matmul layer (linears and the patch-embedding convolution, 2·m·n·k) and every
attention (QKᵀ and AV, 4·B·H·Lq·Lk·d), the conventions of `torch.utils.flop_counter`. Element-wise
work (norms, activations, RoPE, softmax) is not counted, as FLOP counters and MFU figures do not.
Attention is counted dense over its padded length (masks do not reduce it).

Token counts: `video_tokens` (after patchify / FLUX's 2×2 packing), `text_tokens` (the text
sequence the transformer receives: Wan 512 UMT5 tokens, HunyuanVideo 256 Llama tokens, FLUX 512
T5 tokens, SD3 77 CLIP + 128 T5), `image_tokens` (Wan I2V: CLIP-vision tokens, 257 for ViT-H/14).
`flop_counter()` gives a `FlopCounterMode` that also counts torch's CPU flash attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

FAMILIES: tuple[str, ...] = ("wan", "wan_i2v", "hunyuan", "skyreels_i2v", "flux", "sd3")
#: Backward cost of attention relative to its forward: a flash-style backward recomputes QKᵀ and
#: does 4 more matmuls (dV, dP, dQ, dK): 5 vs 2 (torch's `sdpa_backward_flop_count`).
ATTENTION_BACKWARD_FACTOR = 2.5
#: Backward cost of a matmul layer relative to its forward (input and weight gradients).
LINEAR_BACKWARD_FACTOR = 2.0


@dataclass
class ForwardFlops:
    """FLOPs of one transformer forward, split into matmul layers and attention. `blocks`: total
    FLOPs of each transformer block in module order (the units `apply_activation_checkpointing`
    checkpoints, first ones first; the token refiner and embedders are not among them).
    `input_linear`: the part of `linear` in layers applied to the model's inputs (patch embedding,
    first layers of the text / timestep / pooled embedders), whose input gradient is never computed."""

    linear: float      # 2·m·n·k of every matmul layer of the blocks + embedders/heads, per forward
    attention: float   # QK^T and AV: 4·B·H·Lq·Lk·d per attention (self, joint, cross)
    blocks: tuple[float, ...] = field(default=())
    input_linear: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.attention


class _Tally:
    """Accumulates linear and attention FLOPs, optionally per block."""

    def __init__(self) -> None:
        self.linear = 0.0
        self.attention = 0.0
        self.blocks: list[float] = []
        self.input_linear = 0.0
        self._block: float | None = None

    def mm(self, rows: float, fan_in: float, fan_out: float, *, on_input: bool = False) -> None:
        """A linear layer (or patch conv) applied to `rows` vectors: 2·rows·in·out; `on_input`:
        applied to a model input (no input gradient in the backward)."""
        flops = 2.0 * rows * fan_in * fan_out
        self.linear += flops
        if on_input:
            self.input_linear += flops
        if self._block is not None:
            self._block += flops

    def attn(self, batch: float, heads: int, lq: float, lk: float, head_dim: int) -> None:
        flops = 4.0 * batch * heads * lq * lk * head_dim
        self.attention += flops
        if self._block is not None:
            self._block += flops

    def begin_block(self) -> None:
        self._block = 0.0

    def end_block(self) -> None:
        assert self._block is not None
        self.blocks.append(self._block)
        self._block = None


def _get(config: dict, key: str, default: Any = None) -> Any:
    value = config.get(key, default)
    return default if value is None else value


def _wan(t: _Tally, c: dict, B: int, Lv: int, Lt: int, Li: int) -> None:
    H, d = int(_get(c, "num_attention_heads", 40)), int(_get(c, "attention_head_dim", 128))
    D = H * d
    patch = math.prod(int(p) for p in _get(c, "patch_size", (1, 2, 2)))
    cin, cout = int(_get(c, "in_channels", 16)), int(_get(c, "out_channels", _get(c, "in_channels", 16)))
    F, freq, text_dim = int(_get(c, "ffn_dim", 13824)), int(_get(c, "freq_dim", 256)), int(_get(c, "text_dim", 4096))
    image_dim, added_kv = c.get("image_dim"), c.get("added_kv_proj_dim")
    if image_dim is None:
        Li = 0
    t.mm(B * Lv, cin * patch, D, on_input=True)                          # patch_embedding (Conv3d)
    t.mm(B, freq, D, on_input=True), t.mm(B, D, D)                       # time_embedder
    t.mm(B, D, 6 * D)                                     # time_proj
    t.mm(B * Lt, text_dim, D, on_input=True), t.mm(B * Lt, D, D)         # text_embedder
    if Li:
        t.mm(B * Li, image_dim, image_dim), t.mm(B * Li, image_dim, D)   # image_embedder.ff
    for _ in range(int(_get(c, "num_layers", 40))):
        t.begin_block()
        for _ in range(4):                                # attn1: q, k, v, out
            t.mm(B * Lv, D, D)
        t.attn(B, H, Lv, Lv, d)
        t.mm(B * Lv, D, D), t.mm(B * Lv, D, D)            # attn2: q, out
        t.mm(B * Lt, D, D), t.mm(B * Lt, D, D)            # attn2: k, v on the text
        t.attn(B, H, Lv, Lt, d)
        if added_kv is not None and Li:
            t.mm(B * Li, int(added_kv), D), t.mm(B * Li, int(added_kv), D)   # add_k_proj, add_v_proj
            t.attn(B, H, Lv, Li, d)
        t.mm(B * Lv, D, F), t.mm(B * Lv, F, D)            # ffn
        t.end_block()
    t.mm(B * Lv, D, cout * patch)                         # proj_out


def _hunyuan(t: _Tally, c: dict, B: int, Lv: int, Lt: int) -> None:
    H, d = int(_get(c, "num_attention_heads", 24)), int(_get(c, "attention_head_dim", 128))
    D = H * d
    M = int(D * float(_get(c, "mlp_ratio", 4.0)))
    p, pt = int(_get(c, "patch_size", 2)), int(_get(c, "patch_size_t", 1))
    cin, cout = int(_get(c, "in_channels", 16)), int(_get(c, "out_channels", _get(c, "in_channels", 16)))
    text_dim, pooled = int(_get(c, "text_embed_dim", 4096)), int(_get(c, "pooled_projection_dim", 768))
    if c.get("image_condition_type") == "token_replace":
        raise ValueError("the FLOP model does not cover HunyuanVideo's token_replace (I2V) blocks")
    L = Lv + Lt
    t.mm(B * Lv, cin * pt * p * p, D, on_input=True)                     # x_embedder (Conv3d)
    t.mm(B, 256, D, on_input=True), t.mm(B, D, D)                        # time_text_embed.timestep_embedder
    t.mm(B, pooled, D, on_input=True), t.mm(B, D, D)                     # time_text_embed.text_embedder
    if _get(c, "guidance_embeds", True):
        t.mm(B, 256, D, on_input=True), t.mm(B, D, D)                    # guidance_embedder
    # context_embedder (token refiner): its own timestep / pooled-text embedding, proj_in, blocks
    t.mm(B, 256, D, on_input=True), t.mm(B, D, D), t.mm(B, text_dim, D, on_input=True), t.mm(B, D, D)
    t.mm(B * Lt, text_dim, D, on_input=True)
    for _ in range(int(_get(c, "num_refiner_layers", 2))):
        for _ in range(4):
            t.mm(B * Lt, D, D)
        t.attn(B, H, Lt, Lt, d)
        t.mm(B * Lt, D, 4 * D), t.mm(B * Lt, 4 * D, D)    # ff (linear-silu, mlp_width_ratio 4)
        t.mm(B, D, 2 * D)                                 # norm_out (AdaNorm)
    for _ in range(int(_get(c, "num_layers", 20))):
        t.begin_block()
        t.mm(B, D, 6 * D), t.mm(B, D, 6 * D)              # norm1, norm1_context (AdaLayerNormZero)
        for _ in range(4):
            t.mm(B * Lv, D, D), t.mm(B * Lt, D, D)        # q, k, v, out / add_q, add_k, add_v, add_out
        t.attn(B, H, L, L, d)
        t.mm(B * L, D, M), t.mm(B * L, M, D)              # ff, ff_context
        t.end_block()
    for _ in range(int(_get(c, "num_single_layers", 40))):
        t.begin_block()
        t.mm(B, D, 3 * D)                                 # norm (AdaLayerNormZeroSingle)
        t.mm(B * L, D, M)                                 # proj_mlp
        for _ in range(3):
            t.mm(B * L, D, D)                             # q, k, v (pre_only: no to_out)
        t.attn(B, H, L, L, d)
        t.mm(B * L, D + M, D)                             # proj_out
        t.end_block()
    t.mm(B, D, 2 * D)                                     # norm_out (AdaLayerNormContinuous)
    t.mm(B * Lv, D, pt * p * p * cout)                    # proj_out


def _flux(t: _Tally, c: dict, B: int, Lv: int, Lt: int) -> None:
    H, d = int(_get(c, "num_attention_heads", 24)), int(_get(c, "attention_head_dim", 128))
    D, M = H * d, 4 * H * d
    p = int(_get(c, "patch_size", 1))
    cin = int(_get(c, "in_channels", 64))
    cout = int(_get(c, "out_channels", cin))
    text_dim, pooled = int(_get(c, "joint_attention_dim", 4096)), int(_get(c, "pooled_projection_dim", 768))
    L = Lv + Lt
    t.mm(B, 256, D, on_input=True), t.mm(B, D, D)                        # timestep_embedder
    if _get(c, "guidance_embeds", False):
        t.mm(B, 256, D, on_input=True), t.mm(B, D, D)                    # guidance_embedder
    t.mm(B, pooled, D, on_input=True), t.mm(B, D, D)                     # text_embedder
    t.mm(B * Lt, text_dim, D, on_input=True)                             # context_embedder
    t.mm(B * Lv, cin, D, on_input=True)                                  # x_embedder
    for _ in range(int(_get(c, "num_layers", 19))):
        t.begin_block()
        t.mm(B, D, 6 * D), t.mm(B, D, 6 * D)              # norm1, norm1_context
        for _ in range(4):
            t.mm(B * Lv, D, D), t.mm(B * Lt, D, D)
        t.attn(B, H, L, L, d)
        t.mm(B * L, D, M), t.mm(B * L, M, D)              # ff, ff_context
        t.end_block()
    for _ in range(int(_get(c, "num_single_layers", 38))):
        t.begin_block()
        t.mm(B, D, 3 * D)
        t.mm(B * L, D, M)
        for _ in range(3):
            t.mm(B * L, D, D)
        t.attn(B, H, L, L, d)
        t.mm(B * L, D + M, D)
        t.end_block()
    t.mm(B, D, 2 * D)                                     # norm_out
    t.mm(B * Lv, D, p * p * cout)                         # proj_out


def _sd3(t: _Tally, c: dict, B: int, Lv: int, Lt: int) -> None:
    H, d = int(_get(c, "num_attention_heads", 18)), int(_get(c, "attention_head_dim", 64))
    D, M = H * d, 4 * H * d
    p = int(_get(c, "patch_size", 2))
    cin = int(_get(c, "in_channels", 16))
    cout = int(_get(c, "out_channels", cin))
    text_dim, pooled = int(_get(c, "joint_attention_dim", 4096)), int(_get(c, "pooled_projection_dim", 2048))
    caption = int(_get(c, "caption_projection_dim", 1152))
    if caption != D:
        raise ValueError(f"SD3 caption_projection_dim ({caption}) must equal heads × head dim ({D})")
    n = int(_get(c, "num_layers", 18))
    dual = set(int(i) for i in _get(c, "dual_attention_layers", ()))
    L = Lv + Lt
    t.mm(B * Lv, cin * p * p, D, on_input=True)                          # pos_embed.proj (Conv2d)
    t.mm(B, 256, D, on_input=True), t.mm(B, D, D)                        # timestep_embedder
    t.mm(B, pooled, D, on_input=True), t.mm(B, D, D)                     # text_embedder
    t.mm(B * Lt, text_dim, caption, on_input=True)                       # context_embedder
    for i in range(n):
        last = i == n - 1                                 # context_pre_only
        t.begin_block()
        t.mm(B, D, (9 if i in dual else 6) * D)           # norm1 (SD35AdaLayerNormZeroX / AdaLayerNormZero)
        t.mm(B, D, (2 if last else 6) * D)                # norm1_context
        for _ in range(4):
            t.mm(B * Lv, D, D)                            # q, k, v, out
        for _ in range(3 if last else 4):
            t.mm(B * Lt, D, D)                            # add_q, add_k, add_v (, to_add_out)
        t.attn(B, H, L, L, d)
        if i in dual:
            for _ in range(4):
                t.mm(B * Lv, D, D)                        # attn2: q, k, v, out
            t.attn(B, H, Lv, Lv, d)
        t.mm(B * Lv, D, M), t.mm(B * Lv, M, D)            # ff
        if not last:
            t.mm(B * Lt, D, M), t.mm(B * Lt, M, D)        # ff_context
        t.end_block()
    t.mm(B, D, 2 * D)                                     # norm_out
    t.mm(B * Lv, D, p * p * cout)                         # proj_out


def transformer_flops(family: str, config: dict, *, batch: int, video_tokens: int, text_tokens: int,
                      image_tokens: int = 0) -> ForwardFlops:
    """FLOPs of one forward of the family's transformer (diffusers `config.json` dict `config`)
    on `batch` samples of `video_tokens` latent tokens (after patchify) and `text_tokens` text
    tokens (`image_tokens`: Wan I2V's CLIP-vision tokens)."""
    t = _Tally()
    if family in ("wan", "wan_i2v"):
        _wan(t, config, batch, video_tokens, text_tokens, image_tokens)
    elif family in ("hunyuan", "skyreels_i2v"):
        _hunyuan(t, config, batch, video_tokens, text_tokens)
    elif family == "flux":
        _flux(t, config, batch, video_tokens, text_tokens)
    elif family == "sd3":
        _sd3(t, config, batch, video_tokens, text_tokens)
    else:
        raise ValueError(f"no FLOP model for family {family!r}; known: {', '.join(FAMILIES)}")
    return ForwardFlops(linear=t.linear, attention=t.attention, blocks=tuple(t.blocks), input_linear=t.input_linear)


def checkpointed_blocks(n_blocks: int, fraction: float) -> int:
    """How many (first) blocks `apply_activation_checkpointing` checkpoints at `fraction`."""
    return math.ceil(fraction * n_blocks - 1e-9) if fraction > 0 else 0


def train_step_flops(forward: ForwardFlops, *, checkpoint_fraction: float) -> float:
    """FLOPs of a full fine-tune's forward + backward (2× the matmul layers, less the input
    gradients of the layers on the model's inputs; 2.5× attention, a flash-style backward recomputes QKᵀ) + the recomputed forward of the checkpointed blocks (the first
    `ceil(fraction · n)`, as `apply_activation_checkpointing` chooses; all of the forward when
    `forward.blocks` is empty)."""
    if not 0.0 <= checkpoint_fraction <= 1.0:
        raise ValueError(f"checkpoint_fraction must be in [0, 1], got {checkpoint_fraction}")
    backward = (LINEAR_BACKWARD_FACTOR * forward.linear - forward.input_linear
                + ATTENTION_BACKWARD_FACTOR * forward.attention)
    if forward.blocks:
        recompute = sum(forward.blocks[:checkpointed_blocks(len(forward.blocks), checkpoint_fraction)])
    else:
        recompute = checkpoint_fraction * forward.total
    return forward.total + backward + recompute


def video_tokens(family: str, config: dict, latent_shape: tuple[int, int, int, int]) -> int:
    """Tokens after patchify of a latent `[C, F, H, W]` (FLUX: after its 2×2 packing)."""
    _, F, H, W = (int(s) for s in latent_shape)
    if family in ("wan", "wan_i2v"):
        pt, ph, pw = (int(p) for p in _get(config, "patch_size", (1, 2, 2)))
    elif family in ("hunyuan", "skyreels_i2v"):
        pt, ph, pw = int(_get(config, "patch_size_t", 1)), int(_get(config, "patch_size", 2)), int(_get(config, "patch_size", 2))
    elif family == "flux":
        pt, ph, pw = 1, 2 * int(_get(config, "patch_size", 1)), 2 * int(_get(config, "patch_size", 1))
    elif family == "sd3":
        pt, ph, pw = 1, int(_get(config, "patch_size", 2)), int(_get(config, "patch_size", 2))
    else:
        raise ValueError(f"no token model for family {family!r}; known: {', '.join(FAMILIES)}")
    if F % pt or H % ph or W % pw:
        raise ValueError(f"{family} latent {tuple(latent_shape)} does not divide into patches {pt}×{ph}×{pw}")
    return (F // pt) * (H // ph) * (W // pw)


def flop_counter(display: bool = False) -> Any:
    """A `torch.utils.flop_counter.FlopCounterMode` that also counts torch's CPU flash attention
    (`_scaled_dot_product_flash_attention_for_cpu` and its backward, which torch leaves out),
    with the same formulas as the GPU kernels."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                 out_shape: Any = None, **kwargs: Any) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    return fc.FlopCounterMode(display=display, custom_mapping=mapping)
