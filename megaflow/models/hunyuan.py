"""HunyuanVideo text-to-video and SkyReels-V1 image-to-video through the real diffusers /
transformers classes.

Loads a local diffusers-format folder (the layout `HunyuanVideoPipeline.save_pretrained`
writes) and reproduces the pipelines' conventions exactly: the Llama text embeddings are
`hidden_states[-3]` of the prompt wrapped in a prompt template, tokenised to
`max_sequence_length + crop_start` tokens, with the template's first `crop_start` tokens cut
from embeddings and mask; the pooled vector is CLIP-L's `pooler_output`; the embedded guidance
reaches the transformer as `scale · 1000`; latents are decoded as `latents / scaling_factor`.

The prompt template is a property of the model folder (it is counted in the folder's tokenizer's
tokens), read from an optional `megaflow_text.json` in the folder:

    {"template": "...{}...", "crop_start": 95, "max_sequence_length": 256}

`template` and `crop_start` come together (`crop_start` is the number of tokens of the template
before the prompt; it must be given: diffusers' `crop_start=None` derives it from the template
padded to the maximum length, which crops away every prompt token without an error);
`max_sequence_length` (prompt tokens after the crop) is optional. Without the file, a folder gets
HunyuanVideo's own template (diffusers' `DEFAULT_PROMPT_TEMPLATE`, `crop_start` 95) and 256
prompt tokens, what the downloaded models need. The tiny test folders carry
`{"template": "{}", "crop_start": 0, "max_sequence_length": 16}` (their small tokenizer cannot
count the real template).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock, HunyuanVideoTransformerBlock,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel

from megaflow.models.base import ModelAdapter, TextConditioning, video_latent_shape
from megaflow.parallel.attention import takes_key_mask, trim_text_padding

#: Optional file in a model folder with the prompt template its tokenizer needs (module docstring).
TEXT_SETTINGS_FILE = "megaflow_text.json"
#: Prompt tokens after the template's crop (HunyuanVideo's `max_sequence_length`).
HUNYUAN_MAX_SEQUENCE_LENGTH = 256
#: Llama hidden state the pipelines take: `hidden_states[-(skip + 1)]`.
LLAMA_LAYERS_TO_SKIP = 2
#: Tokens of the CLIP-L prompt whose `pooler_output` is the pooled vector.
CLIP_MAX_LENGTH = 77
#: The transformer's `guidance` input is the embedded guidance scale times this.
GUIDANCE_MULTIPLIER = 1000.0
#: LoRA targets: the attention projections of the dual-stream blocks (video `to_q/k/v`, `to_out.0`;
#: text `add_q/k/v_proj`, `to_add_out`) and the single-stream blocks (`to_q/k/v`; they have no
#: `to_out`), not the token refiner (`context_embedder`) nor the output layer. A regex matched
#: against the whole module name (peft's `target_modules` string form).
HUNYUAN_LORA_TARGETS = (r"(single_)?transformer_blocks\.\d+\.attn\."
                        r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")


def write_text_settings(folder: str | Path, template: dict[str, Any], max_sequence_length: int) -> Path:
    """Write `folder/megaflow_text.json`: the prompt `template` (`{"template", "crop_start"}`) and
    the prompt length a model folder's tokenizer needs."""
    path = Path(folder) / TEXT_SETTINGS_FILE
    settings = {"template": template["template"], "crop_start": template["crop_start"],
                "max_sequence_length": max_sequence_length}
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return path


