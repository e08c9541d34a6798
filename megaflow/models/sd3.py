"""Stable Diffusion 3.5 (Medium) text-to-image through the real diffusers / transformers classes.

Loads a local diffusers-format folder (the layout `StableDiffusion3Pipeline.save_pretrained`
writes) and reproduces `StableDiffusion3Pipeline`'s conventions exactly: the penultimate hidden
states of CLIP-L and CLIP-G concatenated on features, zero-padded to T5's width and followed by
T5's hidden states along the sequence (no mask); the two CLIP text projections concatenated as
the pooled vector; true classifier-free guidance with the negative prompt as its own branch; the
timestep 1000·σ; `latents / scaling_factor + shift_factor` before the VAE. An image is a video of
one frame: latents `[B, 16, 1, H/8, W/8]`, images `[B, 1, 3, H, W]`.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from torch import nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from megaflow.models.base import ModelAdapter, TextConditioning
from megaflow.models.flux import TransformerLoader, decode_image_latents, image_latent_grid, load_transformer

#: T5 tokens per prompt: Flow-GRPO's length for SD3.5-M (the pipeline's default is 256).
SD3_MAX_SEQUENCE_LENGTH = 128


class SD3Adapter(ModelAdapter):
    """SD3.5-Medium: `SD3Transformer2DModel` (MMDiT-X, `dual_attention_layers`), `AutoencoderKL`,
    CLIP-L + CLIP-G + T5-XXL.

    LoRA targets (Flow-GRPO's SD3.5 recipe, also diffusers' SD3 DreamBooth default): the joint
    attention's projections of both streams (`attn.to_q/k/v`, `attn.to_out.0`, `attn.add_q/k/v_proj`,
    `attn.to_add_out`), no feed-forward. peft matches by suffix, so SD3.5's image-only second
    attention (`attn2.*`, in the dual-attention blocks) is left out, as Flow-GRPO does; add
    `attn2.to_q` etc. to model.lora_targets to adapt it too.
    """

    family: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[str] = "diffusers.StableDiffusion3Pipeline"
    components: ClassVar[tuple[str, ...]] = (
        "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
        "tokenizer_3")
    download_hint: ClassVar[str] = (
        "download the diffusers-format model (gated: accept the license on its model page first), e.g. "
        "`huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir {path}`, or use "
        "model.path=tiny for the tiny test model")
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )

    def __init__(
        self, transformer: SD3Transformer2DModel, vae: AutoencoderKL, text_encoder: CLIPTextModelWithProjection,
        tokenizer: Any, text_encoder_2: CLIPTextModelWithProjection, tokenizer_2: Any, text_encoder_3: T5EncoderModel,
        tokenizer_3: Any, *, device: torch.device, dtype: torch.dtype, max_sequence_length: int | None = None,
    ) -> None:
        super().__init__(transformer, device=device, dtype=dtype)
        self.transformer.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        #: CLIP-L, CLIP-G and T5; None when loaded with `text_encoders=False` (prompts from a text cache).
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = (
            None if e is None else e.requires_grad_(False).eval() for e in (text_encoder, text_encoder_2, text_encoder_3))
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        if max_sequence_length is None:
            max_sequence_length = min(int(tokenizer_3.model_max_length), SD3_MAX_SEQUENCE_LENGTH)
        #: T5 tokens per prompt (the pipeline's `max_sequence_length`); the text is 77 CLIP + this many tokens.
        self.max_sequence_length = max_sequence_length

    @classmethod
    def encoder_loaders(cls, dtype: torch.dtype) -> dict[str, Any]:
        """CLIP-L, CLIP-G and T5."""
        clip = partial(CLIPTextModelWithProjection.from_pretrained, dtype=dtype)
        return {"text_encoder": clip, "text_encoder_2": clip,
                "text_encoder_3": partial(T5EncoderModel.from_pretrained, dtype=dtype)}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype, device: torch.device | str,
        transformer_dtype: torch.dtype | None = None, transformer_loader: TransformerLoader | None = None,
        text_encoders: bool = True,
    ) -> "SD3Adapter":
        """Load a local diffusers-format SD3 folder; frozen parts in `dtype`, transformer in
        `transformer_dtype` (default `dtype`), built by `transformer_loader` if given (ZeRO-3).
        `text_encoders=False` never reads the text encoders' weights (a text cache gives the prompts)."""
        path, device = Path(path).expanduser(), torch.device(device)
        cls.check_folder(path)
        transformer = load_transformer(cls, path, SD3Transformer2DModel, transformer_dtype or dtype, transformer_loader)
        vae = cls.load_component(path, "vae", partial(AutoencoderKL.from_pretrained, torch_dtype=dtype))
        encoders = cls.load_encoders(path, dtype, device) if text_encoders else dict.fromkeys(cls.encoder_loaders(dtype))
        tokenizers = {name: cls.load_component(path, name, AutoTokenizer.from_pretrained)
                      for name in ("tokenizer", "tokenizer_2", "tokenizer_3")}
        adapter = cls(transformer.to(device), vae.to(device), **encoders, **tokenizers, device=device, dtype=dtype)
        adapter.model_path = path
        return adapter

    def _clip(self, encoder: CLIPTextModelWithProjection, tokenizer: Any,
              prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A CLIP encoder's penultimate hidden states `[B, 77, D]` (in the first CLIP's dtype, as the
        pipeline casts them) and its projected pooled output `[B, P]`."""
        ids = tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoder.dtype), out[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> TextConditioning:
        """Text `[B, 77 + max_sequence_length, D_t5]` (CLIP-L ‖ CLIP-G zero-padded to T5's width, then
        T5), no mask, and pooled `[B, P_l + P_g]`, as `StableDiffusion3Pipeline.encode_prompt`."""
        self.require_text_encoders()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        hidden_l, pooled_l = self._clip(self.text_encoder, self.tokenizer, prompts)
        hidden_g, pooled_g = self._clip(self.text_encoder_2, self.tokenizer_2, prompts)
        t5_ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        t5 = self.text_encoder_3(t5_ids.to(self.device))[0].to(self.text_encoder_3.dtype)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextConditioning(torch.cat([clip, t5], dim=-2), None, torch.cat([pooled_l, pooled_g], dim=-1))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, 1, height/8, width/8)` with C the transformer's `out_channels`; `ValueError` unless
        frames is 1, both sides divide by 16 (VAE × patch 2) and the patch grid fits `pos_embed_max_size`."""
        config = self.transformer.config
        patch = int(config.patch_size)
        h, w = image_latent_grid(self.family, self.vae, frames, height, width, multiple=patch)
        limit = config.pos_embed_max_size
        if limit is not None and max(h, w) // patch > limit:
            raise ValueError(f"SD3's positional table covers {limit}×{limit} patches ({limit * patch * height // h} "
                             f"pixels a side); got height={height}, width={width}")
        return int(config.out_channels), 1, h, w

    def forward_transformer(self, x: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                            extra: dict[str, torch.Tensor], guidance: torch.Tensor | None) -> torch.Tensor:
        """One transformer call: `x [B, C, 1, H, W]`, `timestep [B]` (0..1000), text and pooled →
        velocity `[B, C, 1, H, W]`, or under sequence parallelism this rank's real tokens
        `[B, L_r, p·p·C]`. SD3 takes no embedded guidance."""
        if extra:
            raise ValueError(f"SD3 text-to-image takes no extra conditioning, got {sorted(extra)}")
        if guidance is not None:
            raise ValueError("SD3 has no embedded guidance; leave sampling.embedded_guidance unset and use "
                             "sampling.guidance_scale (true CFG)")
        if text.pooled is None:
            raise ValueError("SD3 needs the pooled CLIP vector (TextConditioning.pooled); use encode_prompts")
        if x.shape[2] != 1:
            raise ValueError(f"SD3 latents have one frame; got shape {tuple(x.shape)}")
        dtype = self.transformer_dtype
        out = self.transformer_call(
            hidden_states=x[:, :, 0].to(dtype), timestep=timestep, encoder_hidden_states=text.embeds.to(dtype),
            pooled_projections=text.pooled.to(dtype), return_dict=False,
        )[0]
        return out.unsqueeze(2) if self.sequence_parallel is None else self.sequence_parallel.valid(out, x)

    def enable_sequence_parallel(self, group: Any) -> None:
        """Ulysses over `group`: image and text tokens sharded, joint (and dual) attention by all-to-all."""
        from megaflow.parallel.joint_sp import SD3SequenceParallel

        self.sequence_parallel = SD3SequenceParallel(self.transformer, group)
        if self._reference is not None:
            SD3SequenceParallel(self._reference, group)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, C, 1, H, W]` → images `[B, 1, 3, 8H, 8W]` in [0, 1] in the VAE's dtype (the pipeline's decode)."""
        return decode_image_latents(self.vae, latents, self.device)

    @property
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """`JointTransformerBlock`: the unit of activation checkpointing and ZeRO-3 leaf modules."""
        return (JointTransformerBlock,)
