"""CLIP-family image rewards hosted on `transformers.CLIPModel`: PickScore, CLIPScore, HPS v2.1
and the LAION aesthetic predictor.

Every reward here is a `FrameReward`: it scores the frames its `frames` option picks (default
`uniform:4`) and a video's score is their mean. Pixels go through `preprocess_images` (torch
resize / centre crop / CLIP normalisation, settings read from the folder's
`preprocessor_config.json`), so training and evaluation share one differentiable path; it differs
slightly from `CLIPImageProcessor`'s PIL resize (tests/rewards/test_clip.py states by how much).
Nothing is downloaded: each reward reads a local folder, and its error says how to get one.

Options common to all four: `path` (the folder), `device`, `dtype` (`float32 | bfloat16 |
float16`, the CLIP model's dtype; scores are computed in float32), `batch_size` (frames per
forward) and `frames`.

| reward | folder | score |
|---|---|---|
| `pickscore` | PickScore_v1 `CLIPModel` + CLIP-ViT-H-14 tokenizer/preprocessor | `exp(logit_scale)·cos / divisor` |
| `clipscore` | any `CLIPModel` folder (e.g. openai/clip-vit-large-patch14) | `w·max(cos, 0)` |
| `hpsv2` | HPS v2.1 converted by `megaflow convert-reward hpsv2` | `cos` (no logit scale) |
| `aesthetic` | CLIP ViT-L/14 folder + the LAION head file | affine head on the unit image embedding |

HPS v2.1 is published as an open_clip ViT-H-14 checkpoint; `convert_hpsv2` remaps it once into a
`CLIPModel` folder (`megaflow convert-reward hpsv2 HPS_v2.1_compressed.pt DST --base BASE`).

`write_tiny_*` write tiny random-weight folders in each reward's real layout (for tests and demos).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from megaflow.errors import ConfigError
from megaflow.rewards.base import register_reward
from megaflow.rewards.model import FrameReward, reward_folder
from megaflow.rewards.preprocess import preprocess_images, read_image_settings

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel

__all__ = [
    "AESTHETIC_HEAD_FILES",
    "AestheticHead",
    "AestheticReward",
    "CLIPScoreReward",
    "HPSv2Reward",
    "PickScoreReward",
    "TINY_CLIP",
    "check_clip_state_dict",
    "convert_hpsv2",
    "load_clip",
    "openclip_key_targets",
    "openclip_vit_shapes",
    "remap_openclip_state_dict",
    "tiny_clip_config",
    "tiny_clip_tokenizer",
    "tiny_openclip_state_dict",
    "write_tiny_aesthetic",
    "write_tiny_clip",
    "write_tiny_clip_base",
    "write_tiny_clipscore",
    "write_tiny_hpsv2",
    "write_tiny_openclip_checkpoint",
    "write_tiny_pickscore",
]

#: Files of a transformers CLIP tokenizer (either `tokenizer.json`, or `vocab.json` + `merges.txt`)
#: and of its image processor, copied by the HPS converter from the base folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")

_PICKSCORE_HINT = (
    "put PickScore_v1 and the CLIP-ViT-H-14 tokenizer/preprocessor files in one folder, e.g. "
    "`hf download yuvalkirstain/PickScore_v1 --local-dir DIR` then `hf download "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K tokenizer.json tokenizer_config.json vocab.json merges.txt "
    "special_tokens_map.json preprocessor_config.json --local-dir DIR`, and set path: DIR")
_CLIPSCORE_HINT = (
    "give a transformers CLIP model folder, e.g. `hf download openai/clip-vit-large-patch14 --local-dir DIR`, "
    "and set path: DIR")
_HPSV2_HINT = (
    "convert the HPS v2.1 checkpoint once: get HPS_v2.1_compressed.pt (Hugging Face repo xswu/HPSv2) and the "
    "config/tokenizer/preprocessor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (`hf download "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include '*.json' '*.txt' --local-dir BASE`; its weights are not "
    "needed), run `megaflow convert-reward hpsv2 HPS_v2.1_compressed.pt DIR --base BASE`, and set path: DIR")
_AESTHETIC_HINT = (
    "give a CLIP ViT-L/14 transformers folder (`hf download openai/clip-vit-large-patch14 --local-dir DIR`) with "
    "the LAION aesthetic head sac+logos+ava1-l14-linearMSE.pth (christophschuhmann/improved-aesthetic-predictor) "
    "copied into it, and set path: DIR")


# --------------------------------------------------------------------------------------------
# Loading CLIP folders
# --------------------------------------------------------------------------------------------

def _clip_classes() -> Any:
    """The `transformers` module (its CLIP classes), or ConfigError if it cannot be imported."""
    try:
        import transformers
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel  # noqa: F401
    except Exception as e:  # a CUDA-only torchvision next to CPU torch breaks this import (RuntimeError)
        raise ConfigError(
            f"cannot import transformers' CLIP classes ({type(e).__name__}: {e}); if torchvision is installed "
            "and does not match torch, uninstall it (megaflow's CLIP rewards do not need it)") from e
    return transformers


def _read_config(name: str, folder: Path, hint: str) -> dict[str, Any]:
    """`folder/config.json` of a CLIP model, else ConfigError naming what is wrong and `hint`."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"reward {name!r}: '{folder}' has no config.json, so it is not a transformers model "
                          f"folder; {hint}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward {name!r}: cannot read '{path}' ({e}); {hint}") from e
    if config.get("model_type") != "clip":
        raise ConfigError(f"reward {name!r}: '{path}' describes model_type {config.get('model_type')!r}, "
                          f"not a CLIP model (model_type 'clip'); {hint}")
    return config


