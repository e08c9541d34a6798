"""FLUX.1 (dev) text-to-image through the real diffusers / transformers classes.

Loads a local diffusers-format folder (the layout `FluxPipeline.save_pretrained` writes) and
reproduces `FluxPipeline`'s conventions exactly: T5 hidden states (every token, padding included,
no mask) as the text sequence and CLIP's `pooler_output` as the pooled vector, latents packed 2×2
into tokens with 2-D `img_ids` / zero `txt_ids`, the timestep passed as σ ∈ [0, 1] and the
embedded guidance scale passed raw (the transformer multiplies both by 1000), and
`latents / scaling_factor + shift_factor` before the VAE. An image is a video of one frame:
latents `[B, 16, 1, H/8, W/8]`, images `[B, 1, 3, H, W]`.

The helpers shared with SD3 (`load_transformer`, `image_latent_grid`, `decode_image_latents`)
live here as well.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from megaflow.models.base import ModelAdapter, TextConditioning

#: `FluxPipeline`'s `max_sequence_length` (also its upper limit): T5 tokens per prompt.
FLUX_MAX_SEQUENCE_LENGTH = 512

TransformerLoader = Callable[[type, Path, torch.dtype], nn.Module]


def load_transformer(adapter_cls: type[ModelAdapter], path: Path, model_cls: type, dtype: torch.dtype,
                     loader: TransformerLoader | None) -> nn.Module:
    """`model_cls` from `path/transformer` in `dtype`, by `from_pretrained` or `loader(model_cls,
    folder, dtype)` (ZeRO-3 builds it partitioned); failures name the component."""
    if loader is None:
        return adapter_cls.load_component(path, "transformer",
                                          lambda p: model_cls.from_pretrained(p, torch_dtype=dtype))
    return adapter_cls.load_component(path, "transformer", lambda p: loader(model_cls, p, dtype))


def image_latent_grid(family: str, vae: AutoencoderKL, frames: int, height: int, width: int,
                      multiple: int) -> tuple[int, int]:
    """The latent `(H, W)` of a `height × width` image: `ValueError` unless `frames == 1` and both
    sides divide by the VAE factor × `multiple` (the transformer's patch or packing)."""
    s = 2 ** (len(vae.config.block_out_channels) - 1)
    if frames != 1:
        raise ValueError(f"{family} generates images: set video.frames=1 (an image is a video of one frame); "
                         f"got frames={frames}")
    if height % (s * multiple) or width % (s * multiple):
        raise ValueError(f"{family} needs height and width divisible by {s * multiple} (VAE factor {s} × patch "
                         f"{multiple}); got height={height}, width={width}")
    return height // s, width // s


@torch.no_grad()
def decode_image_latents(vae: AutoencoderKL, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Latents `[B, C, 1, H, W]` → images `[B, 1, 3, H', W']` in [0, 1] in the VAE's dtype: the FLUX / SD3
    pipelines' `vae.decode(latents / scaling_factor + shift_factor)` and `postprocess(output_type="pt")`."""
    if latents.ndim != 5 or latents.shape[2] != 1:
        raise ValueError(f"image latents must be [B, C, 1, H, W]; got shape {tuple(latents.shape)}")
    z = latents[:, :, 0].to(device, vae.dtype)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(z, return_dict=False)[0]
    return (image * 0.5 + 0.5).clamp(0, 1).unsqueeze(1)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, 1, H, W]` → tokens `[B, (H/2)(W/2), 4C]`, channels `(C, 2, 2)` (`FluxPipeline._pack_latents`)."""
    b, c, f, h, w = latents.shape
    if f != 1:
        raise ValueError(f"FLUX latents have one frame; got shape {tuple(latents.shape)}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tokens `[B, (H/2)(W/2), 4C]` → latents shaped like `like` `[B, C, 1, H, W]` (the inverse of `pack_latents`)."""
    b, c, _, h, w = like.shape
    x = tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(like.shape)


def latent_image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Position ids `[(H/2)(W/2), 3]` = `(0, row, column)` of the packed tokens of an `H × W` latent
    (`FluxPipeline._prepare_latent_image_ids`; float32, exact integers)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=torch.float32)


def flux_shift(height: int, width: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
               max_shift: float = 1.15) -> float:
    """The `sampling.shift` equal to FLUX's resolution-dependent (dynamic) shift for a `height × width`
    image: `exp(mu)` with `mu` linear in the packed token count (`FluxPipeline`'s `calculate_shift`;
    the defaults are FLUX.1-dev's scheduler config). 512² → 1.88, 1024² → 3.16."""
    tokens = (height // 16) * (width // 16)
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (tokens - base_seq_len))


class FluxAdapter(ModelAdapter):
    """FLUX.1-dev: `FluxTransformer2DModel` (guidance-distilled), `AutoencoderKL`, CLIP-L + T5-XXL.

    LoRA targets (Flow-GRPO's FLUX recipe, also diffusers' FLUX DreamBooth default): every
    attention projection of both streams (`attn.to_q/k/v`, `attn.to_out.0`, `attn.add_q/k/v_proj`,
    `attn.to_add_out`) and the feed-forward layers of the dual-stream blocks (`ff.*`, `ff_context.*`).
    peft matches by suffix, so `attn.to_q/k/v` also adapts the single-stream blocks' q/k/v; those
    blocks have no `to_out` (their `proj_out` mixes attention and MLP and shares its suffix with the
    model's final `proj_out`, so it is left out, as is `proj_mlp`).
    """

    family: ClassVar[str] = "flux"
    pipeline_class: ClassVar[str] = "diffusers.FluxPipeline"
    components: ClassVar[tuple[str, ...]] = (
        "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    download_hint: ClassVar[str] = (
        "download the diffusers-format model (gated: accept the license on its model page first), e.g. "
        "`huggingface-cli download black-forest-labs/FLUX.1-dev --local-dir {path}`, or use model.path=tiny for "
        "the tiny test model")
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )
    timestep_scale: ClassVar[float] = 1.0
    default_embedded_guidance: ClassVar[float | None] = 3.5

    def __init__(
        self, transformer: FluxTransformer2DModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: Any,
        text_encoder_2: T5EncoderModel, tokenizer_2: Any, *, device: torch.device, dtype: torch.dtype,
        max_sequence_length: int | None = None,
    ) -> None:
        super().__init__(transformer, device=device, dtype=dtype)
        self.transformer.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        #: CLIP-L and T5; None when loaded with `text_encoders=False` (prompts from a text cache).
        self.text_encoder = None if text_encoder is None else text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.requires_grad_(False).eval()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        if max_sequence_length is None:
            max_sequence_length = min(int(tokenizer_2.model_max_length), FLUX_MAX_SEQUENCE_LENGTH)
        #: T5 tokens per prompt (`FluxPipeline`'s `max_sequence_length`).
        self.max_sequence_length = max_sequence_length

    @classmethod
    def encoder_loaders(cls, dtype: torch.dtype) -> dict[str, Callable[[Path], nn.Module]]:
        """CLIP-L and T5."""
        return {"text_encoder": lambda p: CLIPTextModel.from_pretrained(p, dtype=dtype),
                "text_encoder_2": lambda p: T5EncoderModel.from_pretrained(p, dtype=dtype)}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype, device: torch.device | str,
        transformer_dtype: torch.dtype | None = None, transformer_loader: TransformerLoader | None = None,
        text_encoders: bool = True,
    ) -> "FluxAdapter":
        """Load a local diffusers-format FLUX folder; frozen parts in `dtype`, transformer in
        `transformer_dtype` (default `dtype`), built by `transformer_loader` if given (ZeRO-3).
        `text_encoders=False` never reads the text encoders' weights (a text cache gives the prompts)."""
        path, device = Path(path).expanduser(), torch.device(device)
        cls.check_folder(path)
        transformer = load_transformer(cls, path, FluxTransformer2DModel, transformer_dtype or dtype,
                                       transformer_loader)
        vae = cls.load_component(path, "vae", lambda p: AutoencoderKL.from_pretrained(p, torch_dtype=dtype))
        encoders = cls.load_encoders(path, dtype, device) if text_encoders else dict.fromkeys(cls.encoder_loaders(dtype))
        tokenizer = cls.load_component(path, "tokenizer", AutoTokenizer.from_pretrained)
        tokenizer_2 = cls.load_component(path, "tokenizer_2", AutoTokenizer.from_pretrained)
        adapter = cls(transformer.to(device), vae.to(device), encoders["text_encoder"], tokenizer,
                      encoders["text_encoder_2"], tokenizer_2, device=device, dtype=dtype)
        adapter.model_path = path
        return adapter

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> TextConditioning:
        """T5 hidden states `[B, max_sequence_length, D]` (no mask: FLUX attends to every token,
        padding included) and CLIP's pooled output `[B, P]`, as `FluxPipeline.encode_prompt`."""
        self.require_text_encoders()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        return TextConditioning(embeds.to(self.text_encoder_2.dtype), None, pooled.to(self.text_encoder.dtype))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, 1, height/8, width/8)` with C the unpacked latent channels (`in_channels / 4`);
        `ValueError` unless frames is 1 and both sides divide by 16 (VAE × 2×2 packing)."""
        h, w = image_latent_grid(self.family, self.vae, frames, height, width, multiple=2)
        config = self.transformer.config
        return int(config.out_channels or config.in_channels) // 4, 1, h, w

    def forward_transformer(self, x: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                            extra: dict[str, torch.Tensor], guidance: torch.Tensor | None) -> torch.Tensor:
        """One transformer call: `x [B, C, 1, H, W]` packed to `[B, (H/2)(W/2), 4C]`, `timestep [B]`
        = σ, `guidance [B]` raw (e.g. 3.5) → velocity `[B, C, 1, H, W]`, or under sequence
        parallelism this rank's real packed tokens `[B, L_r, 4C]`."""
        if extra:
            raise ValueError(f"FLUX text-to-image takes no extra conditioning, got {sorted(extra)}")
        if text.pooled is None:
            raise ValueError("FLUX needs the pooled CLIP vector (TextConditioning.pooled); use encode_prompts")
        embedded = bool(self.transformer.config.guidance_embeds)
        if embedded and guidance is None:
            raise ValueError("this FLUX transformer is guidance-distilled (guidance_embeds=True) and needs "
                             "sampling.embedded_guidance (null uses the FLUX default 3.5)")
        if not embedded and guidance is not None:
            raise ValueError("this FLUX transformer has no guidance embedding (guidance_embeds=False, e.g. "
                             "FLUX.1-schnell), but the flux family passes the embedded guidance scale of "
                             "guidance-distilled FLUX.1-dev; use a FLUX.1-dev folder")
        dtype = self.transformer_dtype
        _, _, _, h, w = x.shape
        txt_ids = torch.zeros(text.embeds.shape[1], 3, device=x.device)
        out = self.transformer_call(
            hidden_states=pack_latents(x.to(dtype)), encoder_hidden_states=text.embeds.to(dtype),
            pooled_projections=text.pooled.to(dtype), timestep=timestep, guidance=guidance,
            img_ids=latent_image_ids(h, w, x.device), txt_ids=txt_ids, return_dict=False,
        )[0]
        return unpack_latents(out, x) if self.sequence_parallel is None else self.sequence_parallel.valid(out, x)

    def enable_sequence_parallel(self, group: Any) -> None:
        """Ulysses over `group`: packed image tokens and text tokens sharded, joint attention by all-to-all."""
        from megaflow.parallel.joint_sp import FluxSequenceParallel

        self.sequence_parallel = FluxSequenceParallel(self.transformer, group)
        if self._reference is not None:
            FluxSequenceParallel(self._reference, group)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, C, 1, H, W]` → images `[B, 1, 3, 8H, 8W]` in [0, 1] in the VAE's dtype (FluxPipeline's decode)."""
        return decode_image_latents(self.vae, latents, self.device)

    @property
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """Dual- and single-stream blocks: the units of activation checkpointing and ZeRO-3 leaf modules."""
        return (FluxTransformerBlock, FluxSingleTransformerBlock)
