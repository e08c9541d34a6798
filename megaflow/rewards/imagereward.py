"""ImageReward (Xu et al. 2023, THUDM/ImageReward v1.0) hosted on transformers, and its converter.

The network: BLIP's ViT-L/16 at 224 px encodes the image; a BERT-base text encoder whose
layers cross-attend to all image tokens encodes the prompt; the hidden state of its first token
([CLS]) goes through a 5-layer head `768→1024→128→64→16→1` whose layers are purely linear (the
published head has its ReLUs commented out; dropouts 0.2, 0.2, 0.1 sit after the first three
layers and do nothing at inference), and the raw value `r` is standardised with ImageReward's
constants: `(r − 0.16717362830052426) / 1.0333394966054072`.

How the original feeds it, and how this module does the same:

- text: BERT `bert-base-uncased` tokenizer with `[DEC]` (bos) and `[ENC]` added (vocabulary
  30524), `padding="max_length", truncation=True, max_length=35`; the ids go in as they are
  (the first token stays [CLS], it is *not* replaced by [ENC]), with the padding mask for
  self-attention and an all-ones mask over the image tokens for cross-attention;
- image: `Resize(224, bicubic)` of the shortest side, `CenterCrop(224)`, CLIP mean/std (the
  same numbers as BLIP's), done here by `preprocess_images` in torch (antialiased bicubic);
- the ViT is `BlipVisionModel` (its final LayerNorm is the timm ViT's `norm`; eps 1e-6 as in
  BLIP's ViT, not transformers' default 1e-5), the text encoder `BlipTextModel` with
  `is_decoder=True` in its config (that is what makes transformers build the cross-attention
  layers) but called with `is_decoder=False`, so self-attention is bidirectional as in BLIP's
  `BertModel(mode="multimodal")`; eps 1e-12; exact-erf GELU in both towers.

`convert_imagereward` turns the published `ImageReward.pt` into a folder this reward loads:
`model.safetensors` + `config.json` (`BlipForImageTextRetrieval`), the tokenizer files,
`preprocessor_config.json`, `imagereward_head.safetensors` (the head) and `imagereward.json`
(a record of the conversion). `write_tiny_imagereward` writes a tiny random checkpoint in the
published key layout and converts it, for tests.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from megaflow.errors import ConfigError
from megaflow.rewards.base import register_reward
from megaflow.rewards.model import FrameReward, reward_folder
from megaflow.rewards.preprocess import CLIP_MEAN, CLIP_STD, preprocess_images, read_image_settings

__all__ = [
    "DROPPED_KEYS",
    "FILLED_KEYS",
    "HEAD_FILE",
    "IMAGE_SIZE",
    "Conversion",
    "ImageRewardHead",
    "ImageRewardReward",
    "MAX_LENGTH",
    "REWARD_MEAN",
    "REWARD_STD",
    "blip_config_from_checkpoint",
    "checkpoint_name",
    "convert_imagereward",
    "map_checkpoint_key",
    "plan_conversion",
    "tiny_checkpoint_keys",
    "write_tiny_imagereward",
]

log = logging.getLogger(__name__)

#: ImageReward's standardisation of the head's raw output: `(r − REWARD_MEAN) / REWARD_STD`.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: Prompt length in tokens (padded and truncated to it, [CLS] and [SEP] included).
MAX_LENGTH = 35
#: The published model's input side in pixels.
IMAGE_SIZE = 224
#: The head's weights in a converted folder (keys `layers.{0,2,4,6,7}.{weight,bias}`).
HEAD_FILE = "imagereward_head.safetensors"
#: The conversion record in a converted folder.
RECORD_FILE = "imagereward.json"
#: Head layers that carry weights; the others (1, 3, 5) are dropouts.
HEAD_LINEARS = (0, 2, 4, 6, 7)
HEAD_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
#: Tokens BLIP adds to the BERT vocabulary (in this order: ids 30522 and 30523 for bert-base-uncased).
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"
#: Head width transformers uses when no checkpoint or config says otherwise (ViT-L and BERT-base both use 64).
HEAD_DIM = 64
VISION_EPS, TEXT_EPS = 1e-6, 1e-12

_HINT = ("convert the published ImageReward.pt once with `megaflow convert-reward imagereward "
         "ImageReward.pt DST --base BERT_FOLDER` (BERT_FOLDER: the bert-base-uncased tokenizer files) "
         "and set path to DST")

# --------------------------------------------------------------------------- key map
_N = r"(\d+)"
_WB = r"(weight|bias)"
#: ImageReward.pt key (full match) -> key of transformers' BlipForImageTextRetrieval.
_MODEL_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), t) for p, t in [
        # BLIP's timm-style ViT -> BlipVisionModel
        (r"blip\.visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
        (r"blip\.visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
        (rf"blip\.visual_encoder\.patch_embed\.proj\.{_WB}", r"vision_model.embeddings.patch_embedding.\1"),
        (rf"blip\.visual_encoder\.blocks\.{_N}\.norm1\.{_WB}", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
        (rf"blip\.visual_encoder\.blocks\.{_N}\.attn\.qkv\.{_WB}", r"vision_model.encoder.layers.\1.self_attn.qkv.\2"),
        (rf"blip\.visual_encoder\.blocks\.{_N}\.attn\.proj\.{_WB}",
         r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
        (rf"blip\.visual_encoder\.blocks\.{_N}\.norm2\.{_WB}", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
        (rf"blip\.visual_encoder\.blocks\.{_N}\.mlp\.(fc1|fc2)\.{_WB}", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
        (rf"blip\.visual_encoder\.norm\.{_WB}", r"vision_model.post_layernorm.\1"),
        # BLIP's med BertModel -> BlipTextModel: the same names
        (r"blip\.text_encoder\.embeddings\.(word_embeddings|position_embeddings)\.weight",
         r"text_encoder.embeddings.\1.weight"),
        (rf"blip\.text_encoder\.embeddings\.LayerNorm\.{_WB}", r"text_encoder.embeddings.LayerNorm.\1"),
        (rf"blip\.text_encoder\.encoder\.layer\.{_N}\.(attention|crossattention)\.self\.(query|key|value)\.{_WB}",
         r"text_encoder.encoder.layer.\1.\2.self.\3.\4"),
        (rf"blip\.text_encoder\.encoder\.layer\.{_N}\.(attention|crossattention)\.output\.(dense|LayerNorm)\.{_WB}",
         r"text_encoder.encoder.layer.\1.\2.output.\3.\4"),
        (rf"blip\.text_encoder\.encoder\.layer\.{_N}\.intermediate\.dense\.{_WB}",
         r"text_encoder.encoder.layer.\1.intermediate.dense.\2"),
        (rf"blip\.text_encoder\.encoder\.layer\.{_N}\.output\.(dense|LayerNorm)\.{_WB}",
         r"text_encoder.encoder.layer.\1.output.\2.\3"),
        # contrastive projections: kept (BlipForImageTextRetrieval has them), unused by the score
        (rf"blip\.(vision_proj|text_proj)\.{_WB}", r"\1.\2"),
    ]
]
#: ImageReward.pt head key -> key in HEAD_FILE.
_HEAD_RULE = (re.compile(rf"mlp\.layers\.({'|'.join(map(str, HEAD_LINEARS))})\.{_WB}"), r"layers.\1.\2")

#: Checkpoint keys that ImageReward does not use to score, dropped on purpose (pattern -> why).
#: Only the first is in the published ImageReward.pt; the others are modules of BLIP's full
#: pretraining model, listed so that a checkpoint saved with them still converts.
DROPPED_KEYS: dict[str, str] = {
    r"blip\.text_encoder\.embeddings\.position_ids": "buffer arange(max positions); transformers rebuilds it",
    rf"blip\.text_encoder\.pooler\.dense\.{_WB}": "BERT pooler; ImageReward reads the [CLS] hidden state",
    r"blip\.(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\..+":
        "BLIP momentum encoders (pretraining only)",
    r"blip\.(image_queue|text_queue|idx_queue|queue_ptr|ptr_queue|temp)": "BLIP contrastive queues / temperature",
    r"blip\.itm_head\..+": "BLIP image-text-matching head, not used by ImageReward",
    r"blip\.text_decoder\..+": "BLIP captioning decoder, not used by ImageReward",
}
_DROPPED = [(re.compile(p), why) for p, why in DROPPED_KEYS.items()]

#: Keys of BlipForImageTextRetrieval that the score never reads, written as zeros when the
#: checkpoint has no value for them (the ITM head always; the projections only if absent).
FILLED_KEYS = ("itm_head.weight", "itm_head.bias", "vision_proj.weight", "vision_proj.bias",
               "text_proj.weight", "text_proj.bias")


def map_checkpoint_key(key: str) -> tuple[str, str] | None:
    """Where ImageReward.pt's `key` goes: `("model", hf_key)`, `("head", head_key)`,
    `("dropped", reason)`, or None when no rule knows it."""
    for pattern, target in _MODEL_RULES:
        if pattern.fullmatch(key):
            return "model", pattern.sub(target, key)
    pattern, target = _HEAD_RULE
    if pattern.fullmatch(key):
        return "head", pattern.sub(target, key)
    for pattern, why in _DROPPED:
        if pattern.fullmatch(key):
            return "dropped", why
    return None


# --------------------------------------------------------------------------- head
class ImageRewardHead(nn.Module):
    """ImageReward's head: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1),
    Linear, Linear — no activations; `dims` are the widths `[in, h1, h2, h3, h4, 1]`."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        if len(dims) != len(HEAD_LINEARS) + 1:
            raise ValueError(f"the head needs {len(HEAD_LINEARS) + 1} widths, got {dims}")
        layers: list[nn.Module] = []
        widths = iter(zip(dims[:-1], dims[1:]))
        for i in range(max(HEAD_LINEARS) + 1):
            if i in HEAD_LINEARS:
                n_in, n_out = next(widths)
                layers.append(nn.Linear(n_in, n_out))
            else:
                layers.append(nn.Dropout(HEAD_DROPOUTS[i]))
        self.layers = nn.Sequential(*layers)

    @staticmethod
    def dims_of(state: Mapping[str, torch.Tensor]) -> list[int]:
        """The widths of the head whose weights are `state` (`layers.N.weight` keys)."""
        try:
            shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in HEAD_LINEARS]
        except KeyError as e:
            raise ConfigError(f"ImageReward head: weight {e.args[0]} is missing") from e
        dims = [shapes[0][1]] + [s[0] for s in shapes]
        if any(len(s) != 2 for s in shapes) or any(a[0] != b[1] for a, b in zip(shapes, shapes[1:])) or dims[-1] != 1:
            raise ConfigError(f"ImageReward head: layer shapes {shapes} do not chain to one output")
        return dims

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw rewards `[N]` of [CLS] features `[N, D]`."""
        return self.layers(features).squeeze(-1)


# --------------------------------------------------------------------------- config
def _heads_from_base(base: Path | None) -> dict[str, tuple[int | None, int | None]]:
    """{"vision": (heads, width), "text": (heads, width)} as far as `base/config.json` or
    `base/med_config.json` names them: a BLIP config names both towers, a BERT config
    (bert-base-uncased's, ImageReward's med_config.json) the text encoder."""
    named: dict[str, tuple[int | None, int | None]] = {"vision": (None, None), "text": (None, None)}
    if base is None:
        return named
    for name in ("config.json", "med_config.json"):
        path = base / name
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"convert-reward imagereward: cannot read {path}: {e}") from e
        if cfg.get("model_type") == "blip":
            for tower in ("vision", "text"):
                sub = cfg.get(f"{tower}_config") or {}
                named[tower] = (sub.get("num_attention_heads"), sub.get("hidden_size"))
        else:
            named["text"] = (cfg.get("num_attention_heads"), cfg.get("hidden_size"))
        break
    return named


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConfigError(f"convert-reward imagereward: the checkpoint has no {key!r}, which ImageReward needs")
    return tuple(state[key].shape)


def _count(state: Mapping[str, Any], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found or found != set(range(max(found) + 1)):
        raise ConfigError(f"convert-reward imagereward: layers under {prefix!r} are missing or not numbered "
                          f"0..N-1 (found {sorted(found)})")
    return max(found) + 1


def _heads(width: int, named: tuple[int | None, int | None], what: str) -> int:
    heads, named_width = named
    if named_width is not None and int(named_width) != width:
        raise ConfigError(f"convert-reward imagereward: the --base config describes a {what} {named_width} wide, "
                          f"the checkpoint's is {width} wide")
    heads = int(heads) if heads is not None else width // HEAD_DIM
    if heads < 1 or width % heads:
        raise ConfigError(f"convert-reward imagereward: {what} width {width} does not split into {heads} heads; "
                          "give --base a folder whose config.json names num_attention_heads")
    return heads


def blip_config_from_checkpoint(state: Mapping[str, torch.Tensor], base: Path | None = None):
    """The `BlipConfig` of ImageReward's network with the sizes of `state` (ImageReward.pt keys).

    Widths, depths, vocabulary, patch and image size come from the tensor shapes; the head counts
    from `base` (see `_heads_from_base`), else width / 64 (ViT-L: 16, BERT-base: 12). The rest is
    ImageReward's architecture: LayerNorm eps 1e-6 (ViT) and 1e-12 (BERT), exact GELU.
    """
    from transformers import BlipConfig

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    width = _shape(state, v + "cls_token")[-1]
    patch = _shape(state, v + "patch_embed.proj.weight")[-1]
    positions = _shape(state, v + "pos_embed")[1]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ConfigError(f"convert-reward imagereward: {positions - 1} patch positions do not form a square grid")
    vocab, hidden = _shape(state, t + "embeddings.word_embeddings.weight")
    cross_in = _shape(state, t + "encoder.layer.0.crossattention.self.key.weight")[1]
    if cross_in != width:
        raise ConfigError(f"convert-reward imagereward: cross-attention reads width {cross_in}, "
                          f"but the ViT is {width} wide")
    named = _heads_from_base(base)
    proj = tuple(state["blip.vision_proj.weight"].shape) if "blip.vision_proj.weight" in state else (256,)
    return BlipConfig(
        vision_config=dict(
            hidden_size=width, intermediate_size=_shape(state, v + "blocks.0.mlp.fc1.weight")[0],
            num_hidden_layers=_count(state, v + "blocks."),
            num_attention_heads=_heads(width, named["vision"], "ViT"),
            image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=VISION_EPS,
        ),
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width,
            intermediate_size=_shape(state, t + "encoder.layer.0.intermediate.dense.weight")[0],
            num_hidden_layers=_count(state, t + "encoder.layer."),
            num_attention_heads=_heads(hidden, named["text"], "BERT"),
            max_position_embeddings=_shape(state, t + "embeddings.position_embeddings.weight")[0],
            hidden_act="gelu", layer_norm_eps=TEXT_EPS, is_decoder=True,
            pad_token_id=0, bos_token_id=vocab - 2, sep_token_id=None, eos_token_id=None,  # set from the tokenizer
        ),
        image_text_hidden_size=proj[0],
    )


def _target_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of `BlipForImageTextRetrieval(config)` and its shape (built on the meta device)."""
    from transformers import BlipForImageTextRetrieval

    try:
        with torch.device("meta"):
            model = BlipForImageTextRetrieval(config)
    except ValueError as e:
        raise ConfigError(f"convert-reward imagereward: invalid network configuration: {e}") from e
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