def _check_tokenizer_files(name: str, folder: Path, hint: str) -> None:
    if not ((folder / "tokenizer.json").is_file()
            or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise ConfigError(f"reward {name!r}: '{folder}' has no CLIP tokenizer (tokenizer.json, or vocab.json with "
                          f"merges.txt); {hint}")


def load_clip(name: str, folder: Path, hint: str, *, dtype: torch.dtype, device: torch.device,
              tokenizer: bool) -> tuple["CLIPModel", Any]:
    """The frozen `CLIPModel` of `folder` (on `device`, in `dtype`, eval mode) and its tokenizer
    (None unless `tokenizer`); ConfigError naming the problem and `hint` if the folder is wrong."""
    _read_config(name, folder, hint)
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise ConfigError(f"reward {name!r}: '{folder}' has no weights ({' or '.join(_WEIGHT_FILES[::2])}); {hint}")
    if tokenizer:
        _check_tokenizer_files(name, folder, hint)
    transformers = _clip_classes()
    try:
        model, info = transformers.CLIPModel.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"reward {name!r}: cannot load the CLIP model in '{folder}' ({type(e).__name__}: {e}); "
                          f"{hint}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"reward {name!r}: the weights in '{folder}' lack {len(missing)} CLIP parameter(s) "
                          f"({shown}); they would be random; {hint}")
    model.requires_grad_(False).eval().to(device)
    tok = None
    if tokenizer:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"reward {name!r}: cannot load the tokenizer in '{folder}' "
                              f"({type(e).__name__}: {e}); {hint}") from e
        vocab = model.config.text_config.vocab_size
        if not 2 < len(tok) <= vocab:
            raise ConfigError(f"reward {name!r}: the tokenizer in '{folder}' has {len(tok)} tokens but the text "
                              f"model has {vocab}; the tokenizer files do not belong to this model; {hint}")
    return model, tok


def _positive(name: str, option: str, value: Any) -> float:
    """`value` as a positive finite float, or ConfigError naming the reward and option."""
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reward {name!r}: option {option} must be a number, got {value!r}") from e
    if isinstance(value, bool) or not (math.isfinite(v) and v > 0):
        raise ConfigError(f"reward {name!r}: option {option} must be a positive finite number, got {value!r}")
    return v


class _CLIPReward(FrameReward):
    """A reward computed from a `CLIPModel`'s unit image (and text) embeddings."""

    hint = ""
    uses_text = True

    def __init__(self, path: str | Path | None, *, frames: str, device: str, dtype: str, batch_size: int) -> None:
        super().__init__(frames=frames, device=device, dtype=dtype, batch_size=batch_size)
        self.folder = reward_folder(self.name, path, self.hint)
        self.model, self.tokenizer = load_clip(self.name, self.folder, self.hint, dtype=self.dtype,
                                               device=self.device, tokenizer=self.uses_text)
        self.settings = read_image_settings(self.folder, self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings float32 `[N, E]` of images `[N, 3, H, W]` in [0, 1]."""
        pixels = preprocess_images(images, self.settings).to(device=self.model_device, dtype=self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Unit text embeddings float32 `[N, E]` of `prompts` (each distinct prompt encoded once)."""
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        device = self.model_device
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(device),
                                       attention_mask=tokens["attention_mask"].to(device)).pooler_output
        features = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
        where = {p: i for i, p in enumerate(unique)}
        return features[torch.tensor([where[p] for p in prompts], device=features.device)]

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """`cos(image, text)` float32 `[N]` of each image with its prompt."""
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


