"""The model adapter protocol: everything family-specific behind one small interface.

A family (Wan, HunyuanVideo, ...) subclasses `ModelAdapter` and implements loading, prompt
encoding, one transformer evaluation with classifier-free guidance, and VAE decoding. The
training plumbing shared by all families (LoRA via peft, full fine-tuning, the KL reference
network, saving trainable weights) lives here.
"""
from __future__ import annotations

import abc
import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from megaflow.models.streaming import Gather, load_model_streaming, no_gather, save_model_streaming

#: File name diffusers' `save_lora_weights` / `load_lora_weights` use for LoRA adapters.
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def diffusers_param_dtype(model_cls: type, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype `model_cls.from_pretrained(torch_dtype=dtype)` gives parameter `name`: float32
    for diffusers' `_keep_in_fp32_modules` (norms, time embedders, scale-shift tables), else
    `dtype`."""
    keep = getattr(model_cls, "_keep_in_fp32_modules", None) or []
    keep = [keep] if isinstance(keep, str) else keep
    return torch.float32 if any(k in name.split(".") for k in keep) else dtype


def meta_build(model_cls: type, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """`model_cls` from `config` with its parameters on the meta device (no memory) and its
    construction-time buffers (rotary tables) built for real under default dtype `dtype`, as
    `from_pretrained(torch_dtype=dtype)` computes them."""
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights(include_buffers=False):
            return model_cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)


def video_latent_shape(name: str, frames: int, height: int, width: int, *, temporal: int, spatial: int,
                       patch: tuple[int, int, int], channels: int) -> tuple[int, int, int, int]:
    """`(channels, (frames−1)//temporal + 1, height//spatial, width//spatial)`: the latent of a
    video VAE (first frame alone, then `temporal` frames per latent frame) that a transformer
    patchifies by `patch = (pt, ph, pw)`; `ValueError` naming the model for sizes it cannot take."""
    pt, ph, pw = patch
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"{name} needs frames = 1 + {temporal}·k (frames − 1 divisible by the VAE's temporal "
                         f"factor {temporal}); got frames={frames}")
    if height % (spatial * ph) or width % (spatial * pw):
        raise ValueError(f"{name} needs height divisible by {spatial * ph} and width by {spatial * pw} (VAE factor "
                         f"{spatial} × patch {ph}×{pw}); got height={height}, width={width}")
    latent_frames = (frames - 1) // temporal + 1
    if latent_frames % pt:
        raise ValueError(f"{name}'s temporal patch {pt} must divide the {latent_frames} latent frames of {frames} frames")
    return channels, latent_frames, height // spatial, width // spatial


def _index(index: torch.Tensor | Sequence[int] | slice, device: torch.device) -> torch.Tensor | slice:
    return index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long, device=device)


@dataclass
class TextConditioning:
    """One prompt branch of a batch, in the form the family's transformer takes.

    `embeds [B, L, D]`; `mask [B, L]` (1 for real tokens; None: every token counts);
    `pooled [B, P]` (a pooled text vector, HunyuanVideo / FLUX / SD3; None: the family has none).
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn: Any) -> "TextConditioning":
        return TextConditioning(fn(self.embeds), None if self.mask is None else fn(self.mask),
                                None if self.pooled is None else fn(self.pooled))

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> "TextConditioning":
        """The rows of a subset of samples."""
        index = _index(index, self.embeds.device)
        return self._map(lambda t: t[index])

    def expand(self, batch: int) -> "TextConditioning":
        """A one-row branch (the negative prompt) for `batch` samples."""
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def to(self, device: torch.device | str) -> "TextConditioning":
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(branches: Sequence["TextConditioning"]) -> "TextConditioning":
        """The branches stacked along the batch (CFG's unconditional and conditional halves)."""
        def join(name: str) -> torch.Tensor | None:
            parts = [getattr(b, name) for b in branches]
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise ValueError(f"cannot stack text branches where only some have a {name}")
            return torch.cat(parts)

        return TextConditioning(torch.cat([b.embeds for b in branches]), join("mask"), join("pooled"))


