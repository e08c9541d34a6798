"""Wan 2.1 text-to-video through the real diffusers / transformers classes.

Loads a local diffusers-format folder (the layout `WanPipeline.save_pretrained` writes) and
reproduces `WanPipeline`'s conventions exactly: UMT5 prompt embeddings zeroed past each
prompt's length, the latent normalisation with the VAE's `latents_mean` / `latents_std`, and
LoRA weights in the layout `WanPipeline.load_lora_weights` reads.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import regex
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn
from transformers import AutoTokenizer, UMT5EncoderModel

from megaflow.models.base import ModelAdapter, TextConditioning, video_latent_shape
from megaflow.models.vae import decode_video

try:
    import ftfy
except ImportError:
    ftfy = None

#: Text sequence length Wan 2.1 was trained with (the cap on the tokenizer's `model_max_length`).
WAN_MAX_SEQUENCE_LENGTH = 512


def clean_prompt(text: str) -> str:
    """The prompt cleaning `WanPipeline` applies: ftfy (if installed), HTML unescape, whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


class WanAdapter(ModelAdapter):
    """Wan 2.1 text-to-video: `WanTransformer3DModel`, `AutoencoderKLWan`, UMT5 text encoder."""

    family: ClassVar[str] = "wan"
    pipeline_class: ClassVar[str] = "diffusers.WanPipeline"
    components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "text_encoder", "tokenizer")
    download_hint: ClassVar[str] = (
        "download the diffusers-format model, e.g. `huggingface-cli download "
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir {path}`, or use model.path=tiny for the tiny test model")

    def __init__(
        self, transformer: WanTransformer3DModel, vae: AutoencoderKLWan, text_encoder: UMT5EncoderModel | None,
        tokenizer: Any, *, device: torch.device, dtype: torch.dtype, max_sequence_length: int | None = None,
    ) -> None:
        super().__init__(transformer, device=device, dtype=dtype)
        self.vae = vae.requires_grad_(False).eval()
        #: None when loaded with `text_encoders=False` (prompts come from a text cache).
        self.text_encoder = None if text_encoder is None else text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.transformer.requires_grad_(False).eval()
        if max_sequence_length is None:
            max_sequence_length = min(int(tokenizer.model_max_length), WAN_MAX_SEQUENCE_LENGTH)
        #: Prompts are padded / truncated to this many tokens (`WanPipeline`'s `max_sequence_length`).
        self.max_sequence_length = max_sequence_length

    @classmethod
    def encoder_loaders(cls, dtype: torch.dtype) -> dict[str, Callable[[Path], nn.Module]]:
        """The UMT5 text encoder."""
        return {"text_encoder": lambda p: UMT5EncoderModel.from_pretrained(p, dtype=dtype)}

    def text_settings(self) -> dict[str, Any]:
        """The prompt length and the prompt cleaning (ftfy's version when installed: it changes the text)."""
        return {"max_sequence_length": self.max_sequence_length,
                "ftfy": None if ftfy is None else getattr(ftfy, "__version__", "unknown")}

    @classmethod
    def load_parts(cls, path: Path, *, dtype: torch.dtype, device: torch.device, transformer_dtype: torch.dtype | None,
                   transformer_loader: Callable[[type, Path, torch.dtype], nn.Module] | None,
                   text_encoders: bool = True) -> dict[str, Any]:
        """The components every Wan folder has, loaded (see `from_pretrained`); the prompt encoders
        (`encoder_loaders`) None with `text_encoders=False`."""
        cls.check_folder(path)
        if transformer_loader is None:
            transformer = cls.load_component(path, "transformer", lambda p: WanTransformer3DModel.from_pretrained(
                p, torch_dtype=transformer_dtype or dtype))
        else:
            transformer = cls.load_component(path, "transformer", lambda p: transformer_loader(
                WanTransformer3DModel, p, transformer_dtype or dtype))
        vae = cls.load_component(path, "vae", lambda p: AutoencoderKLWan.from_pretrained(p, torch_dtype=dtype))
        encoders = (cls.load_encoders(path, dtype, device) if text_encoders
                    else dict.fromkeys(cls.encoder_loaders(dtype)))
        tokenizer = cls.load_component(path, "tokenizer", AutoTokenizer.from_pretrained)
        return dict(transformer=transformer.to(device), vae=vae.to(device), tokenizer=tokenizer, **encoders)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype, device: torch.device | str,
        transformer_dtype: torch.dtype | None = None,
        transformer_loader: Callable[[type, Path, torch.dtype], nn.Module] | None = None, text_encoders: bool = True,
    ) -> "WanAdapter":
        """Load a local diffusers-format Wan folder; frozen parts in `dtype`, transformer in
        `transformer_dtype` (default `dtype`). `transformer_loader(cls, folder, dtype)` replaces
        `from_pretrained` for the transformer (ZeRO-3 builds it partitioned). `text_encoders=False`
        never reads the prompt encoders' weights (a text cache gives the prompt embeddings)."""
        device, path = torch.device(device), Path(path).expanduser()
        parts = cls.load_parts(path, dtype=dtype, device=device, transformer_dtype=transformer_dtype,
                               transformer_loader=transformer_loader, text_encoders=text_encoders)
        adapter = cls(**parts, device=device, dtype=dtype)
        adapter.model_path = path
        return adapter

    @property
    def vae_scale_factor_temporal(self) -> int:
        """Pixel frames per latent frame (after the first)."""
        return int(self.vae.config.scale_factor_temporal)

    @property
    def vae_scale_factor_spatial(self) -> int:
        """Pixels per latent row / column."""
        return int(self.vae.config.scale_factor_spatial)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> TextConditioning:
        """UMT5 embeddings `[B, max_sequence_length, D]` (in `dtype`), zero past each prompt's end
        (Wan attends to every text token, so no mask is passed on)."""
        self.require_text_encoders()
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.max_sequence_length
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", max_length=length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        seq_lens = mask.gt(0).sum(dim=1)
        ids = tokens.input_ids.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.to(self.dtype)
        keep = torch.arange(length, device=hidden.device)[None, :] < seq_lens[:, None]
        return TextConditioning(torch.where(keep[..., None], hidden, hidden.new_zeros(())))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, (frames−1)//t + 1, height//s, width//s)` with C the denoised latent's channels
        (`out_channels`); `ValueError` for sizes the model cannot take."""
        config = self.transformer.config
        return video_latent_shape("Wan", frames, height, width, temporal=self.vae_scale_factor_temporal,
                                  spatial=self.vae_scale_factor_spatial, patch=tuple(int(p) for p in config.patch_size),
                                  channels=int(config.out_channels or config.in_channels))

    def transformer_inputs(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The transformer's input tensors besides text and timestep (T2V: the latents alone)."""
        if extra:
            raise ValueError(f"Wan text-to-video takes no extra conditioning, got {sorted(extra)}")
        return {"hidden_states": x}

    def forward_transformer(self, x: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                            extra: dict[str, torch.Tensor], guidance: torch.Tensor | None) -> torch.Tensor:
        """One transformer call: `x [B, C, F, H, W]`, `timestep [B]` (0..1000), `text.embeds [B, L, D]`
        → velocity `[B, C, F, H, W]`, or under sequence parallelism this rank's real tokens
        `[B, L_r, pt·ph·pw·C]` (see `megaflow.parallel.wan_sp`). Wan takes no embedded guidance."""
        if guidance is not None:
            raise ValueError("Wan has no embedded guidance; leave sampling.embedded_guidance unset")
        dtype = self.transformer_dtype
        inputs = {k: t.to(dtype) for k, t in self.transformer_inputs(x, extra).items()}
        out = self.transformer_call(timestep=timestep, encoder_hidden_states=text.embeds.to(dtype), return_dict=False,
                                    **inputs)[0]
        return out if self.sequence_parallel is None else self.sequence_parallel.valid(out, x)

    def enable_sequence_parallel(self, group: Any) -> None:
        """Ulysses over `group`: video tokens sharded, self-attention by all-to-all, text replicated."""
        from megaflow.parallel.wan_sp import WanSequenceParallel

        self.sequence_parallel = WanSequenceParallel(self.transformer, group)
        if self._reference is not None:
            WanSequenceParallel(self._reference, group)

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, int(self.vae.config.z_dim), 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(z.device, z.dtype)
        return mean, std

    #: `model.vae_tiling` (`megaflow.models.vae`): `auto` tiles latents larger than the VAE's tile.
    vae_tiling: str = "auto"
    #: `model.vae_slicing`: decode one sample at a time (videos independent of the batch).
    vae_slicing: bool = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, C, F, H, W]` → `[B, F', 3, H', W']` in [0, 1] in the VAE's dtype (WanPipeline's decode),
        tiled per `vae_tiling`, one sample at a time per `vae_slicing` (`megaflow.models.vae`)."""
        vae = self.vae
        z = latents.to(self.device, vae.dtype)
        mean, std = self._latent_stats(z)
        video = decode_video(vae, z / (1.0 / std) + mean, self.vae_tiling, self.vae_slicing)
        return (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    @property
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """`WanTransformerBlock`: the unit of activation checkpointing and ZeRO-3 leaf modules."""
        return (WanTransformerBlock,)
