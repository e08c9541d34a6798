"""Tiny but complete diffusers models of every family megaflow trains, for tests and the demo.

Every component is the real diffusers / transformers class with a minute configuration, and each
folder is written by its pipeline's own `save_pretrained`, so it loads exactly like a downloaded
model. Families (`TINY_FAMILIES`): Wan 2.1 T2V (`wan`) and I2V (`wan_i2v`), HunyuanVideo T2V
(`hunyuan`), SkyReels-V1 I2V (`skyreels_i2v`), FLUX.1 (`flux`) and SD3.5 (`sd3`). Tokenizers are
built locally (character-level BPE trained on a small corpus; no hub access). A tiny video with a
few steps takes well under a second on one CPU core.

Calling the pipelines on these folders:

- `wan_i2v`: `WanImageToVideoPipeline` cleans prompts with `ftfy` unconditionally (`NameError`
  without it; `WanPipeline` skips it), so pass `prompt_embeds` / `negative_prompt_embeds` where it
  is not installed. Its text is always 512 tokens: diffusers' Wan attention splits image from text
  context at 512 text tokens, silently wrong for any other length.
- `hunyuan`, `skyreels_i2v`: pass `prompt_template=TINY_HUNYUAN_PROMPT_TEMPLATE`. diffusers'
  default template (`crop_start=95`, counted in the real Llama tokenizer's tokens) leaves template
  text in the embeddings, and `crop_start=None` crops every prompt token away (an all-zero mask,
  no error). The folders carry that template (and the 16-token prompt length) in
  `megaflow_text.json`, which megaflow's Hunyuan adapters read (`megaflow.models.hunyuan`).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from megaflow.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from torch import nn
    from transformers import CLIPTokenizer, PreTrainedModel, PreTrainedTokenizerFast

#: The video size the tiny Wan models are used with: 3 latent frames of 8×8 (4×4 tokens per frame).
TINY_VIDEO: dict[str, int] = dict(frames=5, height=16, width=16)
#: `model_max_length` of the tiny tokenizers (Wan T2V UMT5, Hunyuan Llama, FLUX / SD3 T5): the
#: text sequence length the adapters pad prompts to.
TINY_MAX_SEQUENCE_LENGTH = 16
#: Text length of the `wan_i2v` tokenizer: diffusers' Wan I2V attention assumes exactly 512.
TINY_WAN_I2V_MAX_SEQUENCE_LENGTH = 512
#: Sample size per family: videos `frames, height, width`, images `height, width`. Wan: latents
#: `[4, 3, 8, 8]`; Hunyuan / SkyReels: `[4, 3, 4, 4]` (2×2 tokens per frame); FLUX / SD3:
#: latents `[16, 8, 8]` (16 image tokens).
TINY_SIZES: dict[str, dict[str, int]] = {
    "wan": TINY_VIDEO,
    "wan_i2v": TINY_VIDEO,
    "hunyuan": dict(frames=9, height=32, width=32),
    "skyreels_i2v": dict(frames=9, height=32, width=32),
    "flux": dict(height=64, width=64),
    "sd3": dict(height=64, width=64),
}
#: Cached folder name per family (`tiny_model_dir`); bump a version when its configuration changes.
TINY_NAMES: dict[str, str] = {
    "wan": "tiny-wan-v1",
    "wan_i2v": "tiny-wan-i2v-v1",
    "hunyuan": "tiny-hunyuan-v2",
    "skyreels_i2v": "tiny-skyreels-i2v-v2",
    "flux": "tiny-flux-v1",
    "sd3": "tiny-sd3-v1",
}
#: The families `build_tiny_pipeline` / `tiny_model_dir` know.
TINY_FAMILIES: tuple[str, ...] = tuple(TINY_NAMES)
#: Name of the cached tiny Wan 2.1 T2V folder.
TINY_WAN_NAME = TINY_NAMES["wan"]
#: The `prompt_template` the Hunyuan / SkyReels pipelines need with these tokenizers (no chat
#: template, nothing cropped).
TINY_HUNYUAN_PROMPT_TEMPLATE: dict[str, Any] = {"template": "{}", "crop_start": 0}
#: `{"prompt", "image"}` lines for the tiny I2V recipes; image paths are relative to this file.
TINY_I2V_PROMPTS: Path = Path(__file__).resolve().parent.parent / "recipes" / "tiny_i2v_prompts.jsonl"

_TEXT_DIM = 32
_LATENT_CHANNELS = 4
_IMAGE_LATENT_CHANNELS = 16
_CLIP_MAX_LENGTH = 77
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"

_CORPUS = (
    "a red ball rolling across a green field",
    "a blue cube spinning slowly on a white table",
    "a yellow triangle floating in the dark sky",
    "an orange sphere bouncing down the stairs",
    "a purple square sliding over the ice",
    "a black cat walking along a sunny beach at sunset",
    "a white dog running through the snow in the forest",
    "two brown horses galloping across the desert",
    "a small bird flying over the ocean waves",
    "a fish swimming in a clear blue river",
    "a car driving down a city street at night",
    "a boat sailing on a calm lake in the morning",
    "a train moving through the mountains in the rain",
    "a person dancing in a bright room with colorful lights",
    "a woman walking in the park under pink trees",
    "a man riding a bicycle on a wooden bridge",
    "a child jumping into a pool of water",
    "clouds drifting over a green valley",
    "fire burning in a stone fireplace",
    "smoke rising slowly from a chimney",
    "leaves falling from a tall tree in autumn",
    "waves crashing against the rocks on the shore",
    "a gray circle growing and shrinking in the center",
    "a rainbow appearing over the hills after the storm",
    "the camera zooms in on a golden flower",
    "the camera pans left across a busy market",
    "a silver robot turning its head to the right",
    "a red balloon rising into the blue sky",
    "a spinning wheel with many bright colors",
    "stars twinkling above a quiet village at night",
    "snow falling on a small house in winter",
    "a butterfly landing on a purple flower in the garden",
    "a green frog jumping from one leaf to another",
    "a cup of coffee on a table near the window",
    "a candle flickering in a dark room",
    "a cinematic shot of a city skyline at dawn",
    "a high quality video of a cat playing with a ball",
    "a slow motion shot of water drops splashing",
    "an astronaut floating in space near the moon",
    "a panda eating bamboo in the forest",
)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded to `seed`, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_tokenizer(max_length: int = TINY_MAX_SEQUENCE_LENGTH) -> PreTrainedTokenizerFast:
    """A small character-level BPE tokenizer (T5-style pad/eos/unk ids 0/1/2, `</s>` appended)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=list(_ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=max_length, padding_side="right",
    )