@dataclass
class Conditioning:
    """Conditioning of a batch of samples: `text`, the negative-prompt branch of classifier-free
    guidance (`negative`, a full branch of its own with its mask and pooled vector; None: no
    CFG), and `extra`, family tensors `[B, ...]` shared by both branches (I2V image latents and
    image embeddings)."""

    text: TextConditioning
    negative: TextConditioning | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.text)

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> "Conditioning":
        """The conditioning of a subset of samples (index along the batch dimension)."""
        index = _index(index, self.text.embeds.device)
        return Conditioning(
            text=self.text.select(index),
            negative=None if self.negative is None else self.negative.select(index),
            extra={k: t[index] for k, t in self.extra.items()},
        )


class ModelAdapter(abc.ABC):
    """One model family. Subclasses set `family` and implement the abstract methods; the class
    attributes below state the family's conventions (the trainer, the sampling math and the
    kernels always see latents `[B, C, F, H, W]` and σ in [0, 1])."""

    family: ClassVar[str]
    #: Names of transformer submodules that LoRA targets by default.
    #: Transformer submodules LoRA adapts by default: name suffixes, or one regex over full module
    #: names (peft's `target_modules` string form) when some same-named modules must stay out.
    default_lora_targets: ClassVar[tuple[str, ...] | str] = ("to_q", "to_k", "to_v", "to_out.0")
    #: The transformer's timestep is `timestep_scale · σ` (1000 for most families, 1 for FLUX).
    timestep_scale: ClassVar[float] = 1000.0
    #: The family's embedded (distilled) guidance scale (`sampling.embedded_guidance` when null);
    #: None: the transformer takes no guidance input.
    default_embedded_guidance: ClassVar[float | None] = None
    #: Whether the family is image-to-video: every prompt comes with an image (`image_conditioning`).
    needs_image: ClassVar[bool] = False
    #: Whether the transformer never reads the text embeddings where the mask is 0 (padding is
    #: masked out of every attention and pooling), so a text cache may store only the masked-in
    #: tokens and restore the padding as zeros (`megaflow.data.text_cache`).
    text_padding_masked: ClassVar[bool] = False
    #: I2V families: the `extra` key of the image conditioning that depends on the image alone,
    #: through a frozen image encoder (`encode_images`), so a text cache can hold it; None: none.
    cached_image_key: ClassVar[str | None] = None
    #: The model folder the adapter was loaded from (`from_pretrained` sets it).
    model_path: Path | None = None
    #: The diffusers pipeline class whose `save_lora_weights` / `load_lora_weights` layout LoRA uses.
    pipeline_class: ClassVar[str]

    #: Subfolders a model folder of the family must have.
    components: ClassVar[tuple[str, ...]]
    #: How to get the weights, formatted with `path` (the folder the user named).
    download_hint: ClassVar[str]

    def __init__(self, transformer: nn.Module, *, device: torch.device, dtype: torch.dtype) -> None:
        self.transformer = transformer
        self.device = device
        self.dtype = dtype
        self.lora_config: Any = None
        self._reference: nn.Module | None = None

    # ---- family-specific ---------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype, device: torch.device | str,
        transformer_dtype: torch.dtype | None = None,
        transformer_loader: Any = None, text_encoders: bool = True,
    ) -> "ModelAdapter":
        """Load every component from a local diffusers-format folder.

        `dtype` is used for the frozen parts (VAE, text encoders); `transformer_dtype`
        (default `dtype`) for the transformer; `transformer_loader(cls, folder, dtype)`, if
        given, builds the transformer (ZeRO-3: partitioned under `deepspeed.zero.Init`).
        `text_encoders=False` leaves the frozen prompt encoders (`encoder_loaders`) unread: the
        prompts then come from a text cache and `encode_prompts` raises. Raises
        `ModelLoadError` naming a missing component and how to provide it.
        """

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> TextConditioning:
        """The prompts' text branch (embeds, mask and pooled vector as the family needs)."""

    @abc.abstractmethod
    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, F, H, W)` of the latent of a video of `frames × height × width` pixels."""

    @abc.abstractmethod
    def forward_transformer(self, x: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                            extra: dict[str, torch.Tensor], guidance: torch.Tensor | None) -> torch.Tensor:
        """One raw transformer call: `x [B, C, F, H, W]`, `timestep [B]` (`timestep_scale·σ`),
        one text branch, the extras, `guidance [B]` (the embedded guidance scale, None when off)
        → velocity `[B, C, F, H, W]` (this SP rank's token shard under sequence parallelism)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, C, F, H, W]` → videos `[B, F, 3, H, W]` in [0, 1], in the VAE's dtype on its
        device (they stay there until a reward needs them elsewhere)."""

    @property
    @abc.abstractmethod
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """Transformer block classes (activation checkpointing and ZeRO-3 leaf modules)."""

    @classmethod
    def check_folder(cls, path: Path) -> None:
        """`ModelLoadError` unless `path` is a folder with every component subfolder of the family."""
        from megaflow.errors import ModelLoadError

        hint = cls.download_hint.format(path=path)
        if not path.is_dir():
            raise ModelLoadError(f"{cls.family} model folder {path} does not exist or is not a directory: {hint}")
        missing = [name for name in cls.components if not (path / name).is_dir()]
        if missing:
            raise ModelLoadError(
                f"{cls.family} model folder {path} is missing the component(s) {', '.join(missing)} "
                f"(expected {', '.join(str(path / m) + '/' for m in missing)}); a diffusers-format {cls.family} "
                f"folder has {', '.join(cls.components)} subfolders: {hint}")

    @classmethod
    def load_component(cls, path: Path, name: str, load: Any) -> Any:
        """`load(path / name)`; any failure re-raised as a `ModelLoadError` naming the component."""
        from safetensors import SafetensorError

        from megaflow.errors import ModelLoadError

        try:
            return load(path / name)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            raise ModelLoadError(f"cannot load the {cls.family} {name} from {path / name}: {exc}. The folder may be "
                                 f"incomplete: {cls.download_hint.format(path=path)}") from exc

    def image_conditioning(self, images: torch.Tensor, latent_shape: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
        """I2V families: the `extra` tensors `[P, ...]` of conditioning images `[P, 3, H, W]` in
        [0, 1] for latents of `latent_shape`; encoded once per prompt."""
        from megaflow.errors import ConfigError

        raise ConfigError(f"model family '{self.family}' is text-to-video and takes no conditioning image")

    # ---- frozen prompt encoders and the text cache -------------------------------------
    @classmethod
    def encoder_loaders(cls, dtype: torch.dtype) -> dict[str, Any]:
        """The frozen prompt encoders: attribute (and subfolder) name → `load(folder)` in `dtype`.
        The text encoders, and for Wan I2V its CLIP image encoder: what a text cache replaces and
        `from_pretrained(text_encoders=False)` leaves unloaded (the attributes are then None)."""
        return {}

    @classmethod
    def load_encoders(cls, path: Path, dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
        """The frozen prompt encoders of the folder, loaded on `device`, frozen, in eval mode."""
        return {name: cls.load_component(path, name, load).to(device).requires_grad_(False).eval()
                for name, load in cls.encoder_loaders(dtype).items()}

    @property
    def has_text_encoders(self) -> bool:
        """Whether every frozen prompt encoder is loaded."""
        return all(getattr(self, name, None) is not None for name in self.encoder_loaders(self.dtype))

    def load_text_encoders(self) -> None:
        """Load the prompt encoders a `text_encoders=False` load left out (from `model_path`)."""
        if self.has_text_encoders:
            return
        if self.model_path is None:
            raise RuntimeError("load_text_encoders needs the adapter's model_path (set by from_pretrained)")
        for name, module in self.load_encoders(self.model_path, self.dtype, self.device).items():
            setattr(self, name, module)

    def unload_text_encoders(self) -> None:
        """Drop the prompt encoders (their memory is freed once nothing else refers to them)."""
        for name in self.encoder_loaders(self.dtype):
            setattr(self, name, None)

    def require_text_encoders(self) -> None:
        """`ModelLoadError` unless the prompt encoders are loaded (called before encoding)."""
        from megaflow.errors import ModelLoadError

        if not self.has_text_encoders:
            missing = [n for n in self.encoder_loaders(self.dtype) if getattr(self, n, None) is None]
            raise ModelLoadError(
                f"the {self.family} model was loaded without its prompt encoders ({', '.join(missing)}), as a run "
                "with data.text_cache loads it, so it cannot encode prompts: they come from the text cache "
                "(megaflow.data.text_cache; `megaflow preprocess` fills it), or call load_text_encoders() first")

    def text_settings(self) -> dict[str, Any]:
        """The encoding parameters besides the encoder and tokenizer files that decide the prompt
        embeddings (sequence length, template, ...): part of `text_fingerprint`."""
        return {"max_sequence_length": getattr(self, "max_sequence_length", None)}

    def text_fingerprint(self) -> dict[str, Any]:
        """What the prompt embeddings are a function of, besides the prompt: the family, the frozen
        dtype, `text_settings`, the sha256 of each prompt encoder's `config.json` and of every
        tokenizer / image-processor file, and the names and sizes of the encoders' weight files.
        The weights themselves are never read (an adapter loaded with `text_encoders=False` has it)."""
        import hashlib

        if self.model_path is None:
            raise RuntimeError("text_fingerprint needs the adapter's model_path (set by from_pretrained)")
        root = Path(self.model_path)
        files: dict[str, str] = {}
        weights: dict[str, int] = {}
        processors = [c for c in self.components if c.startswith("tokenizer") or c == "image_processor"]
        for name in list(self.encoder_loaders(self.dtype)) + processors:
            folder = root / name
            for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
                rel = f.relative_to(root).as_posix()
                if not f.is_file():
                    continue
                if name in processors or f.name == "config.json":
                    files[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
                elif f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                    weights[rel] = f.stat().st_size
        return {"family": self.family, "dtype": str(self.dtype).removeprefix("torch."),
                "settings": self.text_settings(), "files": files, "weights": weights}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """I2V families with a `cached_image_key`: that entry `[P, ...]` of conditioning images
        `[P, 3, H, W]` in [0, 1] (the frozen image encoder's part of `image_conditioning`)."""
        from megaflow.errors import ConfigError

        raise ConfigError(f"model family '{self.family}' has no image encoder output to cache")

    @classmethod
    def attention_heads(cls, path: str | Path) -> int:
        """Attention heads of the transformer in a model folder, read from its config (no model
        built): what sequence parallelism divides."""
        import json

        from megaflow.errors import ModelLoadError

        config = Path(path) / "transformer" / "config.json"
        try:
            return int(json.loads(config.read_text())["num_attention_heads"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read num_attention_heads from {config}: {exc}; is {path} a "
                                 f"diffusers-format {cls.family} folder?") from exc

    # ---- shared ------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance_scale: float = 1.0,
                 embedded_guidance: float | None = None) -> torch.Tensor:
        """The guided velocity `v = v_u + g·(v_c − v_u)`: `x [B, C, F, H, W]`, `sigma [B]`.

        With CFG the unconditional and conditional halves run as one batch of `2B`, so a
        sample's result depends only on the batch shape, never on how it is split. Under
        sequence parallelism the shards are gathered, so every SP rank gets the whole velocity.
        """
        return self.unshard(self.velocity_shard(x, sigma, cond, guidance_scale, embedded_guidance), x)

    def velocity_shard(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance_scale: float = 1.0,
                       embedded_guidance: float | None = None) -> torch.Tensor:
        """The guided velocity in this rank's layout: `[B, C, F, H, W]` without sequence
        parallelism, this SP rank's token shard (`shard_latent`'s layout) with it.

        True CFG (`guidance_scale > 1` with a negative branch) and embedded guidance (the
        transformer's `guidance` input, the same in both halves) combine, as SkyReels-V1 uses."""
        timestep = (sigma.to(torch.float32) * self.timestep_scale).to(x.device)
        guidance = None if embedded_guidance is None else torch.full_like(timestep, float(embedded_guidance))
        xin = x.to(self.transformer_dtype)
        if guidance_scale > 1.0 and cond.negative is not None:
            both = self.forward_transformer(
                torch.cat([xin, xin]), torch.cat([timestep, timestep]),
                TextConditioning.cat([cond.negative, cond.text]),
                {k: torch.cat([t, t]) for k, t in cond.extra.items()},
                None if guidance is None else torch.cat([guidance, guidance]),
            ).float()
            v_uncond, v_cond = both.chunk(2)
            return v_uncond + guidance_scale * (v_cond - v_uncond)
        return self.forward_transformer(xin, timestep, cond.text, cond.extra, guidance).float()

    # ---- sequence parallelism (identity unless a family enables it) --------------------
    sequence_parallel: Any = None

    def enable_sequence_parallel(self, group: Any) -> None:
        """Shard the video tokens over the SP process `group` (Ulysses); families that support
        it override this."""
        from megaflow.errors import ConfigError

        raise ConfigError(f"model family '{self.family}' has no sequence-parallel plan; set parallel.sp_size=1")

    def shard_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """This rank's share of a latent `[B, C, F, H, W]`, in `velocity_shard`'s layout."""
        return latent if self.sequence_parallel is None else self.sequence_parallel.shard_latent(latent)

    def unshard(self, shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The whole latent `[B, C, F, H, W]` (shaped like `like`) from every rank's shard."""
        return shard if self.sequence_parallel is None else self.sequence_parallel.unshard(shard, like)

    #: The DeepSpeed engine wrapping `transformer`, once the trainer has built one.
    engine: Any = None

    @property
    def transformer_call(self) -> Any:
        """What to call for a forward: the DeepSpeed engine when it wraps the current transformer
        (its forward keeps ZeRO's gradient-accumulation bookkeeping), else the transformer."""
        engine = self.engine
        return engine if engine is not None and engine.module is self.transformer else self.transformer

    @property
    def transformer_dtype(self) -> torch.dtype:
        """The transformer's compute dtype. diffusers' `dtype` skips the modules it keeps in fp32
        (`_keep_in_fp32_modules`, e.g. Wan's `scale_shift_table`, its first parameter)."""
        dtype = getattr(self.transformer, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.transformer.parameters()).dtype

    def apply_lora(self, rank: int, alpha: float, targets: Sequence[str] | str | None = None) -> None:
        """Freeze the transformer and add trainable LoRA adapters (peft) on `targets` (name
        suffixes or one regex; None: the family's `default_lora_targets`)."""
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        targets = targets or self.default_lora_targets
        self.lora_config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights=True,
            target_modules=targets if isinstance(targets, str) else list(targets),
        )
        self.transformer.add_adapter(self.lora_config)
        for p in self.transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    def enable_full_finetune(self, keep_reference: bool, reference_dtype: torch.dtype | None = None) -> None:
        """Train every transformer weight; keep a frozen copy as the KL reference if asked, in
        `reference_dtype` (the run's frozen dtype, with diffusers' keep-in-fp32 modules in fp32),
        converted parameter by parameter so no second full-precision copy is ever made."""
        self.transformer.requires_grad_(True)
        if keep_reference:
            cls = type(self.transformer)
            memo = {id(p): nn.Parameter(p.detach().to(diffusers_param_dtype(cls, name, reference_dtype or p.dtype), copy=True),
                                        requires_grad=False)
                    for name, p in self.transformer.named_parameters()}
            self._reference = copy.deepcopy(self.transformer, memo).requires_grad_(False).eval()

    @property
    def uses_lora(self) -> bool:
        return self.lora_config is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[None]:
        """Within this context `velocity` evaluates the reference (base) policy."""
        if self.uses_lora:
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
        elif self._reference is not None:
            trained, self.transformer = self.transformer, self._reference
            try:
                yield
            finally:
                self.transformer = trained
        else:
            raise RuntimeError("no reference policy: call enable_full_finetune(keep_reference=True) or apply_lora first")

    def load_trainable(self, directory: str | Path, *, lora: bool) -> None:
        """Load what `save_trainable` wrote (for evaluation, frozen): LoRA adapters from
        `LORA_WEIGHTS_FILE`, or a full fine-tune's `transformer/` replacing the transformer."""
        directory = Path(directory)
        if lora:
            self.transformer.load_lora_adapter(str(directory), prefix="transformer", weight_name=LORA_WEIGHTS_FILE)
        else:
            self.transformer = type(self.transformer).from_pretrained(
                directory / "transformer", torch_dtype=self.transformer_dtype).to(self.device)
        self.transformer.eval().requires_grad_(False)

    def init_trainable(self, directory: str | Path, *, gather: Gather = no_gather, read: bool = True) -> None:
        """Start training from the trainable weights `save_trainable` (or `megaflow export`) wrote:
        into the adapters `apply_lora` made (same rank and targets), or a full fine-tune's
        `transformer/` into the transformer, module by module (under ZeRO-3 every rank calls it
        with a `gather` in which the `read` rank may modify the parameters)."""
        from megaflow.errors import ModelLoadError

        directory = Path(directory)
        if not self.uses_lora:
            load_model_streaming(self.transformer, directory / "transformer", gather=gather, read=read)
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = {k.removeprefix("transformer."): v for k, v in load_file(str(directory / LORA_WEIGHTS_FILE)).items()}
        try:
            result = set_peft_model_state_dict(self.transformer, state)
        except RuntimeError as exc:
            raise ModelLoadError(f"the LoRA weights in {directory} do not fit this run's adapters ({exc}); "
                                 "use the model.lora_rank and model.lora_targets they were trained with") from exc
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ModelLoadError(f"the LoRA weights in {directory} do not fit this run's adapters (missing "
                                 f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}); use the "
                                 "model.lora_targets they were trained with")

    def save_trainable(self, directory: str | Path, *, gather: Gather = no_gather, write: bool = True) -> None:
        """Write the trainable weights as safetensors a diffusers pipeline can load: LoRA in the
        layout of the family's `load_lora_weights` (`save_lora`), a full fine-tune as a
        `transformer/` folder for `from_pretrained`, streamed module by module so that under
        ZeRO-3 only one module's parameters are whole at a time. Every rank of a ZeRO-3 job calls
        it with `gather` (collective); only the rank with `write` writes."""
        directory = Path(directory)
        if self.uses_lora:
            with gather(self.trainable_parameters()):
                if write:
                    directory.mkdir(parents=True, exist_ok=True)
                    self.save_lora(directory)
        else:
            save_model_streaming(self.transformer, directory / "transformer", gather=gather, write=write)

    def save_lora(self, directory: Path) -> None:
        """The LoRA adapters as `directory/pytorch_lora_weights.safetensors`, in the layout the
        family pipeline's `load_lora_weights(directory)` reads (with the adapter's config)."""
        import importlib

        from peft import get_peft_model_state_dict

        module, name = self.pipeline_class.rsplit(".", 1)
        pipeline = getattr(importlib.import_module(module), name)
        pipeline.save_lora_weights(
            directory, transformer_lora_layers=get_peft_model_state_dict(self.transformer),
            safe_serialization=True, transformer_lora_adapter_metadata=self.lora_config.to_dict(),
        )