@register_reward("pickscore")
class PickScoreReward(_CLIPReward):
    """PickScore (Kirstain et al. 2023): `exp(logit_scale) · cos(image, text) / divisor`.

    Folder: the PickScore_v1 `CLIPModel` (ViT-H-14) with the tokenizer and `preprocessor_config.json` of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K saved beside it. `divisor` (default 26, Flow-GRPO's value: it
    brings raw PickScores of about 18–23 near [0.7, 0.9] so they mix with [0, 1] rewards); set 1 for the raw
    PickScore. Options: `path`, `divisor`, `frames`, `device`, `dtype`, `batch_size`.
    """

    name = "pickscore"
    hint = _PICKSCORE_HINT

    def __init__(self, path: str | Path | None = None, divisor: float = 26.0, frames: str = "uniform:4",
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 16) -> None:
        self.divisor = _positive(self.name, "divisor", divisor)
        super().__init__(path, frames=frames, device=device, dtype=dtype, batch_size=batch_size)

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scale = self.model.logit_scale.float().exp()
        return scale * self.cosine(images, prompts) / self.divisor


@register_reward("clipscore")
class CLIPScoreReward(_CLIPReward):
    """CLIPScore (Hessel et al. 2021): `w · max(cos(image, text), 0)`.

    Folder: any transformers `CLIPModel` folder with its tokenizer (e.g. openai/clip-vit-large-patch14). `w`
    defaults to 2.5, the paper's value: image–caption cosines of CLIP rarely exceed 0.4, so 2.5 stretches the
    score to about [0, 1] (torchmetrics' `CLIPScore` uses 100 instead). Options: `path`, `w`, `frames`,
    `device`, `dtype`, `batch_size`.
    """

    name = "clipscore"
    hint = _CLIPSCORE_HINT

    def __init__(self, path: str | Path | None = None, w: float = 2.5, frames: str = "uniform:4",
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 16) -> None:
        self.w = _positive(self.name, "w", w)
        super().__init__(path, frames=frames, device=device, dtype=dtype, batch_size=batch_size)

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.w * self.cosine(images, prompts).clamp(min=0.0)


@register_reward("hpsv2")
class HPSv2Reward(_CLIPReward):
    """HPS v2.1 (Wu et al. 2023): `cos(image, text)` of the HPS-finetuned CLIP ViT-H-14, without the logit
    scale (typical values 0.2–0.35).

    Folder: the output of `megaflow convert-reward hpsv2 HPS_v2.1_compressed.pt DIR --base BASE` (a
    `CLIPModel` in safetensors with the CLIP-ViT-H-14 tokenizer and preprocessor files). Options: `path`,
    `frames`, `device`, `dtype`, `batch_size`.
    """

    name = "hpsv2"
    hint = _HPSV2_HINT

    def __init__(self, path: str | Path | None = None, frames: str = "uniform:4", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 16) -> None:
        super().__init__(path, frames=frames, device=device, dtype=dtype, batch_size=batch_size)

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.cosine(images, prompts)


# --------------------------------------------------------------------------------------------
# LAION aesthetic predictor
# --------------------------------------------------------------------------------------------