# --------------------------------------------------------------------------- converter
def _load_checkpoint(src: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ConfigError(f"convert-reward imagereward: cannot read '{src}' as a torch checkpoint of tensors "
                          f"(torch.load weights_only=True): {type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise ConfigError(f"convert-reward imagereward: '{src}' holds no state dict (got {type(obj).__name__})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"convert-reward imagereward: '{src}' has non-tensor entries {bad[:5]}")
    return state


def _load_tokenizer(base: Path | None, vocab: int):
    from transformers import BertTokenizer

    if base is None:
        raise ConfigError("convert-reward imagereward needs --base: a folder with the bert-base-uncased tokenizer "
                          "files (vocab.txt, or tokenizer.json + tokenizer_config.json), e.g. a download of "
                          "google-bert/bert-base-uncased; its config.json, if any, gives the head count")
    if not base.is_dir():
        raise ConfigError(f"convert-reward imagereward: --base '{base}' is not a folder")
    if not any((base / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise ConfigError(f"convert-reward imagereward: --base '{base}' has no BERT tokenizer (vocab.txt or "
                          "tokenizer.json of bert-base-uncased)")
    try:
        tok = BertTokenizer.from_pretrained(str(base))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"convert-reward imagereward: cannot load the BERT tokenizer in '{base}': {e}") from e
    # as BLIP's init_tokenizer: [DEC] as bos, [ENC] as the additional special token
    tok.add_special_tokens({"bos_token": DEC_TOKEN})
    tok.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    if len(tok) != vocab:
        raise ConfigError(f"convert-reward imagereward: the tokenizer in '{base}' has {len(tok)} tokens with "
                          f"{DEC_TOKEN} and {ENC_TOKEN} added, the checkpoint's text encoder {vocab}; "
                          "--base must hold the bert-base-uncased tokenizer")
    tok.model_max_length = MAX_LENGTH
    return tok


def _preprocessor_config(size: int) -> dict[str, Any]:
    """ImageReward's torchvision transform as a CLIP image-processor config: shortest side to
    `size` (bicubic), centre crop `size`², CLIP mean/std. (BLIP's processor would warp to a square.)"""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }


_VISION_BACK = [("vision_model.embeddings.class_embedding", "cls_token"),
                ("vision_model.embeddings.position_embedding", "pos_embed"),
                ("vision_model.embeddings.patch_embedding.", "patch_embed.proj."),
                ("vision_model.encoder.layers.", "blocks."), ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
                ("self_attn.qkv.", "attn.qkv."), ("self_attn.projection.", "attn.proj."),
                ("vision_model.post_layernorm.", "norm.")]


def checkpoint_name(hf_key: str) -> str:
    """The ImageReward.pt key that `map_checkpoint_key` sends to the transformers key `hf_key`."""
    if hf_key.startswith("vision_model."):
        name = hf_key
        for new, old in _VISION_BACK:
            name = name.replace(new, old)
        return "blip.visual_encoder." + name
    return "blip." + hf_key


class Conversion:
    """What converting one checkpoint makes: `config` (BlipConfig), `model` (transformers keys ->
    tensors), `head` (head keys -> tensors), `dropped` (checkpoint key -> why), `filled` (keys
    written as zeros), `head_dims`."""

    def __init__(self, config, model, head, dropped, filled, head_dims) -> None:
        self.config, self.model, self.head = config, model, head
        self.dropped, self.filled, self.head_dims = dropped, filled, head_dims


def plan_conversion(state: Mapping[str, torch.Tensor], base: Path | None = None) -> Conversion:
    """Map the ImageReward.pt `state` onto BlipForImageTextRetrieval + the head, checking that
    every key maps or is a known unused one and that every model weight is there with its shape
    (works on meta tensors too: nothing is copied)."""
    model_sd: dict[str, torch.Tensor] = {}
    head_sd: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        where = map_checkpoint_key(key)
        if where is None:
            unmapped.append(key)
        elif where[0] == "model":
            model_sd[where[1]] = value
        elif where[0] == "head":
            head_sd[where[1]] = value
        else:
            dropped[key] = where[1]
    if unmapped:
        raise ConfigError(f"convert-reward imagereward: {len(unmapped)} checkpoint key(s) have no place in the "
                          f"converted model and are not known to be unused: {', '.join(sorted(unmapped)[:20])}")
    ids = state.get("blip.text_encoder.embeddings.position_ids")
    if ids is not None and not ids.is_meta and not torch.equal(ids.flatten(), torch.arange(ids.numel())):
        raise ConfigError("convert-reward imagereward: blip.text_encoder.embeddings.position_ids is not 0, 1, 2, ...; "
                          "dropping it would change the model")

    config = blip_config_from_checkpoint(state, base)
    targets = _target_shapes(config)
    filled = []
    dtype = state["blip.visual_encoder.cls_token"].dtype
    for key in FILLED_KEYS:
        if key in targets and key not in model_sd:
            model_sd[key] = torch.zeros(targets[key], dtype=dtype)
            filled.append(key)
    missing = sorted(set(targets) - set(model_sd))
    if missing:
        raise ConfigError(f"convert-reward imagereward: the checkpoint lacks {len(missing)} weight(s) the model "
                          f"needs: {', '.join(checkpoint_name(k) for k in missing[:20])}")
    extra = sorted(set(model_sd) - set(targets))
    if extra:
        raise ConfigError("convert-reward imagereward: the checkpoint has weights beyond the configured depth: "
                          f"{', '.join(checkpoint_name(k) for k in extra[:20])}")
    wrong = [f"{checkpoint_name(k)} {tuple(v.shape)} (expected {targets[k]})"
             for k, v in model_sd.items() if tuple(v.shape) != targets[k]]
    if wrong:
        raise ConfigError(f"convert-reward imagereward: shape mismatch: {'; '.join(wrong[:10])}")
    if len(head_sd) != 2 * len(HEAD_LINEARS):
        have = sorted(f"mlp.{k}" for k in head_sd)
        raise ConfigError(f"convert-reward imagereward: the head needs mlp.layers.N.weight and .bias for N in "
                          f"{HEAD_LINEARS}, the checkpoint has {have}")
    dims = ImageRewardHead.dims_of(head_sd)
    if dims[0] != config.text_config.hidden_size:
        raise ConfigError(f"convert-reward imagereward: the head reads {dims[0]} features, the text encoder gives "
                          f"{config.text_config.hidden_size}")
    return Conversion(config, model_sd, head_sd, dropped, filled, dims)


def convert_imagereward(src: Path, dst: Path, base: Path | None) -> Path:
    """Convert ImageReward's `src` (`ImageReward.pt`) into the folder `dst`; `base` holds the
    bert-base-uncased tokenizer (and optionally a config naming the head counts). Returns `dst`.

    Every checkpoint key must map to the transformers model or the head, or be one of
    `DROPPED_KEYS`; every model key the score reads must come from the checkpoint with its shape.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"convert-reward imagereward: destination '{dst}' is not empty; choose a new folder")
    base = None if base is None else Path(base)
    state = _load_checkpoint(src)
    plan = plan_conversion(state, base)
    config = plan.config
    tokenizer = _load_tokenizer(base, config.text_config.vocab_size)
    text_cfg = config.text_config
    text_cfg.pad_token_id, text_cfg.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    text_cfg.sep_token_id = text_cfg.eos_token_id = tokenizer.sep_token_id
    model_sd, head_sd, dropped, filled, dims = plan.model, plan.head, plan.dropped, plan.filled, plan.head_dims

    dst.mkdir(parents=True, exist_ok=True)
    for name, tensors in (("model.safetensors", model_sd), (HEAD_FILE, head_sd)):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / name), metadata={"format": "pt"})
    config.architectures = ["BlipForImageTextRetrieval"]
    config.save_pretrained(str(dst))
    tokenizer.save_pretrained(str(dst))
    size = config.vision_config.image_size
    (dst / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(size), indent=2) + "\n")
    record = {
        "kind": "imagereward", "source": src.name, "reward_mean": REWARD_MEAN, "reward_std": REWARD_STD,
        "max_length": MAX_LENGTH, "head_dims": dims, "dropped": dropped, "filled_with_zeros": filled,
    }
    (dst / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log.info("imagereward: wrote %s (%d weights, dropped %d unused keys, zero-filled %s)",
             dst, len(model_sd), len(dropped), ", ".join(filled) or "none")
    return dst


# --------------------------------------------------------------------------- reward
@register_reward("imagereward")
class ImageRewardReward(FrameReward):
    """ImageReward v1.0 on the frames `frames` picks; the video's score is their mean.

    Options: `path` (a folder written by `megaflow convert-reward imagereward`), `frames`
    (`first | middle | last | all | uniform:K`, default `uniform:4`), `device`, `dtype`
    (`float32 | bfloat16 | float16`; the head always runs in float32, as the original casts
    the [CLS] feature to float), `batch_size` (images per forward). Scores are ImageReward's
    standardised values (about −2..2, higher is better).
    """

    name = "imagereward"

    def __init__(self, path: str | None = None, *, frames: str = "uniform:4", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 16) -> None:
        super().__init__(frames=frames, device=device, dtype=dtype, batch_size=batch_size)
        from safetensors.torch import load_file
        from transformers import BertTokenizer, BlipForImageTextRetrieval

        folder = reward_folder(self.name, path, _HINT)
        missing = [f for f in ("config.json", "model.safetensors", HEAD_FILE) if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"reward 'imagereward': '{folder}' is not a converted ImageReward folder "
                              f"(no {', '.join(missing)}); {_HINT}")
        try:
            model, info = BlipForImageTextRetrieval.from_pretrained(
                str(folder), dtype=self.dtype, output_loading_info=True)
            self.tokenizer = BertTokenizer.from_pretrained(str(folder))
            head_state = load_file(str(folder / HEAD_FILE))
        except (OSError, ValueError) as e:
            raise ConfigError(f"reward 'imagereward': cannot load '{folder}': {e}; {_HINT}") from e
        problems = {k: v for k, v in info.items()
                    if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if problems:
            raise ConfigError(f"reward 'imagereward': '{folder}' does not match its config: {problems}; {_HINT}")
        self.vision = model.vision_model.eval().requires_grad_(False).to(self.device)
        self.text = model.text_encoder.eval().requires_grad_(False).to(self.device)
        del model
        self.head = ImageRewardHead(ImageRewardHead.dims_of(head_state))
        self.head.load_state_dict(head_state)
        self.head = self.head.eval().requires_grad_(False).to(self.device)
        self.settings = read_image_settings(folder, IMAGE_SIZE)

    def modules(self) -> list[nn.Module]:
        return [self.vision, self.text, self.head]

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """ImageReward's text input: ids and padding mask `[N, 35]` on the model's device."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt")
        device = self.model_device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def raw_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The head's raw output `r` `[N]` (float32) for images `[N, 3, H, W]` in [0, 1]."""
        pixels = preprocess_images(images, self.settings).to(self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        text = self.encode_text(prompts)
        out = self.text(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, is_decoder=False)
        return self.head(out.last_hidden_state[:, 0, :].float())

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """ImageReward scores `[N]` (float32) of images `[N, 3, H, W]` in [0, 1] with their prompts."""
        return (self.raw_scores(images, prompts) - REWARD_MEAN) / REWARD_STD


# --------------------------------------------------------------------------- tiny model
#: Sizes of the tiny checkpoint: ViT 128 wide (2 heads of 64, as the width/64 rule gives), BERT
#: 64 wide with 2 heads (named by the tiny base's config.json, as bert-base-uncased's names 12).
TINY = dict(vision_width=128, vision_layers=2, patch=8, image=32, text_width=64, text_layers=2, text_heads=2,
            text_intermediate=128, max_positions=48, proj=16, head=(64, 48, 24, 12, 6, 1))
_TINY_WORDS = ("a an the of in on and red green blue yellow circle square triangle moving left right up down "
               "cat dog photo").split()


def tiny_checkpoint_keys(sizes: Mapping[str, Any] = TINY, vocab: int | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an ImageReward.pt with `sizes` (the published layout; see TINY's fields)."""
    vw, tw, cw = sizes["vision_width"], sizes["text_width"], sizes["vision_width"]
    vocab = vocab if vocab is not None else len(_TINY_WORDS) + 5 + 2
    grid = sizes["image"] // sizes["patch"]
    shapes: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, vw),
        "blip.visual_encoder.pos_embed": (1, grid * grid + 1, vw),
        "blip.visual_encoder.patch_embed.proj.weight": (vw, 3, sizes["patch"], sizes["patch"]),
        "blip.visual_encoder.patch_embed.proj.bias": (vw,),
    }
    for i in range(sizes["vision_layers"]):
        p = f"blip.visual_encoder.blocks.{i}."
        for name, shape in [("norm1.weight", (vw,)), ("norm1.bias", (vw,)), ("attn.qkv.weight", (3 * vw, vw)),
                            ("attn.qkv.bias", (3 * vw,)), ("attn.proj.weight", (vw, vw)), ("attn.proj.bias", (vw,)),
                            ("norm2.weight", (vw,)), ("norm2.bias", (vw,)), ("mlp.fc1.weight", (4 * vw, vw)),
                            ("mlp.fc1.bias", (4 * vw,)), ("mlp.fc2.weight", (vw, 4 * vw)), ("mlp.fc2.bias", (vw,))]:
            shapes[p + name] = shape
    shapes["blip.visual_encoder.norm.weight"] = (vw,)
    shapes["blip.visual_encoder.norm.bias"] = (vw,)
    t = "blip.text_encoder."
    shapes[t + "embeddings.position_ids"] = (1, sizes["max_positions"])
    shapes[t + "embeddings.word_embeddings.weight"] = (vocab, tw)
    shapes[t + "embeddings.position_embeddings.weight"] = (sizes["max_positions"], tw)
    shapes[t + "embeddings.LayerNorm.weight"] = (tw,)
    shapes[t + "embeddings.LayerNorm.bias"] = (tw,)
    for i in range(sizes["text_layers"]):
        p = f"{t}encoder.layer.{i}."
        for part, kv_in in (("attention", tw), ("crossattention", cw)):
            shapes[f"{p}{part}.self.query.weight"] = (tw, tw)
            shapes[f"{p}{part}.self.query.bias"] = (tw,)
            for kv in ("key", "value"):
                shapes[f"{p}{part}.self.{kv}.weight"] = (tw, kv_in)
                shapes[f"{p}{part}.self.{kv}.bias"] = (tw,)
            shapes[f"{p}{part}.output.dense.weight"] = (tw, tw)
            shapes[f"{p}{part}.output.dense.bias"] = (tw,)
            shapes[f"{p}{part}.output.LayerNorm.weight"] = (tw,)
            shapes[f"{p}{part}.output.LayerNorm.bias"] = (tw,)
        shapes[p + "intermediate.dense.weight"] = (sizes["text_intermediate"], tw)
        shapes[p + "intermediate.dense.bias"] = (sizes["text_intermediate"],)
        shapes[p + "output.dense.weight"] = (tw, sizes["text_intermediate"])
        shapes[p + "output.dense.bias"] = (tw,)
        shapes[p + "output.LayerNorm.weight"] = (tw,)
        shapes[p + "output.LayerNorm.bias"] = (tw,)
    shapes["blip.vision_proj.weight"] = (sizes["proj"], vw)
    shapes["blip.vision_proj.bias"] = (sizes["proj"],)
    shapes["blip.text_proj.weight"] = (sizes["proj"], tw)
    shapes["blip.text_proj.bias"] = (sizes["proj"],)
    head = sizes["head"]
    for (i, n_in, n_out) in zip(HEAD_LINEARS, head[:-1], head[1:]):
        shapes[f"mlp.layers.{i}.weight"] = (n_out, n_in)
        shapes[f"mlp.layers.{i}.bias"] = (n_out,)
    return shapes


def _tiny_tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random values large enough that every weight visibly moves the score."""
    if key.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    if "LayerNorm.weight" in key or re.search(r"norm\d?\.weight$", key):
        return 1.0 + 0.2 * torch.randn(shape, generator=g)
    if key.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=g)
    fan_in = shape[-1] if len(shape) == 2 else (math.prod(shape[1:]) if len(shape) == 4 else 1)
    scale = 1.0 / math.sqrt(fan_in) if len(shape) in (2, 4) else 0.5
    return scale * torch.randn(shape, generator=g)


def write_tiny_imagereward(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random ImageReward: `folder/ImageReward.pt` (the published key layout, `TINY` sizes),
    `folder/base` (a BERT-style tokenizer folder with a config.json naming the text heads) and
    `folder/model`, converted from them by `convert_imagereward`; returns `folder/model`."""
    from transformers import BertTokenizer

    from megaflow.seeds import generator

    folder = Path(folder)
    base = folder / "base"
    base.mkdir(parents=True, exist_ok=True)
    vocab_words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_TINY_WORDS]
    (base / "vocab.txt").write_text("\n".join(vocab_words) + "\n")
    BertTokenizer.from_pretrained(str(base)).save_pretrained(str(base))
    (base / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": TINY["text_width"], "num_attention_heads": TINY["text_heads"],
        "num_hidden_layers": TINY["text_layers"], "vocab_size": len(vocab_words)}, indent=2) + "\n")
    g = generator(seed, "tiny-imagereward")
    state = {k: _tiny_tensor(k, s, g) for k, s in tiny_checkpoint_keys(TINY, len(vocab_words) + 2).items()}
    torch.save(state, folder / "ImageReward.pt")
    return convert_imagereward(folder / "ImageReward.pt", folder / "model", base)