def _build_clip_tokenizer() -> CLIPTokenizer:
    """A small `CLIPTokenizer` (77 tokens): CLIP's byte-level BPE with `</w>` word ends, trained on
    the corpus; vocabulary = characters, characters + `</w>`, merges, then `<|startoftext|>` and
    `<|endoftext|>` last (the largest ids, as in CLIP; `<|endoftext|>` also pads)."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    clip = CLIPTokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer, tok.pre_tokenizer = clip.normalizer, clip.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=list(_ALPHABET), end_of_word_suffix="</w>",
                                  show_progress=False)
    tok.train_from_iterator(list(_CORPUS), trainer)
    trained = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained]
    tokens = list(_ALPHABET) + [c + "</w>" for c in _ALPHABET]
    tokens += list(dict.fromkeys(a + b for a, b in merges if a + b not in tokens))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                         model_max_length=_CLIP_MAX_LENGTH)


def _umt5(tokenizer: PreTrainedTokenizerFast, d_model: int = _TEXT_DIM, *, d_kv: int = 8, d_ff: int = 64,
          num_layers: int = 2, num_heads: int = 4) -> PreTrainedModel:
    """The tiny UMT5 encoder of the Wan families (`d_model` 32; the keywords size other variants)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    ))


def _t5(tokenizer: PreTrainedTokenizerFast, d_model: int = _TEXT_DIM, *, d_kv: int = 8, d_ff: int = 64,
        num_layers: int = 2, num_heads: int = 4) -> PreTrainedModel:
    """A tiny T5 v1.1 encoder (FLUX's / SD3's T5-XXL slot, `d_model` 32; the keywords size other variants)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    ))


def _clip_text(tokenizer: CLIPTokenizer, hidden: int, projection: int | None = None, *, layers: int = 2,
               heads: int = 2, intermediate: int | None = None) -> PreTrainedModel:
    """A tiny CLIP text encoder: `CLIPTextModel`, or `CLIPTextModelWithProjection` when `projection`
    is given (pooled `[B, projection]`); 2 layers, 77 positions (the keywords size other variants;
    `intermediate` defaults to `2 * hidden`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_attention_heads=heads, num_hidden_layers=layers, projection_dim=projection or hidden,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _llama(tokenizer: PreTrainedTokenizerFast, hidden: int = 16, *, intermediate: int = 32, heads: int = 4,
           head_dim: int | None = None) -> PreTrainedModel:
    """A tiny Llama (HunyuanVideo's llava-llama-3 slot): hidden 16, 3 layers (the pipeline reads
    `hidden_states[-3]`); the keywords size other variants (`head_dim` default `hidden // heads`)."""
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=head_dim or hidden // heads, num_hidden_layers=3,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    ))


def _wan_vae() -> nn.Module:
    """Tiny `AutoencoderKLWan`: 4 latent channels, 2× spatial and temporal compression."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8, z_dim=_LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[True], latents_mean=[0.0] * _LATENT_CHANNELS,
        latents_std=[1.0] * _LATENT_CHANNELS, scale_factor_temporal=2, scale_factor_spatial=2,
    )


def _wan_transformer(in_channels: int = _LATENT_CHANNELS, **image: int) -> nn.Module:
    """Tiny `WanTransformer3DModel` (4 heads × 8); `image` adds `image_dim` / `added_kv_proj_dim`."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8,
        in_channels=in_channels, out_channels=_LATENT_CHANNELS, text_dim=_TEXT_DIM,
        freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64, **image,
    )