#: Head file names looked for in an aesthetic folder, in order: the published state dict, or the same
#: keys in safetensors.
AESTHETIC_HEAD_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_head.safetensors")
_HEAD_LINEARS = (0, 2, 4, 6, 7)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP: `Linear Drop Linear Drop Linear Drop Linear Linear`
    (indices 0–7 of `layers`, so the state dict keys are `layers.{0,2,4,6,7}.{weight,bias}`). It has no
    nonlinearity: the head is affine. Published sizes: 768 → 1024 → 128 → 64 → 16 → 1."""

    def __init__(self, sizes: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)) -> None:
        super().__init__()
        if len(sizes) != 6:
            raise ValueError(f"the aesthetic head has 5 linear layers (6 sizes), got sizes {sizes}")
        s = sizes
        self.layers = nn.Sequential(
            nn.Linear(s[0], s[1]), nn.Dropout(0.2), nn.Linear(s[1], s[2]), nn.Dropout(0.2),
            nn.Linear(s[2], s[3]), nn.Dropout(0.1), nn.Linear(s[3], s[4]), nn.Linear(s[4], s[5]))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "AestheticHead":
        """The head holding `state` (sizes read from its shapes); ValueError if the keys or shapes differ."""
        expected = {f"layers.{i}.{p}" for i in _HEAD_LINEARS for p in ("weight", "bias")}
        if set(state) != expected:
            raise ValueError(f"expected exactly the keys {sorted(expected)}, got {sorted(state)}")
        weights = [state[f"layers.{i}.weight"] for i in _HEAD_LINEARS]
        sizes = (int(weights[0].shape[1]),) + tuple(int(w.shape[0]) for w in weights)
        head = cls(sizes)
        head.load_state_dict({k: v.float() for k, v in state.items()})  # shape mismatches raise here
        if sizes[-1] != 1:
            raise ValueError(f"the last layer must give one score, it gives {sizes[-1]}")
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _load_head(name: str, folder: Path) -> AestheticHead:
    for file in AESTHETIC_HEAD_FILES:
        path = folder / file
        if path.is_file():
            break
    else:
        raise ConfigError(f"reward {name!r}: '{folder}' has no aesthetic head ({' or '.join(AESTHETIC_HEAD_FILES)}); "
                          f"{_AESTHETIC_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        return AestheticHead.from_state_dict(state)
    except Exception as e:  # unreadable file, pickled objects, wrong keys or shapes
        raise ConfigError(f"reward {name!r}: cannot use '{path}' as the LAION aesthetic head "
                          f"({type(e).__name__}: {e}); {_AESTHETIC_HINT}") from e


@register_reward("aesthetic")
class AestheticReward(_CLIPReward):
    """LAION improved aesthetic predictor: CLIP ViT-L/14 image embedding → unit length → `AestheticHead`
    (an affine map; scores on the AVA 1–10 rating scale, higher is prettier). Prompts are ignored.

    Folder: a transformers CLIP ViT-L/14 folder (openai/clip-vit-large-patch14; the tokenizer is not needed)
    with the published head `sac+logos+ava1-l14-linearMSE.pth` copied into it as is (read with
    `weights_only=True`), or the same state dict as `aesthetic_head.safetensors`. The head runs in float32.
    Options: `path`, `frames`, `device`, `dtype`, `batch_size`.
    """

    name = "aesthetic"
    hint = _AESTHETIC_HINT
    uses_text = False

    def __init__(self, path: str | Path | None = None, frames: str = "uniform:4", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 16) -> None:
        super().__init__(path, frames=frames, device=device, dtype=dtype, batch_size=batch_size)
        self.head = _load_head(self.name, self.folder)
        embed = int(self.model.config.projection_dim)
        if self.head.layers[0].in_features != embed:
            raise ConfigError(f"reward {self.name!r}: the head takes {self.head.layers[0].in_features}-d embeddings "
                              f"but the CLIP model in '{self.folder}' gives {embed}-d ones (the head needs CLIP "
                              f"ViT-L/14); {self.hint}")
        self.head.requires_grad_(False).eval().to(self.device)

    def modules(self) -> list[nn.Module]:
        return [self.model, self.head]

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        features = self.image_features(images)
        return self.head(features.to(next(self.head.parameters()).device)).squeeze(-1)


# --------------------------------------------------------------------------------------------
# HPS v2.1: open_clip ViT checkpoint -> CLIPModel
# --------------------------------------------------------------------------------------------

#: open_clip residual-block parameter (after `...resblocks.N.`) -> CLIPModel encoder-layer parameter.
_BLOCK_KEYS = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
}
#: open_clip top-level parameter -> CLIPModel parameter (same tensor).
_TOP_KEYS = {
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
#: open_clip projections `(width, embed)` used as `x @ P` -> CLIPModel `Linear.weight` `(embed, width)` = P.T.
_TRANSPOSED_KEYS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")

Transform = Callable[[torch.Tensor], torch.Tensor]


def _plan(key: str) -> list[tuple[str, Transform]] | None:
    """The CLIPModel parameters open_clip's `key` becomes, each with the function giving it from the
    open_clip tensor; None if `key` has no counterpart."""
    if key in _TOP_KEYS:
        return [(_TOP_KEYS[key], lambda t: t)]
    if key in _TRANSPOSED_KEYS:
        return [(_TRANSPOSED_KEYS[key], lambda t: t.t())]
    m = _BLOCK.match(key)
    if m is None:
        return None
    prefix = f"{'vision_model' if m.group(1) else 'text_model'}.encoder.layers.{m.group(2)}."
    rest = m.group(3)
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        # nn.MultiheadAttention packs [q; k; v] along dim 0
        kind = rest.rsplit("_", 1)[1]
        return [(f"{prefix}self_attn.{p}_proj.{kind}", lambda t, i=i: t.chunk(3, dim=0)[i])
                for i, p in enumerate("qkv")]
    if rest in _BLOCK_KEYS:
        return [(prefix + _BLOCK_KEYS[rest], lambda t: t)]
    return None


def openclip_key_targets(key: str) -> list[str] | None:
    """The CLIPModel parameter names the open_clip ViT-CLIP parameter `key` maps to (three for a packed
    `in_proj`), or None if it has no mapping."""
    plan = _plan(key)
    return None if plan is None else [target for target, _ in plan]


def remap_openclip_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ViT CLIP state dict (`visual.*`, `transformer.*`, `token_embedding.*`, ...) as
    `CLIPModel` parameters: packed `in_proj` split into q/k/v, projections transposed, names mapped.
    ConfigError listing the keys that have no mapping."""
    unmapped = [k for k in state if _plan(k) is None]
    if unmapped:
        shown = ", ".join(unmapped[:8]) + (f" and {len(unmapped) - 8} more" if len(unmapped) > 8 else "")
        raise ConfigError(f"{len(unmapped)} checkpoint key(s) have no CLIPModel counterpart: {shown} (is it an "
                          "open_clip ViT CLIP checkpoint such as HPS v2.1?)")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for target, transform in _plan(key) or []:
            out[target] = transform(tensor)
    return out