def read_text_settings(folder: Path) -> tuple[dict[str, Any], int]:
    """`(prompt_template, max_sequence_length)` of a model folder: its `megaflow_text.json`, else
    HunyuanVideo's own template (crop_start 95) and 256 tokens. `ModelLoadError` for a file that is
    not valid JSON, has unknown keys or a template without an integer `crop_start`."""
    from megaflow.errors import ModelLoadError

    path = folder / TEXT_SETTINGS_FILE
    if not path.is_file():
        return dict(DEFAULT_PROMPT_TEMPLATE), HUNYUAN_MAX_SEQUENCE_LENGTH

    def bad(problem: str) -> ModelLoadError:
        return ModelLoadError(
            f"{path}: {problem}. It must be a JSON object {{\"template\": \"...{{}}...\", \"crop_start\": <tokens of "
            f"the template before the prompt>, \"max_sequence_length\": <prompt tokens, optional>}}; delete it to use "
            f"HunyuanVideo's own template (crop_start {DEFAULT_PROMPT_TEMPLATE['crop_start']})")

    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise bad(f"cannot be read ({exc})") from exc
    if not isinstance(settings, dict):
        raise bad("is not a JSON object")
    unknown = sorted(set(settings) - {"template", "crop_start", "max_sequence_length"})
    if unknown:
        raise bad(f"has unknown key(s) {unknown}")
    template, crop_start = settings.get("template"), settings.get("crop_start")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise bad(f"'template' must be a string with one '{{}}' where the prompt goes, got {template!r}")
    if isinstance(crop_start, bool) or not isinstance(crop_start, int) or crop_start < 0:
        raise bad(f"'crop_start' must be an integer >= 0, got {crop_start!r} (diffusers' crop_start=None crops "
                  "away every prompt token)")
    length = settings.get("max_sequence_length", HUNYUAN_MAX_SEQUENCE_LENGTH)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise bad(f"'max_sequence_length' must be an integer >= 1, got {length!r}")
    return {"template": template, "crop_start": crop_start}, length


