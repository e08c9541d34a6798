"""Wan 2.1 image-to-video through the real diffusers / transformers classes.

Everything of Wan 2.1 text-to-video (`WanAdapter`) plus the image: `WanImageToVideoPipeline`'s
CLIP-vision embeddings (`encoder_hidden_states_image`) and its latent condition, the first-frame
mask and the VAE latent of `[image, black frames]`, concatenated to the noisy latent along the
channels. Prompts are always 512 tokens: diffusers' Wan attention splits the image context off
the text at exactly 512 text tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModel

from megaflow.errors import ModelLoadError
from megaflow.models.base import TextConditioning
from megaflow.models.wan import WanAdapter
from megaflow.parallel.wan_sp import I2V_TEXT_TOKENS

#: `extra` key of the CLIP-vision image embeddings `[P, L_img, D_img]` (`encoder_hidden_states_image`).
IMAGE_EMBEDS = "image_embeds"
#: `extra` key of the latent condition `[P, t + C, F', h, w]`: first-frame mask, then the image latent.
IMAGE_CONDITION = "image_condition"


def image_processor_class(path: Path) -> type:
    """The class `DiffusionPipeline.from_pretrained` loads `image_processor` with (named in the
    folder's `model_index.json`), so preprocessing runs the pipeline's code; `CLIPImageProcessor`
    when the index does not say."""
    try:
        library, name = json.loads((path / "model_index.json").read_text())["image_processor"]
    except (OSError, ValueError, KeyError, TypeError):
        return CLIPImageProcessor
    return getattr(transformers, name, CLIPImageProcessor) if library == "transformers" else CLIPImageProcessor


def to_pil(image: torch.Tensor) -> Image.Image:
    """`[3, H, W]` in [0, 1] → an 8-bit RGB image (what a pipeline user passes)."""
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))


class WanI2VAdapter(WanAdapter):
    """Wan 2.1 image-to-video: `WanAdapter` plus `CLIPVisionModel` / CLIP image processor and the
    latent condition (transformer input = latent + mask + image latent channels)."""

    family: ClassVar[str] = "wan_i2v"
    pipeline_class: ClassVar[str] = "diffusers.WanImageToVideoPipeline"
    components: ClassVar[tuple[str, ...]] = WanAdapter.components + ("image_encoder", "image_processor")
    download_hint: ClassVar[str] = (
        "download the diffusers-format model, e.g. `huggingface-cli download "
        "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers --local-dir {path}`, or use model.path=tiny for the tiny test model")
    needs_image: ClassVar[bool] = True
    #: Wan's attention projections plus attn2's image key / value projections (`add_k_proj`,
    #: `add_v_proj`): the path through which the image steers every block.
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    #: The CLIP-vision embeddings depend on the image alone (a text cache holds them); the latent
    #: condition depends on the VAE and the video size, and is recomputed.
    cached_image_key: ClassVar[str | None] = IMAGE_EMBEDS

    def __init__(
        self, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, tokenizer: Any,
        image_encoder: CLIPVisionModel | None, image_processor: Any, *, device: torch.device, dtype: torch.dtype,
        max_sequence_length: int | None = None,
    ) -> None:
        super().__init__(transformer, vae, text_encoder, tokenizer, device=device, dtype=dtype,
                         max_sequence_length=max_sequence_length)
        if self.max_sequence_length != I2V_TEXT_TOKENS:
            raise ModelLoadError(
                f"Wan image-to-video needs prompts padded to exactly {I2V_TEXT_TOKENS} tokens (diffusers' "
                f"WanAttnProcessor takes the last {I2V_TEXT_TOKENS} context tokens as text and the rest as image), "
                f"but max_sequence_length is {self.max_sequence_length} (tokenizer model_max_length "
                f"{tokenizer.model_max_length}); use the model's own tokenizer, whose model_max_length is "
                f"{I2V_TEXT_TOKENS} or more")
        if transformer.config.image_dim is None:
            raise ModelLoadError("the transformer has no image_dim: it is a Wan text-to-video model; use "
                                 "model.family=wan, or a Wan 2.1 image-to-video folder for wan_i2v")
        #: None when loaded with `text_encoders=False` (the image embeddings come from a text cache).
        self.image_encoder = None if image_encoder is None else image_encoder.requires_grad_(False).eval()
        self.image_processor = image_processor

    @classmethod
    def encoder_loaders(cls, dtype: torch.dtype) -> dict[str, Callable[[Path], nn.Module]]:
        """UMT5 and the CLIP-vision image encoder."""
        return dict(super().encoder_loaders(dtype),
                    image_encoder=lambda p: CLIPVisionModel.from_pretrained(p, dtype=dtype))

    @classmethod
    def load_parts(cls, path: Path, *, dtype: torch.dtype, device: torch.device, transformer_dtype: torch.dtype | None,
                   transformer_loader: Callable[[type, Path, torch.dtype], nn.Module] | None,
                   text_encoders: bool = True) -> dict[str, Any]:
        """Wan's components plus `image_encoder` (None with `text_encoders=False`) and `image_processor`."""
        parts = super().load_parts(path, dtype=dtype, device=device, transformer_dtype=transformer_dtype,
                                   transformer_loader=transformer_loader, text_encoders=text_encoders)
        processor_cls = image_processor_class(path)
        processor = cls.load_component(path, "image_processor", processor_cls.from_pretrained)
        return dict(parts, image_processor=processor)

    @torch.no_grad()
    def image_embeds(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP-vision embeddings `[1, L_img, D_img]` (in `dtype`) of one image `[3, H, W]` in [0, 1]:
        the penultimate hidden states, as `WanImageToVideoPipeline.encode_image` takes them."""
        self.require_text_encoders()
        pixels = self.image_processor(images=to_pil(image), return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.image_encoder.dtype)
        out = self.image_encoder(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2].to(self.dtype)

    @torch.no_grad()
    def latent_condition(self, image: torch.Tensor, latent_shape: tuple[int, int, int, int]) -> torch.Tensor:
        """`float32 [1, t + C, F', h, w]` of one image `[3, H, W]` in [0, 1]: the first-frame mask
        (1 on latent frame 0 in all `t` = temporal-factor channels), then the normalised VAE mode
        of `[image, black × (frames − 1)]` (`WanImageToVideoPipeline.prepare_latents`)."""
        _, latent_frames, h, w = latent_shape
        t = self.vae_scale_factor_temporal
        frames = (latent_frames - 1) * t + 1
        first = (image.to(self.device, torch.float32) * 2 - 1)[None, :, None]
        video = torch.cat([first, first.new_zeros(1, 3, frames - 1, *first.shape[-2:])], dim=2)
        z = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode().float()
        mean, std = self._latent_stats(z)
        z = (z - mean) * (1.0 / std)
        mask = torch.zeros(1, t, latent_frames, h, w, device=z.device)
        mask[:, :, 0] = 1
        return torch.cat([mask, z], dim=1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """`image_embeds [P, L_img, D_img]` of images `[P, 3, H, W]` in [0, 1], each encoded on its own."""
        return torch.cat([self.image_embeds(image) for image in images])

    def image_conditioning(self, images: torch.Tensor, latent_shape: tuple[int, int, int, int],
                           cached: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The `extra` of conditioning images `[P, 3, H, W]` in [0, 1] for latents of `latent_shape`:
        `image_embeds [P, L_img, D_img]` and `image_condition [P, t + C, F', h, w]`, each image encoded
        on its own (as the pipeline does), so a prompt's conditioning never depends on the others.
        `cached`: the images' `image_embeds` from a text cache (the image encoder is then not run)."""
        s = self.vae_scale_factor_spatial
        size = (latent_shape[2] * s, latent_shape[3] * s)
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != size:
            raise ValueError(f"image_conditioning takes images [P, 3, {size[0]}, {size[1]}] (the video size of "
                             f"latent shape {tuple(latent_shape)}), got {tuple(images.shape)}")
        embeds = self.encode_images(images) if cached is None else cached.to(self.device)
        condition = torch.cat([self.latent_condition(image, latent_shape) for image in images])
        return {IMAGE_EMBEDS: embeds, IMAGE_CONDITION: condition}

    def transformer_inputs(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`hidden_states = cat([x, image_condition])` along the channels, and the image embeddings."""
        if set(extra) != {IMAGE_EMBEDS, IMAGE_CONDITION}:
            raise ValueError(f"Wan image-to-video takes extra {{{IMAGE_EMBEDS!r}, {IMAGE_CONDITION!r}}} (from "
                             f"image_conditioning), got {sorted(extra)}")
        condition = extra[IMAGE_CONDITION]
        if condition.shape[0] != x.shape[0] or condition.shape[2:] != x.shape[2:]:
            raise ValueError(f"the image condition {tuple(condition.shape)} does not fit the latents "
                             f"{tuple(x.shape)}: encode the images with the run's latent_shape")
        return {"hidden_states": torch.cat([x, condition.to(x.dtype)], dim=1),
                "encoder_hidden_states_image": extra[IMAGE_EMBEDS]}

    def forward_transformer(self, x: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                            extra: dict[str, torch.Tensor], guidance: torch.Tensor | None) -> torch.Tensor:
        """`WanAdapter.forward_transformer` with the image inputs; `x [B, C_out, F, H, W]` is the
        noisy latent alone, the text `[B, 512, D]` (`ValueError` for any other length)."""
        if text.embeds.shape[1] != I2V_TEXT_TOKENS:
            raise ValueError(f"Wan image-to-video needs text embeddings of exactly {I2V_TEXT_TOKENS} tokens "
                             f"(diffusers' WanAttnProcessor splits the context at {I2V_TEXT_TOKENS} text tokens); "
                             f"got {text.embeds.shape[1]}")
        return super().forward_transformer(x, timestep, text, extra, guidance)
