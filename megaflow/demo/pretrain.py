"""Pretrain the demo's tiny Wan text-to-video model on the shapes world (`megaflow pretrain-demo`).

Two stages, both seeded: (1) the `AutoencoderKLWan` learns to reconstruct clips from its latent
means (pixel MSE with object pixels weighted up, a little latent noise and a small L2 on the
latents: an autoencoder, as sampling the posterior would slow learning down on a CPU budget); (2) the `WanTransformer3DModel` learns flow
matching on the VAE's normalised latents: `x_σ = (1 − σ)·x0 + σ·ε`, target `v = ε − x0`.
The text encoder is a tiny UMT5 with seeded random weights, kept frozen: the word-level
tokenizer gives each word its own id, so different prompts give different embeddings, and the
transformer's cross-attention learns to read them. The result is a `WanPipeline` folder.

The captions are noisy, as web captions are: each attribute of a clip's caption is replaced by a
random value with probability `caption_noise`, drawn anew at every step. The transformer thus
learns a mixture (each attribute right more often than not, sometimes a wrong colour, shape
or direction), the kind of imperfect base model GRPO with a verifier is for: it sharpens the
mixture towards the prompt.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from megaflow.demo.world import (COLORS, DIRECTIONS, FRAMES, HEIGHT, SHAPES, WIDTH, parse_prompt, sample_dataset,
                                 split_prompts)
from megaflow.monitor.progress import progress
from megaflow.sampling.schedule import shift_sigmas

log = logging.getLogger("megaflow")

LATENT_CHANNELS = 8
TEXT_DIM = 32
MAX_TOKENS = 8
#: File in the model folder that records how it was made.
RECORD_FILE = "megaflow_demo.json"


@dataclass
class PretrainSettings:
    """Sizes, steps and learning rates of both stages."""

    seed: int = 0
    clips: int = 768  #: training clips (rendered once, from the training prompts)
    vae_steps: int = 1000
    vae_batch: int = 8
    vae_frames: int = FRAMES  #: frames the VAE trains on (all, so late frames decode as well as early ones)
    vae_lr: float = 2e-3
    dit_steps: int = 5000
    dit_batch: int = 32
    dit_lr: float = 1e-3
    caption_dropout: float = 0.1  #: fraction of empty prompts (for classifier-free guidance)
    caption_noise: float = 0.5  #: probability that each attribute of a caption is replaced by a random value
    shift: float = 3.0  #: σ ~ shift(U(0, 1)), the same shift the recipe samples with


def build_tokenizer():
    """A word-level tokenizer over the world's vocabulary (T5-style pad/eos/unk = 0/1/2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "an", "moving", *COLORS, *SHAPES, *DIRECTIONS]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_TOKENS, padding_side="right")


