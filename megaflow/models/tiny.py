"""A tiny but complete Wan 2.1 text-to-video model in diffusers format, for tests and the demo.

Every component is the real diffusers / transformers class with a minute configuration, and
the folder is written by `WanPipeline.save_pretrained`, so it loads exactly like a downloaded
model. A 5×16×16 video with 4 steps takes a few tens of milliseconds on one CPU core.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

#: The video size the tiny model is used with: 3 latent frames of 8×8 (4×4 tokens per frame).
TINY_VIDEO: dict[str, int] = dict(frames=5, height=16, width=16)
#: The tokenizer's `model_max_length`: the text sequence length the adapter pads prompts to.
TINY_MAX_SEQUENCE_LENGTH = 16
#: Name of the cached folder written by `tiny_model_dir`; bump when the configuration changes.
TINY_WAN_NAME = "tiny-wan-v1"

_TEXT_DIM = 32
_LATENT_CHANNELS = 4

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


def _build_tokenizer():
    """A small character-level BPE tokenizer (T5-style pad/eos/unk ids 0/1/2, `</s>` appended)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=TINY_MAX_SEQUENCE_LENGTH, padding_side="right",
    )


def build_tiny_wan_pipeline(seed: int = 0):
    """The tiny `WanPipeline` in memory (fp32, CPU); same seed, identical weights."""
    from diffusers import (
        AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8,
            in_channels=_LATENT_CHANNELS, out_channels=_LATENT_CHANNELS, text_dim=_TEXT_DIM,
            freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=_LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[True], latents_mean=[0.0] * _LATENT_CHANNELS,
            latents_std=[1.0] * _LATENT_CHANNELS, scale_factor_temporal=2, scale_factor_spatial=2,
        )
        torch.manual_seed(seed + 2)
        text_config = UMT5Config(
            vocab_size=len(tokenizer), d_model=_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        text_encoder = UMT5EncoderModel(text_config)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
        scheduler=scheduler, transformer=transformer.eval(),
    )


def write_tiny_wan(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny Wan 2.1 T2V model as a diffusers folder (`WanPipeline.save_pretrained`)."""
    folder = Path(folder)
    build_tiny_wan_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_model_dir(cache_root: str | Path | None = None) -> Path:
    """The tiny model folder in the cache, written once (atomically) on first use.

    The cache root is `cache_root`, else `$MEGAFLOW_CACHE`, else `~/.cache/megaflow`.
    """
    root = Path(cache_root or os.environ.get("MEGAFLOW_CACHE") or Path.home() / ".cache" / "megaflow")
    root = root.expanduser()
    final = root / TINY_WAN_NAME
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_WAN_NAME}.tmp-", dir=root))
    try:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # transformers' save_pretrained writes weights on distributed rank 0 only: every rank
            # writes its own copy in a fresh process instead (the first rename wins).
            subprocess.run([sys.executable, "-c", "import sys; from megaflow.models.tiny import write_tiny_wan; "
                            "write_tiny_wan(sys.argv[1])", str(tmp)], check=True, stdout=subprocess.DEVNULL)
        else:
            write_tiny_wan(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
