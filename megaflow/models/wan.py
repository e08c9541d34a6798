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
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from safetensors import SafetensorError
from torch import nn
from transformers import AutoTokenizer, UMT5EncoderModel

from megaflow.errors import ModelLoadError
from megaflow.models.base import ModelAdapter

try:
    import ftfy
except ImportError:
    ftfy = None

#: Subfolders a Wan text-to-video folder must have.
WAN_COMPONENTS: tuple[str, ...] = ("transformer", "vae", "text_encoder", "tokenizer")
#: Text sequence length Wan 2.1 was trained with (the cap on the tokenizer's `model_max_length`).
WAN_MAX_SEQUENCE_LENGTH = 512

_DOWNLOAD_HINT = (
    "download the diffusers-format model, e.g. `huggingface-cli download "
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir {path}`, or use model.path=tiny for the tiny test model"
)


def clean_prompt(text: str) -> str:
    """The prompt cleaning `WanPipeline` applies: ftfy (if installed), HTML unescape, whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def check_wan_folder(path: Path) -> None:
    """Raise `ModelLoadError` unless `path` is a folder with every Wan component subfolder."""
    if not path.is_dir():
        raise ModelLoadError(
            f"Wan model folder {path} does not exist or is not a directory: "
            f"{_DOWNLOAD_HINT.format(path=path)}"
        )
    missing = [name for name in WAN_COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"Wan model folder {path} is missing the component(s) {', '.join(missing)} "
            f"(expected {', '.join(str(path / m) + '/' for m in missing)}); a diffusers-format Wan "
            f"folder has {', '.join(WAN_COMPONENTS)} subfolders: {_DOWNLOAD_HINT.format(path=path)}"
        )


def _load_component(path: Path, name: str, load: Callable[[Path], Any]) -> Any:
    """`load(path / name)`, any failure re-raised as a `ModelLoadError` naming the component."""
    try:
        return load(path / name)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(
            f"cannot load the Wan {name} from {path / name}: {exc}. The folder may be incomplete: "
            f"{_DOWNLOAD_HINT.format(path=path)}"
        ) from exc


class WanAdapter(ModelAdapter):
    """Wan 2.1 text-to-video: `WanTransformer3DModel`, `AutoencoderKLWan`, UMT5 text encoder."""

    family: ClassVar[str] = "wan"

    def __init__(
        self, transformer: WanTransformer3DModel, vae: AutoencoderKLWan, text_encoder: UMT5EncoderModel,
        tokenizer: Any, *, device: torch.device, dtype: torch.dtype, max_sequence_length: int | None = None,
    ) -> None:
        super().__init__(transformer, device=device, dtype=dtype)
        self.vae = vae.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.transformer.requires_grad_(False).eval()
        if max_sequence_length is None:
            max_sequence_length = min(int(tokenizer.model_max_length), WAN_MAX_SEQUENCE_LENGTH)
        #: Prompts are padded / truncated to this many tokens (`WanPipeline`'s `max_sequence_length`).
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype, device: torch.device | str,
        transformer_dtype: torch.dtype | None = None,
        transformer_loader: Callable[[type, Path, torch.dtype], nn.Module] | None = None,
    ) -> "WanAdapter":
        """Load a local diffusers-format Wan folder; frozen parts in `dtype`, transformer in
        `transformer_dtype` (default `dtype`). `transformer_loader(cls, folder, dtype)` replaces
        `from_pretrained` for the transformer (ZeRO-3 builds it partitioned)."""
        path = Path(path).expanduser()
        check_wan_folder(path)
        device = torch.device(device)
        if transformer_loader is None:
            transformer = _load_component(path, "transformer", lambda p: WanTransformer3DModel.from_pretrained(
                p, torch_dtype=transformer_dtype or dtype))
        else:
            transformer = _load_component(path, "transformer", lambda p: transformer_loader(
                WanTransformer3DModel, p, transformer_dtype or dtype))
        vae = _load_component(path, "vae", lambda p: AutoencoderKLWan.from_pretrained(p, torch_dtype=dtype))
        text_encoder = _load_component(path, "text_encoder", lambda p: UMT5EncoderModel.from_pretrained(
            p, dtype=dtype))
        tokenizer = _load_component(path, "tokenizer", AutoTokenizer.from_pretrained)
        return cls(transformer.to(device), vae.to(device), text_encoder.to(device), tokenizer,
                   device=device, dtype=dtype)

    @property
    def vae_scale_factor_temporal(self) -> int:
        """Pixel frames per latent frame (after the first)."""
        return int(self.vae.config.scale_factor_temporal)

    @property
    def vae_scale_factor_spatial(self) -> int:
        """Pixels per latent row / column."""
        return int(self.vae.config.scale_factor_spatial)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """UMT5 embeddings `[B, max_sequence_length, D]` (in `dtype`), zero past each prompt's end."""
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
        return torch.where(keep[..., None], hidden, hidden.new_zeros(()))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, (frames−1)//t + 1, height//s, width//s)`; `ValueError` for sizes the model cannot take."""
        t, s = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        pt, ph, pw = (int(p) for p in self.transformer.config.patch_size)
        if frames < 1 or (frames - 1) % t:
            raise ValueError(f"Wan needs frames = 1 + {t}·k (frames − 1 divisible by the VAE's temporal "
                             f"factor {t}); got frames={frames}")
        if height % (s * ph) or width % (s * pw):
            raise ValueError(f"Wan needs height divisible by {s * ph} and width by {s * pw} (VAE factor {s} "
                             f"× patch {ph}×{pw}); got height={height}, width={width}")
        latent_frames = (frames - 1) // t + 1
        if latent_frames % pt:
            raise ValueError(f"Wan's temporal patch {pt} must divide the {latent_frames} latent frames "
                             f"of {frames} frames")
        return int(self.transformer.config.in_channels), latent_frames, height // s, width // s

    def forward_transformer(self, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                            extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """One transformer call: `x [B, C, F, H, W]`, `timestep [B]` (0..1000), `embeds [B, L, D]`
        → velocity `[B, C, F, H, W]`, or under sequence parallelism this rank's real tokens
        `[B, L_r, pt·ph·pw·C]` (see `megaflow.parallel.wan_sp`)."""
        if extra:
            raise ValueError(f"Wan text-to-video takes no extra conditioning, got {sorted(extra)}")
        dtype = self.transformer_dtype
        out = self.transformer_call(
            hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype),
            return_dict=False,
        )[0]
        return out if self.sequence_parallel is None else self.sequence_parallel.valid(out, x)

    def enable_sequence_parallel(self, group: Any) -> None:
        """Ulysses over `group`: video tokens sharded, self-attention by all-to-all, text replicated."""
        from megaflow.parallel.wan_sp import WanSequenceParallel

        self.sequence_parallel = WanSequenceParallel(self.transformer, group)
        if self._reference is not None:
            WanSequenceParallel(self._reference, group)

    @staticmethod
    def attention_heads(path: str | Path) -> int:
        """Self-attention heads of the transformer in a Wan folder, read from its config (no model built)."""
        import json

        config = Path(path) / "transformer" / "config.json"
        try:
            return int(json.loads(config.read_text())["num_attention_heads"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read num_attention_heads from {config}: {exc}; "
                                 f"{_DOWNLOAD_HINT.format(path=path)}") from exc

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, C, F, H, W]` → `float32 [B, F', 3, H', W']` in [0, 1] (WanPipeline's decode)."""
        vae = self.vae
        z = latents.to(self.device, vae.dtype)
        shape = (1, int(vae.config.z_dim), 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]
        return (video.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    @property
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """`WanTransformerBlock`: the unit of activation checkpointing and ZeRO-3 leaf modules."""
        return (WanTransformerBlock,)

    def save_lora(self, directory: Path) -> None:
        """`pytorch_lora_weights.safetensors` for `WanPipeline.load_lora_weights(directory)`."""
        from peft import get_peft_model_state_dict

        WanPipeline.save_lora_weights(
            directory, transformer_lora_layers=get_peft_model_state_dict(self.transformer),
            safe_serialization=True, transformer_lora_adapter_metadata=self.lora_config.to_dict(),
        )