class HunyuanVideoAdapter(ModelAdapter):
    """HunyuanVideo text-to-video: `HunyuanVideoTransformer3DModel`, `AutoencoderKLHunyuanVideo`,
    Llama + CLIP-L text encoders.

    Guidance-distilled: the embedded guidance (default 6.0) is the transformer's `guidance` input;
    true CFG (`sampling.guidance_scale > 1` with a negative prompt) is possible and off in the
    recipes. LoRA trains the attention projections of the dual- and single-stream blocks
    (`HUNYUAN_LORA_TARGETS`, as Flow-GRPO's attention LoRA) and leaves the token refiner frozen: the
    refiner only re-encodes the prompt (text attends to text) into the stream every block reads, so
    the reward, which judges the video, trains how the blocks generate from a fixed prompt
    representation, and the LoRA keeps the block-only layout common HunyuanVideo LoRAs have. List
    `model.lora_targets` (e.g. `[to_q, to_k, to_v, to_out.0]`, which matches the refiner too) to
    change it.
    """

    family: ClassVar[str] = "hunyuan"
    pipeline_class: ClassVar[str] = "diffusers.HunyuanVideoPipeline"
    components: ClassVar[tuple[str, ...]] = (
        "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    download_hint: ClassVar[str] = (
        "download the diffusers-format model, e.g. `huggingface-cli download hunyuanvideo-community/HunyuanVideo "
        "--local-dir {path}`, or use model.path=tiny for the tiny test model")
    default_lora_targets: ClassVar[str] = HUNYUAN_LORA_TARGETS
    default_embedded_guidance: ClassVar[float | None] = 6.0
    #: The token refiner pools and attends over the masked-in text tokens only, and the blocks'
    #: joint attention masks the padding: the padded embeddings never reach the video.
    text_padding_masked: ClassVar[bool] = True

    def __init__(
        self, transformer: HunyuanVideoTransformer3DModel, vae: AutoencoderKLHunyuanVideo,
        text_encoder: LlamaModel | None, tokenizer: Any, text_encoder_2: CLIPTextModel | None,
        tokenizer_2: CLIPTokenizer, *, device: torch.device,
        dtype: torch.dtype, prompt_template: dict[str, Any] | None = None, max_sequence_length: int | None = None,
    ) -> None:
        super().__init__(transformer, device=device, dtype=dtype)
        self.vae = vae.requires_grad_(False).eval()
        #: The text encoders; None when loaded with `text_encoders=False` (prompts from a text cache).
        self.text_encoder = None if text_encoder is None else text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.transformer.requires_grad_(False).eval()
        #: `{"template", "crop_start"}` the prompts are wrapped in (see the module docstring).
        self.prompt_template = dict(prompt_template or DEFAULT_PROMPT_TEMPLATE)
        #: Prompt tokens after the template's crop.
        self.max_sequence_length = max_sequence_length or HUNYUAN_MAX_SEQUENCE_LENGTH

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def check_transformer(cls, transformer: HunyuanVideoTransformer3DModel, path: Path) -> None:
        """`ModelLoadError` unless the transformer is a text-to-video one (input channels = output channels)."""
        from megaflow.errors import ModelLoadError

        config = transformer.config
        if config.image_condition_type is not None:
            raise ModelLoadError(f"the transformer in {path / 'transformer'} has image_condition_type="
                                 f"{config.image_condition_type!r} (HunyuanVideo-I2V), which megaflow does not "
                                 "support; use a HunyuanVideo T2V or SkyReels-V1 I2V folder")
        if config.in_channels != (config.out_channels or config.in_channels):
            raise ModelLoadError(f"the transformer in {path / 'transformer'} takes {config.in_channels} input "
                                 f"channels for {config.out_channels} latent channels, an image-to-video model; "
                                 "use model.family=skyreels_i2v for SkyReels-V1 I2V")

    @classmethod
    def encoder_loaders(cls, dtype: torch.dtype) -> dict[str, Callable[[Path], nn.Module]]:
        """Llama and CLIP-L."""
        return {"text_encoder": lambda p: LlamaModel.from_pretrained(p, dtype=dtype),
                "text_encoder_2": lambda p: CLIPTextModel.from_pretrained(p, dtype=dtype)}

    def text_settings(self) -> dict[str, Any]:
        """The prompt template, its crop, the prompt length, the Llama layer and CLIP's length."""
        return {"template": self.prompt_template["template"], "crop_start": int(self.prompt_template["crop_start"]),
                "max_sequence_length": self.max_sequence_length, "llama_layers_to_skip": LLAMA_LAYERS_TO_SKIP,
                "clip_max_length": CLIP_MAX_LENGTH}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype, device: torch.device | str,
        transformer_dtype: torch.dtype | None = None,
        transformer_loader: Callable[[type, Path, torch.dtype], nn.Module] | None = None, text_encoders: bool = True,
    ) -> "HunyuanVideoAdapter":
        """Load a local diffusers-format folder; frozen parts in `dtype`, transformer in
        `transformer_dtype` (default `dtype`). `transformer_loader(cls, folder, dtype)` replaces
        `from_pretrained` for the transformer (ZeRO-3 builds it partitioned). `text_encoders=False`
        never reads the text encoders' weights (a text cache gives the prompt embeddings)."""
        path, device = Path(path).expanduser(), torch.device(device)
        cls.check_folder(path)
        template, max_length = read_text_settings(path)
        load_dtype = transformer_dtype or dtype
        if transformer_loader is None:
            transformer = cls.load_component(path, "transformer", lambda p: (
                HunyuanVideoTransformer3DModel.from_pretrained(p, torch_dtype=load_dtype)))
        else:
            transformer = cls.load_component(path, "transformer", lambda p: transformer_loader(
                HunyuanVideoTransformer3DModel, p, load_dtype))
        cls.check_transformer(transformer, path)
        parts = dict(
            transformer=transformer.to(device),
            vae=cls.load_component(path, "vae", lambda p: AutoencoderKLHunyuanVideo.from_pretrained(
                p, torch_dtype=dtype)).to(device),
            tokenizer=cls.load_component(path, "tokenizer", AutoTokenizer.from_pretrained),
            tokenizer_2=cls.load_component(path, "tokenizer_2", CLIPTokenizer.from_pretrained),
            **(cls.load_encoders(path, dtype, device) if text_encoders else dict.fromkeys(cls.encoder_loaders(dtype))),
        )
        adapter = cls(**parts, device=device, dtype=dtype, prompt_template=template, max_sequence_length=max_length)
        adapter.model_path = path
        return adapter

    # ---- text --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> TextConditioning:
        """Llama embeddings `[B, max_sequence_length, D]` and their mask `[B, max_sequence_length]`
        (the template's first `crop_start` tokens cut off), CLIP-L pooled vectors `[B, P]`, all as
        `HunyuanVideoPipeline.encode_prompt`. `ValueError` for a prompt with no token left after the
        crop (the transformer would divide by an empty mask)."""
        self.require_text_encoders()
        if isinstance(prompts, str):
            prompts = [prompts]
        embeds, mask = self._llama_embeds(prompts)
        empty = [p for p, n in zip(prompts, mask.sum(1).tolist()) if n == 0]
        if empty:
            raise ValueError(
                f"prompt(s) {empty[:3]} have no token left after cutting the template's first "
                f"crop_start={self.prompt_template['crop_start']} tokens: the prompt template does not fit this "
                f"folder's tokenizer; give the folder a {TEXT_SETTINGS_FILE} with the right template and crop_start")
        if (mask[:, 1:] > mask[:, :-1]).any():
            raise ValueError("the tokenizer pads on the left; HunyuanVideo's transformer takes the prompt tokens "
                             "first and the padding last (set padding_side='right' in the tokenizer's config)")
        return TextConditioning(embeds, mask, self._clip_pooled(prompts))

    def _llama_embeds(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden_states[-3]` of the templated prompts `[B, L, D]` (in `dtype`) and the mask `[B, L]`, cropped."""
        crop = int(self.prompt_template["crop_start"])
        tokens = self.tokenizer(
            [self.prompt_template["template"].format(p) for p in prompts], max_length=self.max_sequence_length + crop,
            padding="max_length", truncation=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        embeds = hidden[-(LLAMA_LAYERS_TO_SKIP + 1)].to(self.dtype)
        return embeds[:, crop:], mask[:, crop:]

    def _clip_pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-L `pooler_output` `[B, P]` of the plain prompts (77 tokens, in `dtype`)."""
        tokens = self.tokenizer_2(list(prompts), padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                                  return_tensors="pt")
        return self.text_encoder_2(tokens.input_ids.to(self.device), output_hidden_states=False).pooler_output.to(
            self.dtype)

    # ---- latents and the transformer ---------------------------------------------------
    @property
    def vae_scale_factor_temporal(self) -> int:
        """Pixel frames per latent frame (after the first)."""
        return int(self.vae.config.temporal_compression_ratio)

    @property
    def vae_scale_factor_spatial(self) -> int:
        """Pixels per latent row / column."""
        return int(self.vae.config.spatial_compression_ratio)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, (frames−1)//4 + 1, height//8, width//8)` with C the denoised latent's channels
        (`out_channels`); `ValueError` for sizes the model cannot take."""
        config = self.transformer.config
        p = int(config.patch_size)
        return video_latent_shape("HunyuanVideo", frames, height, width, temporal=self.vae_scale_factor_temporal,
                                  spatial=self.vae_scale_factor_spatial, patch=(int(config.patch_size_t), p, p),
                                  channels=int(config.out_channels or config.in_channels))

    def transformer_inputs(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's `hidden_states` (text-to-video: the latents alone)."""
        if extra:
            raise ValueError(f"HunyuanVideo text-to-video takes no extra conditioning, got {sorted(extra)}")
        return x

    def guidance_input(self, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The transformer's `guidance` `[B]`: the embedded guidance scale × 1000 in the transformer's
        dtype (as the pipelines build it); `ValueError` when it is missing for a guidance-distilled
        transformer or given to one without a guidance embedder."""
        embeds = bool(self.transformer.config.guidance_embeds)
        if guidance is None and embeds:
            raise ValueError(f"the {self.family} transformer is guidance-distilled (guidance_embeds=true) and needs "
                             f"an embedded guidance scale; set sampling.embedded_guidance (default "
                             f"{self.default_embedded_guidance})")
        if guidance is not None and not embeds:
            raise ValueError(f"the {self.family} transformer has no guidance embedder (guidance_embeds=false), so an "
                             "embedded guidance scale would be ignored; this model is not a HunyuanVideo / SkyReels-V1 "
                             "guidance-distilled transformer")
        return None if guidance is None else guidance.to(dtype) * GUIDANCE_MULTIPLIER

    def forward_transformer(self, x: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                            extra: dict[str, torch.Tensor], guidance: torch.Tensor | None) -> torch.Tensor:
        """One transformer call: `x [B, C, F, H, W]`, `timestep [B]` (0..1000), text embeds
        `[B, L, D]` with mask `[B, L]` and pooled `[B, P]`, `guidance [B]` (the raw scale) → velocity
        `[B, C, F, H, W]`, or under sequence parallelism this rank's real tokens `[B, L_r, C·pt·p·p]`
        (see `megaflow.parallel.joint_sp`). On an attention backend without masks (flash, sage) the
        text padding all rows share is trimmed first (`megaflow.parallel.attention`)."""
        if text.mask is None or text.pooled is None:
            raise ValueError("HunyuanVideo needs each text branch's mask and pooled vector (use encode_prompts)")
        dtype = self.transformer_dtype
        embeds, mask = text.embeds, text.mask
        if not takes_key_mask(self.transformer):
            embeds, mask = trim_text_padding(embeds, mask)
        out = self.transformer_call(
            hidden_states=self.transformer_inputs(x.to(dtype), extra), timestep=timestep,
            encoder_hidden_states=embeds.to(dtype), encoder_attention_mask=mask.to(dtype),
            pooled_projections=text.pooled.to(dtype), guidance=self.guidance_input(guidance, dtype),
            return_dict=False,
        )[0]
        return out if self.sequence_parallel is None else self.sequence_parallel.valid(out, x)

    def enable_sequence_parallel(self, group: Any) -> None:
        """Ulysses over `group`: video and text tokens both sharded, joint attention by all-to-all."""
        from megaflow.parallel.joint_sp import HunyuanSequenceParallel

        self.sequence_parallel = HunyuanSequenceParallel(self.transformer, group)
        if self._reference is not None:
            HunyuanSequenceParallel(self._reference, group)

    #: `model.vae_tiling` (`megaflow.models.vae`): `auto` tiles latents larger than the VAE's tile.
    vae_tiling: str = "auto"
    #: `model.vae_slicing`: decode one sample at a time (videos independent of the batch).
    vae_slicing: bool = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, C, F, H, W]` → `[B, F', 3, H', W']` in [0, 1] in the VAE's dtype (the pipelines' decode:
        `latents / scaling_factor`, no mean / std), tiled per `vae_tiling`, one sample at a time per
        `vae_slicing` (`megaflow.models.vae`)."""
        from megaflow.models.vae import decode_video

        vae = self.vae
        z = latents.to(self.device, vae.dtype) / vae.config.scaling_factor
        video = decode_video(vae, z, self.vae_tiling, self.vae_slicing)
        return (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    @property
    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """The dual- and single-stream blocks: the units of activation checkpointing and ZeRO-3
        leaf modules. The token refiner is left out: diffusers calls it outside the checkpointing
        hook (it could not be checkpointed), and ZeRO-3 fetches its few weights per submodule."""
        return (HunyuanVideoTransformerBlock, HunyuanVideoSingleTransformerBlock)


class SkyReelsI2VAdapter(HunyuanVideoAdapter):
    """SkyReels-V1 image-to-video (`HunyuanSkyreelsImageToVideoPipeline`): the HunyuanVideo
    transformer with twice the input channels; the conditioning image's VAE latents, zero-padded
    in time, are concatenated to the latents on channels at every step (shared by both CFG
    halves). Uses true CFG (6.0 with a negative prompt in the recipes) and embedded guidance 1.0."""

    family: ClassVar[str] = "skyreels_i2v"
    pipeline_class: ClassVar[str] = "diffusers.HunyuanSkyreelsImageToVideoPipeline"
    download_hint: ClassVar[str] = (
        "download HunyuanVideo's diffusers folder (`huggingface-cli download hunyuanvideo-community/HunyuanVideo "
        "--local-dir {path}`) and replace its transformer with SkyReels-V1's (`huggingface-cli download "
        "Skywork/SkyReels-V1-Hunyuan-I2V --local-dir {path}/transformer`), or use model.path=tiny for the tiny "
        "test model")
    default_embedded_guidance: ClassVar[float | None] = 1.0
    needs_image: ClassVar[bool] = True

    @classmethod
    def check_transformer(cls, transformer: HunyuanVideoTransformer3DModel, path: Path) -> None:
        """`ModelLoadError` unless the transformer takes latents + image latents (in = 2 × out channels)."""
        from megaflow.errors import ModelLoadError

        config = transformer.config
        if config.image_condition_type is not None or config.in_channels != 2 * config.out_channels:
            raise ModelLoadError(
                f"the transformer in {path / 'transformer'} takes {config.in_channels} input channels for "
                f"{config.out_channels} latent channels (image_condition_type={config.image_condition_type!r}); "
                "SkyReels-V1 I2V takes latents and image latents concatenated (twice the channels). For HunyuanVideo "
                "text-to-video use model.family=hunyuan")

    @torch.no_grad()
    def image_conditioning(self, images: torch.Tensor,
                           latent_shape: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
        """`{"image_latents": [P, C, F, h, w]}` (float32) of images `[P, 3, H, W]` in [0, 1]: the VAE
        latents of each image as a one-frame video, × `scaling_factor`, then zero frames up to the
        `F` latent frames of `latent_shape`, as `HunyuanSkyreelsImageToVideoPipeline.prepare_latents`
        (one image at a time, so an image's latents do not depend on the others). The posterior mean
        is taken (the pipeline samples it with the call's generator): the image's conditioning is
        then one value, the same on every rank and in every layout."""
        channels, frames, height, width = latent_shape
        s = self.vae_scale_factor_spatial
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (height * s, width * s):
            raise ValueError(f"SkyReels-V1 needs conditioning images [P, 3, {height * s}, {width * s}] (the video "
                             f"size), got {tuple(images.shape)}")
        vae = self.vae
        pixels = (2.0 * images - 1.0).to(self.device, vae.dtype).unsqueeze(2)
        posterior = [vae.encode(image[None]).latent_dist.mode() for image in pixels]
        latents = torch.cat(posterior).to(torch.float32) * vae.config.scaling_factor
        if latents.shape[1:] != (channels, 1, height, width):
            raise ValueError(f"the VAE encodes the images to {tuple(latents.shape[1:])}, expected "
                             f"{(channels, 1, height, width)}")
        padding = latents.new_zeros(latents.shape[0], channels, frames - 1, height, width)
        return {"image_latents": torch.cat([latents, padding], dim=2)}

    def transformer_inputs(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's `hidden_states`: latents `[B, C, F, H, W]` and image latents concatenated
        on channels `[B, 2C, F, H, W]`."""
        if set(extra) != {"image_latents"}:
            raise ValueError(f"SkyReels-V1 I2V needs extra={{'image_latents'}} (from image_conditioning), got "
                             f"{sorted(extra)}")
        image = extra["image_latents"]
        if image.shape != x.shape:
            raise ValueError(f"image latents {tuple(image.shape)} do not match the latents {tuple(x.shape)}")
        return torch.cat([x, image.to(x.dtype)], dim=1)