def build_untrained(seed: int):
    """`(tokenizer, text_encoder, vae, transformer)` with seeded initial weights (fp32, CPU)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            tie_word_embeddings=False))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(
            base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True], latents_mean=[0.0] * LATENT_CHANNELS,
            latents_std=[1.0] * LATENT_CHANNELS, scale_factor_temporal=2, scale_factor_spatial=4)
        torch.manual_seed(seed + 2)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=256, num_layers=4,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return tokenizer, text_encoder.eval().requires_grad_(False), vae, transformer


def _lr_factor(step: int, total: int, warmup: float = 0.1) -> float:
    """VAE learning-rate multiplier: linear warm-up over `warmup`·total steps, then cosine decay to 0.02."""
    ramp = max(1, int(warmup * total))
    if step < ramp:
        return (step + 1) / ramp
    progress_frac = (step - ramp) / max(1, total - ramp)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac)))


def train_vae(vae: nn.Module, clips: torch.Tensor, s: PretrainSettings, show_progress: bool = True) -> float:
    """Fit the VAE to the first `vae_frames` frames of `clips [N, F, 3, H, W]`; returns the final
    reconstruction MSE."""
    clips = clips[:, :s.vae_frames]
    x_all = clips.permute(0, 2, 1, 3, 4) * 2 - 1  # [N, 3, F, H, W] in [-1, 1]
    weight_all = 1 + 4 * ((clips - clips[:, :, :, :1, :1]).abs().amax(2, keepdim=True) > 0.05).float()
    weight_all = weight_all.permute(0, 2, 1, 3, 4)
    g = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, s.vae_steps))
    vae.train()
    mse = float("nan")
    bar = progress(range(s.vae_steps), "pretrain vae", enabled=show_progress, unit="step")
    for _ in bar:
        idx = torch.randint(0, x_all.shape[0], (s.vae_batch,), generator=g)
        x, w = x_all[idx], weight_all[idx]
        z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z + 0.02 * torch.randn(z.shape, generator=g)).sample
        err = (recon - x).pow(2)
        loss = (w * err).mean() + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        mse = float(err.detach().mean()) / 4  # in [0, 1] pixel units
        bar.set_postfix(mse=f"{mse:.5f}")
    vae.eval()
    return mse


@torch.no_grad()
def encode_latents(vae: nn.Module, clips: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Clips `[N, F, 3, H, W]` in [0, 1] → VAE latent means `[N, C, F', H', W']` (unnormalised)."""
    x = clips.permute(0, 2, 1, 3, 4) * 2 - 1
    return torch.cat([vae.encode(x[i:i + batch]).latent_dist.mean for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def encode_text(tokenizer, text_encoder: nn.Module, prompts: list[str]) -> torch.Tensor:
    """Prompt embeddings `[B, MAX_TOKENS, TEXT_DIM]`, zero past each prompt's end (as `WanPipeline`)."""
    tok = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    hidden = text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    return hidden * tok.attention_mask[..., None]


class NoisyCaptions:
    """Caption ids with each attribute replaced by a random value with probability `p`.

    `prompts` is the list the ids index (the training split); a corrupted caption that falls
    outside it (a held-out combination) keeps the clip's own caption, so held-out prompts are
    never seen in training.
    """

    def __init__(self, prompts: list[str], p: float) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"caption_noise must be in [0, 1], got {p}")
        self.p = p
        names = (list(COLORS), list(SHAPES), list(DIRECTIONS))
        attrs = [parse_prompt(q) for q in prompts]
        self.codes = torch.tensor([[names[0].index(a.color), names[1].index(a.shape), names[2].index(a.direction)]
                                   for a in attrs])  # [P, 3]
        self.sizes = torch.tensor([len(n) for n in names])
        self.lookup = torch.full(tuple(self.sizes.tolist()), -1, dtype=torch.long)  # triple -> prompt id
        self.lookup[tuple(self.codes.T)] = torch.arange(len(prompts))

    def __call__(self, ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Prompt ids `[B]` → noisy prompt ids `[B]`."""
        codes = self.codes[ids]
        swap = torch.rand(codes.shape, generator=g) < self.p
        random = (torch.rand(codes.shape, generator=g) * self.sizes).long()
        noisy = self.lookup[tuple(torch.where(swap, random, codes).T)]
        return torch.where(noisy >= 0, noisy, ids)


def train_transformer(transformer: nn.Module, latents: torch.Tensor, caption_ids: torch.Tensor, table: torch.Tensor,
                      empty: torch.Tensor, captions: NoisyCaptions, s: PretrainSettings, show_progress: bool = True,
                      on_step: Callable[[int, nn.Module], None] | None = None) -> float:
    """Flow matching on normalised `latents [N, C, F, H, W]` captioned by `caption_ids [N]` into the
    prompt embeddings `table [P, L, D]`, made noisy by `captions`; `empty [1, L, D]` replaces a
    `caption_dropout` fraction. The learning rate is constant after a 50-step warm-up, so the
    model after k of n steps equals the model of a k-step run; `on_step(k, model)` is called after
    every step. Returns the final (smoothed) loss."""
    g = torch.Generator().manual_seed(s.seed + 10)
    opt = torch.optim.AdamW(transformer.parameters(), lr=s.dit_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50))
    transformer.train()
    smooth = float("nan")
    bar = progress(range(s.dit_steps), "pretrain transformer", enabled=show_progress, unit="step")
    for done in bar:
        idx = torch.randint(0, latents.shape[0], (s.dit_batch,), generator=g)
        x0 = latents[idx]
        cond = table[captions(caption_ids[idx], g)]
        drop = torch.rand(s.dit_batch, generator=g) < s.caption_dropout
        cond[drop] = empty
        sigma = shift_sigmas(torch.rand(s.dit_batch, generator=g), s.shift).view(-1, 1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - sigma) * x0 + sigma * noise
        v = transformer(hidden_states=xt, timestep=sigma.flatten() * 1000, encoder_hidden_states=cond,
                        return_dict=False)[0]
        loss = (v - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        smooth = value if smooth != smooth else 0.98 * smooth + 0.02 * value
        bar.set_postfix(loss=f"{smooth:.4f}")
        if on_step is not None:
            on_step(done + 1, transformer)
    transformer.eval()
    return smooth


def save_pipeline(output: str | Path, tokenizer, text_encoder: nn.Module, vae: nn.Module, transformer: nn.Module,
                  record: dict) -> Path:
    """Write a `WanPipeline` folder (safetensors + json + tokenizer) and the record of how it was made."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=record["settings"]["shift"]),
                       transformer=transformer.eval())
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(output, safe_serialization=True)
    (output / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return output


def pretrain(output: str | Path, settings: PretrainSettings | None = None, show_progress: bool = True) -> dict:
    """Run both stages and write a `WanPipeline` folder to `output`; returns the record it saves."""
    s = settings or PretrainSettings()
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    train_prompts, _ = split_prompts(0)
    clips, captions = sample_dataset(s.clips, s.seed, train_prompts)
    tokenizer, text_encoder, vae, transformer = build_untrained(s.seed)
    vae_mse = train_vae(vae, clips, s, show_progress)
    t_vae = time.perf_counter() - t0
    raw = encode_latents(vae, clips)
    latents = normalise_latents(vae, raw)
    table = encode_text(tokenizer, text_encoder, train_prompts)
    empty = encode_text(tokenizer, text_encoder, [""])
    caption_ids = torch.tensor([train_prompts.index(c) for c in captions])
    dit_loss = train_transformer(transformer, latents, caption_ids, table, empty,
                                 NoisyCaptions(train_prompts, s.caption_noise), s, show_progress)
    total = time.perf_counter() - t0
    record = {"settings": asdict(s), "vae_mse": vae_mse, "transformer_loss": dit_loss,
              "vae_seconds": round(t_vae, 1), "transformer_seconds": round(total - t_vae, 1),
              "total_seconds": round(total, 1),
              "video": {"frames": FRAMES, "height": HEIGHT, "width": WIDTH}}
    save_pipeline(output, tokenizer, text_encoder, vae, transformer, record)
    return record


def normalise_latents(vae: nn.Module, raw: torch.Tensor) -> torch.Tensor:
    """Store the per-channel mean / std of `raw [N, C, F, H, W]` in the VAE config (as Wan does) and
    return the normalised latents the transformer learns."""
    mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