def openclip_vit_shapes(*, vision_layers: int, vision_width: int, patch_size: int, image_size: int,
                        text_layers: int, text_width: int, context_length: int, vocab_size: int,
                        embed_dim: int, mlp_ratio: float = 4.0) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of an open_clip `CLIP` with a ViT image tower and the built-in text
    transformer (the layout of `model.state_dict()`, as in HPS v2's `ckpt["state_dict"]`)."""
    grid = image_size // patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "positional_embedding": (context_length, text_width),
        "text_projection": (text_width, embed_dim),
        "logit_scale": (),
        "visual.class_embedding": (vision_width,),
        "visual.positional_embedding": (grid * grid + 1, vision_width),
        "visual.proj": (vision_width, embed_dim),
        "visual.conv1.weight": (vision_width, 3, patch_size, patch_size),
        "visual.ln_pre.weight": (vision_width,),
        "visual.ln_pre.bias": (vision_width,),
    }

    def blocks(prefix: str, layers: int, width: int) -> None:
        hidden = int(width * mlp_ratio)
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            shapes.update({
                p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                p + "mlp.c_fc.weight": (hidden, width), p + "mlp.c_fc.bias": (hidden,),
                p + "mlp.c_proj.weight": (width, hidden), p + "mlp.c_proj.bias": (width,),
            })

    blocks("visual.", vision_layers, vision_width)
    shapes.update({"visual.ln_post.weight": (vision_width,), "visual.ln_post.bias": (vision_width,)})
    blocks("", text_layers, text_width)
    shapes.update({"token_embedding.weight": (vocab_size, text_width),
                   "ln_final.weight": (text_width,), "ln_final.bias": (text_width,)})
    return shapes


def check_clip_state_dict(state: Mapping[str, torch.Tensor], config: "CLIPConfig") -> None:
    """ConfigError unless `state` has exactly the parameters of `CLIPModel(config)` with their shapes
    (checked on the meta device: nothing is allocated)."""
    transformers = _clip_classes()
    with torch.device("meta"):
        model = transformers.CLIPModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{k} {list(state[k].shape)} vs {list(expected[k])}" for k in sorted(set(expected) & set(state))
             if tuple(state[k].shape) != expected[k]]
    problems = []
    for label, items in (("missing model parameter(s)", missing), ("unexpected parameter(s)", extra),
                         ("shape mismatch(es) (checkpoint vs config)", wrong)):
        if items:
            problems.append(f"{len(items)} {label}: " + ", ".join(items[:5]) + (" ..." if len(items) > 5 else ""))
    if problems:
        raise ConfigError("the remapped checkpoint does not fit the CLIP config: " + "; ".join(problems))