def _hunyuan_vae() -> nn.Module:
    """Tiny `AutoencoderKLHunyuanVideo`: 4 latent channels, 8× spatial, 4× temporal (as the real one)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=_LATENT_CHANNELS,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8,) * 4, layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )


def _hunyuan_transformer(in_channels: int) -> nn.Module:
    """Tiny `HunyuanVideoTransformer3DModel` (1 dual + 1 single block, 4 heads × 8, guidance-embedded)."""
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=_LATENT_CHANNELS, num_attention_heads=4, attention_head_dim=8,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_theta=256.0, rope_axes_dim=(2, 2, 4),
    )


def _image_vae(scaling_factor: float, shift_factor: float) -> nn.Module:
    """Tiny `AutoencoderKL` of FLUX / SD3: 16 latent channels, 8× spatial, no quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4, layers_per_block=1,
        latent_channels=_IMAGE_LATENT_CHANNELS, norm_num_groups=4, sample_size=64,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def _build_wan(seed: int) -> DiffusionPipeline:
    """Wan 2.1 T2V: `WanPipeline`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer = _build_tokenizer()
    with _seeded(seed):
        transformer = _wan_transformer()
    with _seeded(seed + 1):
        vae = _wan_vae()
    with _seeded(seed + 2):
        text_encoder = _umt5(tokenizer)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer.eval(),
    )


def _build_wan_i2v(seed: int) -> DiffusionPipeline:
    """Wan 2.1 I2V: `WanImageToVideoPipeline`. Transformer input = latent (4) + mask (the VAE's
    temporal factor, 2) + image latent (4) = 10 channels; CLIP image embeds `[B, 17, 16]`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tokenizer = _build_tokenizer(TINY_WAN_I2V_MAX_SEQUENCE_LENGTH)
    with _seeded(seed):
        transformer = _wan_transformer(2 * _LATENT_CHANNELS + 2, image_dim=16, added_kv_proj_dim=32)
    with _seeded(seed + 1):
        vae = _wan_vae()
    with _seeded(seed + 2):
        text_encoder = _umt5(tokenizer)
    with _seeded(seed + 3):
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=16, hidden_act="gelu",
        ))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), image_processor=image_processor,
        image_encoder=image_encoder.eval(), transformer=transformer.eval(),
    )


def _hunyuan_components(seed: int, in_channels: int) -> dict[str, Any]:
    """The components shared by the Hunyuan pipelines: Llama + CLIP-L text encoders, VAE, transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer, tokenizer_2 = _build_tokenizer(), _build_clip_tokenizer()
    with _seeded(seed):
        transformer = _hunyuan_transformer(in_channels)
    with _seeded(seed + 1):
        vae = _hunyuan_vae()
    with _seeded(seed + 2):
        text_encoder = _llama(tokenizer)
    with _seeded(seed + 3):
        text_encoder_2 = _clip_text(tokenizer_2, hidden=8)
    return dict(
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
    )


def _build_hunyuan(seed: int) -> DiffusionPipeline:
    """HunyuanVideo T2V: `HunyuanVideoPipeline` (text `[B, L, 16]` + mask, pooled `[B, 8]`)."""
    from diffusers import HunyuanVideoPipeline

    return HunyuanVideoPipeline(**_hunyuan_components(seed, _LATENT_CHANNELS))


def _build_skyreels_i2v(seed: int) -> DiffusionPipeline:
    """SkyReels-V1 I2V: `HunyuanSkyreelsImageToVideoPipeline`; transformer input = latent + image latent."""
    from diffusers import HunyuanSkyreelsImageToVideoPipeline

    return HunyuanSkyreelsImageToVideoPipeline(**_hunyuan_components(seed, 2 * _LATENT_CHANNELS))


def _build_flux(seed: int) -> DiffusionPipeline:
    """FLUX.1: `FluxPipeline` (CLIP pooled `[B, 8]`, T5 `[B, L, 32]`, packed latents `[B, L_img, 64]`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = _build_clip_tokenizer(), _build_tokenizer()
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * _IMAGE_LATENT_CHANNELS, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=_TEXT_DIM, pooled_projection_dim=8,
            guidance_embeds=True, axes_dims_rope=(2, 2, 4),
        )
    with _seeded(seed + 1):
        vae = _image_vae(scaling_factor=0.3611, shift_factor=0.1159)
    with _seeded(seed + 2):
        text_encoder = _clip_text(tokenizer, hidden=8)
    with _seeded(seed + 3):
        text_encoder_2 = _t5(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, transformer=transformer.eval(),
    )


