"""The analytic FLOP model (`megaflow.models.flops`) against `FlopCounterMode` counting real
diffusers forwards and backwards, on scaled-down versions of the real models' configs."""
from __future__ import annotations

import diffusers
import pytest
import torch

from megaflow.models.flops import (ForwardFlops, flop_counter, train_step_flops, transformer_flops,
                                   video_tokens)
from megaflow.models.real import REAL_MODELS
from megaflow.parallel.checkpointing import apply_activation_checkpointing

_SMALL = dict(num_attention_heads=2, attention_head_dim=12)
#: family → (real model whose config is scaled, overrides, block classes, latent [C, F, H, W])
CASES = {
    "wan": ("wan2.1_t2v_1.3b", dict(text_dim=24, freq_dim=16, ffn_dim=40, num_layers=3),
            ("WanTransformerBlock",), (16, 3, 8, 8)),
    "wan_i2v": ("wan2.1_i2v_14b_480p", dict(text_dim=24, freq_dim=16, ffn_dim=40, num_layers=2, image_dim=20,
                                            added_kv_proj_dim=24), ("WanTransformerBlock",), (16, 3, 8, 8)),
    "hunyuan": ("hunyuan_video_t2v", dict(num_layers=2, num_single_layers=2, num_refiner_layers=1, text_embed_dim=20,
                                          pooled_projection_dim=8, rope_axes_dim=[4, 4, 4]),
                ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"), (16, 3, 8, 8)),
    "skyreels_i2v": ("skyreels_v1_hunyuan_i2v", dict(num_layers=1, num_single_layers=2, num_refiner_layers=1,
                                                     text_embed_dim=20, pooled_projection_dim=8, rope_axes_dim=[4, 4, 4]),
                     ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"), (16, 3, 8, 8)),
    "flux": ("flux1_dev", dict(num_layers=2, num_single_layers=2, joint_attention_dim=20, pooled_projection_dim=8,
                               axes_dims_rope=[4, 4, 4]), ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
             (16, 1, 8, 8)),
    "sd3": ("sd3.5_medium", dict(num_layers=3, joint_attention_dim=20, caption_projection_dim=24, pooled_projection_dim=8,
                                 dual_attention_layers=[0], sample_size=16, pos_embed_max_size=16),
            ("JointTransformerBlock",), (16, 1, 8, 8)),
}


def _model(family: str) -> tuple[torch.nn.Module, dict, dict, tuple]:
    """A scaled real-config transformer, its config dict, forward inputs (batch 2) and counts."""
    name, overrides, _, latent = CASES[family]
    config = {k: v for k, v in REAL_MODELS[name].config().items() if not k.startswith("_")}
    config.update(_SMALL, **overrides)
    cls = getattr(diffusers, REAL_MODELS[name].config()["_class_name"])
    torch.manual_seed(0)
    model = cls(**config)
    B, (C, F, H, W) = 2, latent
    text = 512 if family == "wan_i2v" else 7          # diffusers' Wan I2V splits text at 512 tokens
    image = 5 if family == "wan_i2v" else 0
    t = torch.full((B,), 500.0)
    if family.startswith("wan"):
        kw = dict(hidden_states=torch.randn(B, config["in_channels"], F, H, W), timestep=t,
                  encoder_hidden_states=torch.randn(B, text, config["text_dim"]))
        if image:
            kw["encoder_hidden_states_image"] = torch.randn(B, image, config["image_dim"])
    elif family in ("hunyuan", "skyreels_i2v"):
        kw = dict(hidden_states=torch.randn(B, config["in_channels"], F, H, W), timestep=t,
                  encoder_hidden_states=torch.randn(B, text, config["text_embed_dim"]),
                  encoder_attention_mask=torch.ones(B, text), pooled_projections=torch.randn(B, 8),
                  guidance=torch.full((B,), 6000.0))
    elif family == "flux":
        kw = dict(hidden_states=torch.randn(B, H * W // 4, config["in_channels"]), timestep=t / 1000,
                  encoder_hidden_states=torch.randn(B, text, config["joint_attention_dim"]),
                  pooled_projections=torch.randn(B, 8), img_ids=torch.zeros(H * W // 4, 3), txt_ids=torch.zeros(text, 3),
                  guidance=torch.full((B,), 3.5))
    else:
        kw = dict(hidden_states=torch.randn(B, C, H, W), timestep=t, pooled_projections=torch.randn(B, 8),
                  encoder_hidden_states=torch.randn(B, text, config["joint_attention_dim"]))
    counts = dict(batch=B, video_tokens=video_tokens(family, config, latent), text_tokens=text, image_tokens=image)
    return model, config, kw, counts


def _count(model: torch.nn.Module, kw: dict, backward: bool) -> int:
    with flop_counter() as counter:
        if backward:
            model(**kw)[0].sum().backward()
        else:
            with torch.no_grad():
                model(**kw)
    return counter.get_total_flops()


def test_flop_counter_counts_cpu_sdpa():
    """torch's FlopCounterMode alone misses CPU flash attention; `flop_counter` counts it (4·B·H·L²·d)."""
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    assert counter.get_total_flops() == 4 * 2 * 3 * 10 * 10 * 8 * (1 + 2.5)


@pytest.mark.parametrize("family", list(CASES))
def test_forward_and_train_step_match_counted(family):
    """Forward, forward+backward and forward+backward with half the blocks checkpointed (through
    megaflow's `apply_activation_checkpointing`) agree with the counted FLOPs within 2 %."""
    model, config, kw, counts = _model(family)
    est = transformer_flops(family, config, **counts)
    assert est.attention > 0.1 * est.total                 # the attention terms are exercised
    assert _count(model, kw, backward=False) == pytest.approx(est.total, rel=0.02)
    plain = _count(model, kw, backward=True)
    assert plain == pytest.approx(train_step_flops(est, checkpoint_fraction=0.0), rel=0.02)
    fraction = 1.0 if family == "wan" else 0.5
    chosen = apply_activation_checkpointing(model, _block_classes(family), fraction)
    assert len(chosen) == -(-len(est.blocks) * fraction // 1)
    counted = _count(model, kw, backward=True)
    assert counted > plain
    assert counted == pytest.approx(train_step_flops(est, checkpoint_fraction=fraction), rel=0.02)


def _block_classes(family: str) -> tuple[type, ...]:
    """The classes the family's adapter checkpoints (`ModelAdapter.block_classes`)."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoSingleTransformerBlock,
                                                                         HunyuanVideoTransformerBlock)
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    known = {c.__name__: c for c in (JointTransformerBlock, FluxSingleTransformerBlock, FluxTransformerBlock,
                                     HunyuanVideoSingleTransformerBlock, HunyuanVideoTransformerBlock,
                                     WanTransformerBlock)}
    return tuple(known[name] for name in CASES[family][2])


def test_checkpointing_adds_the_chosen_blocks_forward():
    """Recompute = the first ceil(f·n) blocks' forward; the blockless form scales the whole forward."""
    est = ForwardFlops(linear=80.0, attention=20.0, blocks=(10.0, 20.0, 30.0, 40.0))
    base = train_step_flops(est, checkpoint_fraction=0.0)
    assert base == 100 + 160 + 50
    assert train_step_flops(est, checkpoint_fraction=0.5) == base + 30
    assert train_step_flops(est, checkpoint_fraction=0.6) == base + 60
    assert train_step_flops(ForwardFlops(80.0, 20.0), checkpoint_fraction=0.5) == base + 50
    with pytest.raises(ValueError, match="checkpoint_fraction"):
        train_step_flops(est, checkpoint_fraction=1.5)


def test_real_configs_and_tokens():
    """Real sizes: Wan-1.3B at 81×480×832 (21×30×52 latent → 32760 tokens) is dominated by the
    blocks; unknown families are a clear error."""
    config = REAL_MODELS["wan2.1_t2v_1.3b"].config()
    tokens = video_tokens("wan", config, (16, 21, 60, 104))
    assert tokens == 21 * 30 * 52
    est = transformer_flops("wan", config, batch=1, video_tokens=tokens, text_tokens=512)
    assert len(est.blocks) == 30 and sum(est.blocks) > 0.99 * est.total
    # 2·weights·tokens for the block weights that act on video tokens (all but the cross-attention
    # k / v, which act on the text), counted on a meta-device build of the real model
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    video_weights = sum(p.numel() for n, p in model.blocks.named_parameters()
                        if n.endswith("weight") and p.ndim == 2 and ".attn2.to_k" not in n and ".attn2.to_v" not in n)
    assert sum(est.blocks) - est.attention == pytest.approx(2 * video_weights * tokens, rel=0.01)
    assert video_tokens("flux", REAL_MODELS["flux1_dev"].config(), (16, 1, 128, 128)) == 4096
    with pytest.raises(ValueError, match="no FLOP model"):
        transformer_flops("unet", config, batch=1, video_tokens=1, text_tokens=1)
    with pytest.raises(ValueError, match="patches"):
        video_tokens("wan", config, (16, 21, 61, 104))