def _load_openclip_checkpoint(src: Path) -> dict[str, torch.Tensor]:
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or it holds pickled objects beyond tensors and containers
        raise ConfigError(f"convert-reward hpsv2: cannot read '{src}' as a torch checkpoint with "
                          f"weights_only=True ({type(e).__name__}: {e})") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"convert-reward hpsv2: '{src}' holds no state dict of tensors (expected "
                          "ckpt['state_dict'] as in HPS_v2.1_compressed.pt)")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def convert_hpsv2(src: Path, dst: Path, base: Path | None) -> Path:
    """Convert the HPS v2(.1) open_clip ViT-H-14 checkpoint `src` into the CLIPModel folder `dst`.

    `base`: a CLIP ViT-H-14 transformers folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) giving
    `config.json` (used with `hidden_act="gelu"`: ViT-H-14 is not a quick-gelu model), the tokenizer and
    `preprocessor_config.json`; its weights are not read. Writes `model.safetensors` (float32), `config.json`
    and the tokenizer / preprocessor files. ConfigError if a checkpoint key has no mapping, a model
    parameter is missing, or shapes disagree with the base config; nothing is written then.
    """
    src, dst = Path(src), Path(dst)
    if base is None:
        raise ConfigError(f"convert-reward hpsv2 needs --base: {_HPSV2_HINT}")
    base = Path(base)
    if not base.is_dir():
        raise ConfigError(f"convert-reward hpsv2: --base '{base}' is not a folder; {_HPSV2_HINT}")
    _read_config("hpsv2", base, _HPSV2_HINT)
    _check_tokenizer_files("hpsv2", base, _HPSV2_HINT)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"convert-reward hpsv2: destination '{dst}' is not an empty folder; choose a new folder")
    transformers = _clip_classes()
    config = transformers.CLIPConfig.from_pretrained(str(base))
    config.text_config.hidden_act = "gelu"
    config.vision_config.hidden_act = "gelu"
    state = _load_openclip_checkpoint(src)
    try:
        remapped = remap_openclip_state_dict(state)
        check_clip_state_dict(remapped, config)
    except ConfigError as e:
        raise ConfigError(f"convert-reward hpsv2: '{src}' with base '{base}': {e}") from e
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in remapped.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(dst))
    for name in TOKENIZER_FILES + PREPROCESSOR_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, dst / name)
    return dst


# --------------------------------------------------------------------------------------------
# Tiny random-weight folders (tests, demos)
# --------------------------------------------------------------------------------------------

#: Tiny CLIP sizes: 32-wide, 2-layer towers, 32×32 images in 8×8 patches, 16-d embeddings.
TINY_CLIP = dict(width=32, layers=2, heads=4, mlp=64, image_size=32, patch_size=8, embed_dim=16, context=77)


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0–255 (the GPT-2 / CLIP table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_clip_tokenizer() -> Any:
    """A CLIP tokenizer with the real layout minus merges: 256 byte characters, the same with `</w>`,
    then `<|startoftext|>` (512) and `<|endoftext|>` (513, the largest id, as in CLIP). Every text
    tokenizes (one token per byte)."""
    transformers = _clip_classes()
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    # transformers 5: pass vocab / merges themselves (vocab_file= is ignored, giving a 2-token vocabulary)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_config(*, legacy_eos: bool = False) -> "CLIPConfig":
    """The tiny `CLIPConfig` (`TINY_CLIP`, exact gelu). `legacy_eos`: the text config's ids are the old
    defaults (bos 0, pad 1, eos 2, as in older CLIP folders), so CLIPModel pools the text at the argmax
    token id like open_clip; otherwise at the first `<|endoftext|>` (513)."""
    transformers = _clip_classes()
    t = TINY_CLIP
    ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2) if legacy_eos else dict(
        bos_token_id=512, pad_token_id=513, eos_token_id=513)
    return transformers.CLIPConfig(
        projection_dim=t["embed_dim"],
        text_config=dict(vocab_size=514, hidden_size=t["width"], intermediate_size=t["mlp"],
                         num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                         max_position_embeddings=t["context"], hidden_act="gelu", **ids),
        vision_config=dict(hidden_size=t["width"], intermediate_size=t["mlp"], num_hidden_layers=t["layers"],
                           num_attention_heads=t["heads"], image_size=t["image_size"], patch_size=t["patch_size"],
                           hidden_act="gelu"))