def _build_sd3(seed: int) -> DiffusionPipeline:
    """SD3.5: `StableDiffusion3Pipeline`. CLIP-L (hidden 8) + CLIP-G (hidden 16) hidden states are
    concatenated and zero-padded to T5's 32; pooled `[B, 8 + 16]`; block 0 has dual attention."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_3 = _build_clip_tokenizer(), _build_tokenizer()
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=_IMAGE_LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=_TEXT_DIM, caption_projection_dim=32,
            pooled_projection_dim=24, out_channels=_IMAGE_LATENT_CHANNELS, pos_embed_max_size=32,
            dual_attention_layers=(0,), qk_norm="rms_norm",
        )
    with _seeded(seed + 1):
        vae = _image_vae(scaling_factor=1.5305, shift_factor=0.0609)
    with _seeded(seed + 2):
        text_encoder = _clip_text(tokenizer, hidden=8, projection=8)
    with _seeded(seed + 3):
        text_encoder_2 = _clip_text(tokenizer, hidden=16, projection=16)
    with _seeded(seed + 4):
        text_encoder_3 = _t5(tokenizer_3)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer, text_encoder_3=text_encoder_3.eval(), tokenizer_3=tokenizer_3,
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "wan": _build_wan,
    "wan_i2v": _build_wan_i2v,
    "hunyuan": _build_hunyuan,
    "skyreels_i2v": _build_skyreels_i2v,
    "flux": _build_flux,
    "sd3": _build_sd3,
}


def _check_family(family: str) -> str:
    """`family`, or `ConfigError` naming the known families."""
    if family not in TINY_NAMES:
        raise ConfigError(f"there is no tiny model of family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return family


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """The tiny diffusers pipeline of `family` in memory (fp32, CPU, eval mode); same seed, identical weights."""
    return _BUILDERS[_check_family(family)](seed)


def build_tiny_wan_pipeline(seed: int = 0) -> DiffusionPipeline:
    """The tiny `WanPipeline` in memory (fp32, CPU); same seed, identical weights."""
    return build_tiny_pipeline("wan", seed)


def write_tiny_pipeline(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny model of `family` as a diffusers folder (its pipeline's `save_pretrained`;
    Hunyuan / SkyReels also get the `megaflow_text.json` their tokenizer needs)."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    if family in ("hunyuan", "skyreels_i2v"):
        from megaflow.models.hunyuan import write_text_settings

        write_text_settings(folder, TINY_HUNYUAN_PROMPT_TEMPLATE, TINY_MAX_SEQUENCE_LENGTH)
    return folder


def write_tiny_wan(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny Wan 2.1 T2V model as a diffusers folder (`WanPipeline.save_pretrained`)."""
    return write_tiny_pipeline("wan", folder, seed)


def cache_root(root: str | Path | None = None) -> Path:
    """The model cache: `root`, else `$MEGAFLOW_CACHE`, else `~/.cache/megaflow`."""
    return Path(root or os.environ.get("MEGAFLOW_CACHE") or Path.home() / ".cache" / "megaflow").expanduser()


def cached_folder(name: str, writer: str, args: list[str], root: str | Path | None = None) -> Path:
    """The model folder `name` in the cache, written once (atomically: into a temporary folder,
    then renamed) by `writer(*args, folder)` ("module:function", string arguments); a folder is
    complete once it has `model_index.json`. Under torch.distributed every process writes its own
    copy in a fresh process (transformers' `save_pretrained` writes weights on rank 0 only); the
    first rename wins."""
    root = cache_root(root)
    final = root / name
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    module, function = writer.split(":")
    try:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            subprocess.run([sys.executable, "-c", "import importlib, sys; module, function = sys.argv[1].split(':'); "
                            "getattr(importlib.import_module(module), function)(*sys.argv[2:])",
                            writer, *args, str(tmp)], check=True, stdout=subprocess.DEVNULL)
        else:
            getattr(importlib.import_module(module), function)(*args, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_model_dir(family: str = "wan", cache_root: str | Path | None = None) -> Path:
    """The tiny model folder of `family` in the cache (`cached_folder`), written once on first use."""
    return cached_folder(TINY_NAMES[_check_family(family)], "megaflow.models.tiny:write_tiny_pipeline", [family],
                         cache_root)