def _save_processor_files(folder: Path) -> None:
    """The tiny tokenizer and a CLIP image processor at the tiny size, saved in `folder`."""
    transformers = _clip_classes()
    size = TINY_CLIP["image_size"]
    tiny_clip_tokenizer().save_pretrained(str(folder))
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(folder))


def write_tiny_clip_base(folder: str | Path, *, legacy_eos: bool = True) -> Path:
    """A tiny CLIP "base" folder like the one `convert_hpsv2` reads: config, tokenizer and preprocessor
    files, no weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_clip_config(legacy_eos=legacy_eos).save_pretrained(str(folder))
    _save_processor_files(folder)
    return folder


def write_tiny_clip(folder: str | Path, seed: int = 0, *, logit_scale: float | None = None) -> Path:
    """A tiny random `CLIPModel` folder (weights, config, tokenizer, preprocessor) written with
    `save_pretrained`; deterministic in `seed`."""
    transformers = _clip_classes()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(tiny_clip_config())
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(str(folder))
    _save_processor_files(folder)
    return folder


def write_tiny_pickscore(folder: str | Path) -> Path:
    """A tiny `pickscore` folder (the real layout: CLIPModel + tokenizer + preprocessor); logit scale 100 as in
    trained CLIP models."""
    return write_tiny_clip(folder, seed=1, logit_scale=math.log(100.0))


def write_tiny_clipscore(folder: str | Path) -> Path:
    """A tiny `clipscore` folder (a CLIPModel folder)."""
    return write_tiny_clip(folder, seed=2)


def tiny_openclip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random open_clip-layout state dict at the tiny sizes (`TINY_CLIP`, vocabulary 514), scaled so the
    towers' outputs are well conditioned; deterministic in `seed`."""
    t = TINY_CLIP
    shapes = openclip_vit_shapes(vision_layers=t["layers"], vision_width=t["width"], patch_size=t["patch_size"],
                                 image_size=t["image_size"], text_layers=t["layers"], text_width=t["width"],
                                 context_length=t["context"], vocab_size=514, embed_dim=t["embed_dim"],
                                 mlp_ratio=t["mlp"] / t["width"])
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if key == "logit_scale":
            value = torch.tensor(math.log(100.0))
        elif re.search(r"(^|\.)ln_\w+\.weight$", key):  # layer norm gains
            value = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            value = 0.05 * noise
        elif "embedding" in key:  # class, positional and token embeddings
            value = 0.5 * noise
        elif key in _TRANSPOSED_KEYS:  # projections (width, embed), used as x @ P
            value = noise / math.sqrt(shape[0])
        else:  # Linear weights (out, in) and the patch convolution (width, 3, p, p)
            value = noise / math.sqrt(math.prod(shape[1:]))
        state[key] = value
    return state


def write_tiny_openclip_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """`{"state_dict": tiny_openclip_state_dict(seed)}` saved with `torch.save` at `path` (the layout of
    HPS_v2.1_compressed.pt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": tiny_openclip_state_dict(seed)}, path)
    return path


def write_tiny_hpsv2(folder: str | Path, seed: int = 3) -> Path:
    """A tiny `hpsv2` folder made the real way: a tiny open_clip checkpoint `folder/HPS_tiny.pt` and base
    `folder/base` converted by `convert_hpsv2` into `folder/hpsv2` (returned)."""
    folder = Path(folder)
    checkpoint = write_tiny_openclip_checkpoint(folder / "HPS_tiny.pt", seed)
    base = write_tiny_clip_base(folder / "base")
    return convert_hpsv2(checkpoint, folder / "hpsv2", base)


def write_tiny_aesthetic(folder: str | Path, seed: int = 4) -> Path:
    """A tiny `aesthetic` folder: a tiny CLIPModel folder with a random head `sac+logos+ava1-l14-linearMSE.pth`
    (sizes 16 → 32 → 16 → 8 → 4 → 1, saved as a plain state dict like the published file)."""
    folder = write_tiny_clip(folder, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead((TINY_CLIP["embed_dim"], 32, 16, 8, 4, 1))
    torch.save(head.state_dict(), folder / AESTHETIC_HEAD_FILES[0])
    return folder
