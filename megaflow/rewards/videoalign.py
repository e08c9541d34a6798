"""VideoAlign's VideoReward (Qwen2-VL-2B + LoRA + a reward head): visual quality (VQ), motion
quality (MQ) and text alignment (TA) of a generated video, from local folders.

Rewards `videoalign` (option `output`: `overall` = VQ + MQ + TA as upstream's "Overall", or
`vq`, `mq`, `ta`) and the fixed variants `videoalign_vq`, `videoalign_mq`, `videoalign_ta`. Every
call returns `{"score", "vq", "mq", "ta"}` (each `[B]`); the three sub-scores are normalised by the
checkpoint's `inference_config` mean/std (`normalize: false` gives the raw head outputs).

Folders (nothing is downloaded):

- `path`: the VideoReward checkpoint as published on the Hugging Face hub (`KwaiVGI/VideoReward`):
  `model_config.json` (`data_config`, `model_config`, `peft_lora_config`, `inference_config`) and
  `checkpoint-N/` holding either `model.pth` (the published form: the whole PEFT model's state
  dict, LoRA unmerged) plus `tokenizer/`, or the training-time form `adapter_config.json` +
  `adapter_model.safetensors` (LoRA) + `non_lora_state_dict.pth` (vision tower, embedding rows of
  the reward tokens, `rm_head`). The highest N is used.
- `base`: a `Qwen/Qwen2-VL-2B-Instruct` folder (config, tokenizer, and, for the training-time
  form, its safetensors weights). Default: the base named in `model_config.json` when that is a
  local folder.

Loading builds `transformers.Qwen2VLModel` (old checkpoint keys `model.*` map to
`language_model.*`), merges the LoRA into the weights (`W += s·B@A`, `s = alpha/r`, or
`alpha/√r` with rslora), loads the `rm_head` (`hidden → 1` in the published checkpoint, read at
each reward token; `hidden → 3` checkpoints take the diagonal as upstream), and casts to `dtype`.
Rewards configured together with the same folders, device and dtype share one loaded model and
one forward per batch.

Video input follows upstream's inference defaults (its `vision_process.py`): frames sampled at
`data_config.fps` (2) from a video of `video_fps` frames per second (the generator's; default 16)
by `round(linspace(0, F−1, n))`, `n` even and at least 4; each frame resized (bicubic,
antialiased) to multiples of 28 within `[128·28², data_config.max_frame_pixels]` pixels;
8-bit values; CLIP mean/std; 14-pixel patches in pairs of frames. Differences from upstream:

- frames come straight from the decoded tensor (no mp4 written and decoded: upstream's codec
  round trip, e.g. DanceGRPO's, shifts scores slightly); a one-frame video is scored as that
  frame twice (upstream rejects it);
- the prompt text is megaflow's own short template (`DEFAULT_TEMPLATE`), not upstream's long
  rubric: scores shift without the rubric. For parity, save upstream's rubric text to a file with
  `{prompt}` where the caption goes (upstream writes `{text_prompt}`) and pass it as `template`;
- 3-D rotary positions are computed as upstream's transformers (after the video, text resumes at
  `max(t, h, w)`), not as transformers 5 (`max(h, w)`); they differ only when a video has more
  frame pairs than merged patch rows/columns.

Batching: `batch_size` videos per forward, text right-padded with an attention mask (causal
attention: padding does not change a video's scores). The token sequence stops at the last reward
token (later tokens cannot change the reward tokens' hidden states).
"""
from __future__ import annotations

import inspect
import json
import math
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from megaflow.errors import ConfigError, ModelLoadError, RewardError
from megaflow.rewards.base import register_reward
from megaflow.rewards.model import DTYPES, LocalModelReward, reward_folder
from megaflow.rewards.preprocess import CLIP_MEAN, CLIP_STD

__all__ = [
    "DEFAULT_TEMPLATE",
    "SPECIAL_TOKENS",
    "Sampling",
    "VideoAlignModel",
    "VideoAlignReward",
    "clear_cache",
    "frame_count",
    "merge_lora",
    "patchify",
    "position_ids",
    "prepare_frames",
    "shared_model",
    "smart_resize",
    "write_tiny_videoalign",
]

#: The reward tokens, in the order of the sub-scores (VQ, MQ, TA).
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("vq", "mq", "ta")
OUTPUTS = ("overall", *DIMENSIONS)

# Upstream's inference defaults (VideoAlign vision_process.py and data.DataConfig).
FRAME_FACTOR = 2
DEFAULT_FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
DEFAULT_MAX_FRAME_PIXELS = 240 * 320  # DataConfig's default; the published checkpoint sets 200704
MAX_RATIO = 200

#: Template slots: the caption and the video (the video goes first when the template has no slot).
PROMPT_SLOT, VIDEO_SLOT = "{prompt}", "{video}"
#: megaflow's short prompt (upstream trains with a long rubric instead: pass it as `template`).
DEFAULT_TEMPLATE = (
    "{video}This video was generated from the caption \"{prompt}\".\n"
    "Score its visual quality: <|VQ_reward|>\n"
    "Score its motion quality: <|MQ_reward|>\n"
    "Score how well it follows the caption: <|TA_reward|>"
)
# Qwen2-VL's chat format for one user turn (its default system prompt) and the video slot.
_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
         "<|im_start|>assistant\n")
_VISION = "<|vision_start|><|video_pad|><|vision_end|>"

HINT = ("get the VideoReward checkpoint from the Hugging Face hub (KwaiVGI/VideoReward: model_config.json and "
        "checkpoint-N/), e.g. `huggingface-cli download KwaiVGI/VideoReward --local-dir VideoReward`, and set "
        "reward.options.<reward>.path to that folder")
BASE_HINT = ("get Qwen2-VL-2B-Instruct, e.g. `huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir "
             "Qwen2-VL-2B-Instruct`, and set reward.options.<reward>.base to that folder")


# ----------------------------------------------------------------------------------------------
# Frames: sampling, resizing, patches, positions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How a video becomes model frames: `fps` frames per second taken from a video of
    `video_fps` (or exactly `num_frames`), each resized to multiples of `factor` within
    `[min_pixels, max_pixels]`."""

    video_fps: float
    fps: float | None
    num_frames: int | None
    min_pixels: int
    max_pixels: int
    factor: int = 28


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> tuple[int, int]:
    """Upstream's frame size for a `height × width` video: both sides multiples of `factor`, the
    aspect ratio kept, the area brought into `[min_pixels, max_pixels]` (rounded, then shrunk or
    grown)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise RewardError(f"videoalign: aspect ratio of {height}×{width} frames exceeds {MAX_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def frame_count(total: int, video_fps: float, fps: float | None = DEFAULT_FPS, num_frames: int | None = None) -> int:
    """How many frames upstream samples from `total` frames at `video_fps`: `total / video_fps · fps`
    clamped to `[4, total]`, rounded to even (or `num_frames` rounded to even); at most `total`."""
    if num_frames is not None:
        n = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lo = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = total / video_fps * (DEFAULT_FPS if fps is None else fps)
        n = round(min(max(n, lo), hi) / FRAME_FACTOR) * FRAME_FACTOR
    return max(1, min(n, total))


def prepare_frames(video: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """One video `[F, 3, H, W]` in [0, 1] → the model's frames `[T, 3, h, w]` in [0, 1] (float32,
    8-bit levels, T even: a last odd frame is repeated as Qwen2-VL's processor does)."""
    total, _, height, width = video.shape
    n = frame_count(total, sampling.video_fps, sampling.fps, sampling.num_frames)
    index = torch.linspace(0, total - 1, n).round().long().tolist()
    x = video[index].to(torch.float32).mul(255.0).round()
    h, w = smart_resize(height, width, sampling.factor, sampling.min_pixels, sampling.max_pixels)
    if (h, w) != (height, width):
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0.0, 255.0)
    if x.shape[0] % FRAME_FACTOR:
        x = torch.cat([x, x[-1:].expand(FRAME_FACTOR - x.shape[0] % FRAME_FACTOR, -1, -1, -1)])
    return x / 255.0


def patchify(frames: torch.Tensor, patch: int = 14, merge: int = 2,
             temporal: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised frames `[T, C, H, W]` (T a multiple of `temporal`, H and W of `patch · merge`) →
    Qwen2-VL's flat patches `[gt·gh·gw, C·temporal·patch²]` and the grid `(gt, gh, gw)`. Patches
    are ordered by frame pair, then by `merge × merge` block, then within the block (the order the
    vision tower's patch merger expects)."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    # -> (gt, block row, block col, row in block, col in block, C, frame in pair, py, px)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


def position_ids(length: int, start: int, grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """Qwen2-VL's 3-D rotary positions `[3, length]` for a sequence with one video whose merged
    tokens start at `start`: text counts up on all three rows; the video's tokens carry (frame
    pair, row, column) offset by `start`; text after it resumes at `start + max(t, h, w)` (as in
    the transformers release upstream trained with)."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    n = t * h * w
    before = torch.arange(start).expand(3, -1)
    video = torch.stack([
        torch.arange(t).repeat_interleave(h * w),
        torch.arange(h).repeat_interleave(w).repeat(t),
        torch.arange(w).repeat(t * h),
    ]) + start
    after = torch.arange(length - start - n).expand(3, -1) + start + max(t, h, w)
    return torch.cat([before, video, after], dim=1)


# ----------------------------------------------------------------------------------------------
# Checkpoint files and weights
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path, name: str, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"reward {name!r}: {path} not found; {hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward {name!r}: cannot read {path} ({e}); {hint}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"reward {name!r}: {path} must hold a JSON object; {hint}")
    return data


@dataclass(frozen=True)
class _Checkpoint:
    """A VideoReward folder: its configs and the files of its latest `checkpoint-N`."""

    folder: Path
    config: dict[str, Any]
    directory: Path
    layout: str  # "published" (model.pth) or "adapter" (LoRA safetensors + non-LoRA .pth)


def _checkpoint_step(path: Path) -> int | None:
    suffix = path.name.split("-", 1)[1] if "-" in path.name else ""
    return int(suffix) if suffix.isdigit() else None


def locate_checkpoint(folder: Path, name: str = "videoalign") -> _Checkpoint:
    """The VideoReward checkpoint in `folder`; ConfigError naming what is missing."""
    config = _read_json(folder / "model_config.json", name, HINT)
    steps = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and _checkpoint_step(p) is not None),
                   key=_checkpoint_step)
    if not steps:
        raise ConfigError(f"reward {name!r}: no checkpoint-N folder in {folder} (expected checkpoint-N/model.pth, or "
                          "checkpoint-N/adapter_model.safetensors with adapter_config.json and "
                          f"non_lora_state_dict.pth); {HINT}")
    directory = steps[-1]
    if (directory / "model.pth").is_file():
        return _Checkpoint(folder, config, directory, "published")
    needed = ("adapter_config.json", "adapter_model.safetensors", "non_lora_state_dict.pth")
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise ConfigError(f"reward {name!r}: {directory} has neither model.pth nor {', '.join(missing)} "
                          f"(the LoRA form needs {', '.join(needed)}); {HINT}")
    return _Checkpoint(folder, config, directory, "adapter")


def resolve_base(base: str | Path | None, checkpoint: _Checkpoint, name: str = "videoalign") -> Path:
    """The Qwen2-VL base folder: `base`, else the base `model_config.json` names when it is a local
    folder; ConfigError otherwise."""
    if base is None or str(base) == "":
        named = str((checkpoint.config.get("model_config") or {}).get("model_name_or_path") or "")
        if named and Path(named).expanduser().is_dir():
            base = named
        else:
            raise ConfigError(f"reward {name!r} needs option base: a local Qwen2-VL-2B-Instruct folder "
                              f"(model_config.json names {named or 'no base'!r}, which is not a local folder); "
                              f"{BASE_HINT}")
    folder = Path(base).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"reward {name!r}: base '{folder}' is not a folder; {BASE_HINT}")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"reward {name!r}: {folder / 'config.json'} not found (base must be a Qwen2-VL-2B-Instruct "
                          f"folder); {BASE_HINT}")
    return folder


def _tokenizer_folder(checkpoint: _Checkpoint, base: Path, name: str) -> Path:
    for folder in (checkpoint.directory / "tokenizer", base):
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            return folder
    raise ConfigError(f"reward {name!r}: no tokenizer (tokenizer.json) in {checkpoint.directory / 'tokenizer'} or "
                      f"{base}; {BASE_HINT}")


def _canonical(key: str) -> str | None:
    """A checkpoint key (PEFT-wrapped, old `model.*` or new `model.language_model.*` layout) →
    the `Qwen2VLModel` key (`visual.*`, `language_model.*`), `rm_head.weight`, or None (lm_head,
    rotary buffers)."""
    for prefix in ("module.", "base_model.model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith(("model.visual.", "model.language_model.")):
        key = key[len("model."):]
    elif key.startswith("model."):
        key = "language_model." + key[len("model."):]
    if key.startswith("lm_head.") or key.endswith(".inv_freq"):
        return None
    return key


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")


def split_peft(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A (PEFT) state dict → plain `Qwen2VLModel` weights (LoRA layers' `base_layer` unwrapped) and
    the LoRA factors per module: `{module: {"A": [r, in], "B": [out, r]}}`."""
    weights: dict[str, torch.Tensor] = {}
    loras: dict[str, dict[str, torch.Tensor]] = {}
    adapters: set[str] = set()
    for key, tensor in state.items():
        k = _canonical(key)
        if k is None or ".original_module." in k:
            continue
        if ".lora_embedding_" in k or ".lora_magnitude_vector" in k:
            raise ModelLoadError(f"videoalign: checkpoint key {key!r} is an embedding LoRA or DoRA, which megaflow "
                                 "does not merge (VideoReward's LoRA covers the language model's linear layers)")
        match = _LORA_KEY.match(k)
        if match:
            loras.setdefault(match["module"], {})[match["part"]] = tensor
            adapters.add(match["adapter"] or "")
            continue
        weights[_SAVED_COPY.sub(".", k).replace(".base_layer.", ".")] = tensor
    if len(adapters) > 1:
        raise ModelLoadError(f"videoalign: the checkpoint holds several LoRA adapters ({sorted(adapters)}); "
                             "expected one")
    return weights, loras


@dataclass(frozen=True)
class LoraSettings:
    """LoRA scaling: `alpha / r` (or `alpha / √r` with `use_rslora`), per-module overrides by
    PEFT's `rank_pattern` / `alpha_pattern` (module-name suffix regexes)."""

    r: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def scale(self, module: str, rank: int) -> float:
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        if rank != r:
            raise ModelLoadError(f"videoalign: LoRA of {module} has rank {rank} but the config says r={r}")
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(patterns: tuple[tuple[str, Any], ...], module: str, default: Any) -> Any:
    for pattern, value in patterns:
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


def merge_lora(weights: dict[str, torch.Tensor], loras: Mapping[str, Mapping[str, torch.Tensor]],
               settings: LoraSettings, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Fold each LoRA into its layer in place: `W ← W + scale · B @ A` (computed in float32, stored
    as `dtype`, default W's dtype); returns `weights`."""
    for module, parts in loras.items():
        if set(parts) != {"A", "B"}:
            raise ModelLoadError(f"videoalign: LoRA of {module} lacks lora_{'A' if 'A' not in parts else 'B'}")
        key = f"{module}.weight"
        if key not in weights:
            raise ModelLoadError(f"videoalign: LoRA targets {module}, which has no weight {key} in the model")
        w, a, b = weights[key], parts["A"], parts["B"]
        if w.dim() != 2 or a.dim() != 2 or b.dim() != 2 or (b.shape[0], a.shape[1]) != tuple(w.shape) or \
                a.shape[0] != b.shape[1]:
            raise ModelLoadError(f"videoalign: LoRA of {module} (A {list(a.shape)}, B {list(b.shape)}) does not fit "
                                 f"its weight {list(w.shape)}")
        scale = settings.scale(module, a.shape[0])
        merged = w.float() + scale * (b.float() @ a.float())
        weights[key] = merged.to(w.dtype if dtype is None else dtype)
    return weights


def _lora_settings(checkpoint: _Checkpoint) -> LoraSettings:
    if checkpoint.layout == "adapter":
        cfg = _read_json(checkpoint.directory / "adapter_config.json", "videoalign", HINT)
        return LoraSettings(int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False)),
                            tuple((cfg.get("rank_pattern") or {}).items()),
                            tuple((cfg.get("alpha_pattern") or {}).items()))
    cfg = checkpoint.config.get("peft_lora_config") or {}
    return LoraSettings(int(cfg.get("lora_r", 16)), float(cfg.get("lora_alpha", 32)),
                        bool(cfg.get("use_rslora", False)))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"videoalign: cannot read {path}: {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"videoalign: {path} is not a state dict (a mapping of names to tensors)")
    return dict(state)


def _checkpoint_weights(checkpoint: _Checkpoint, base: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All `Qwen2VLModel` weights plus `rm_head.weight`, LoRA merged."""
    if checkpoint.layout == "published":
        weights, loras = split_peft(_load_tensors(checkpoint.directory / "model.pth"))
    else:
        shards = sorted(base.glob("*.safetensors"))
        if not shards:
            raise ConfigError(f"reward 'videoalign': no *.safetensors weights in base {base} (the LoRA checkpoint form "
                              f"needs the base model's weights); {BASE_HINT}")
        weights = {}
        for shard in shards:
            weights.update(split_peft(_load_tensors(shard))[0])
        weights.update(split_peft(_load_tensors(checkpoint.directory / "non_lora_state_dict.pth"))[0])
        loras = split_peft(_load_tensors(checkpoint.directory / "adapter_model.safetensors"))[1]
    return merge_lora(weights, loras, _lora_settings(checkpoint), dtype)


# ----------------------------------------------------------------------------------------------
# The loaded model, shared between rewards
# ----------------------------------------------------------------------------------------------


class VideoAlignModel:
    """One loaded VideoReward: `Qwen2VLModel` (LoRA merged), `rm_head`, tokenizer and settings.

    `raw_scores` runs the network (unnormalised `[B, 3]` VQ, MQ, TA) and remembers the last
    batch, so rewards sharing this model score a batch with one forward.
    """

    #: How many models were loaded (all instances), and forwards run (this instance).
    loads = 0

    def __init__(self, folder: Path, base: Path, device: torch.device, dtype: torch.dtype, name: str = "videoalign"):
        from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel
        from transformers.initialization import no_init_weights

        checkpoint = locate_checkpoint(folder, name)
        tokenizer_dir = _tokenizer_folder(checkpoint, base, name)
        self.folder, self.base, self.layout = folder, base, checkpoint.layout
        self.data_config = dict(checkpoint.config.get("data_config") or {})
        self.inference_config = checkpoint.config.get("inference_config")
        config = Qwen2VLConfig.from_pretrained(base)
        weights = _checkpoint_weights(checkpoint, base, dtype)
        head = weights.pop("rm_head.weight", None)
        if head is None:
            raise ModelLoadError(f"videoalign: no rm_head.weight in {checkpoint.directory} (the reward head)")
        with no_init_weights(), torch.device(device):  # allocated where it runs, filled below
            model = Qwen2VLModel._from_config(config, dtype=dtype, attn_implementation="sdpa")
        embed = weights.get("language_model.embed_tokens.weight")
        if embed is not None and embed.shape[0] != model.language_model.embed_tokens.num_embeddings:
            # upstream resized the embedding to the tokenizer with the three reward tokens
            model.language_model.embed_tokens = nn.Embedding(embed.shape[0], embed.shape[1], dtype=dtype,
                                                             device=device)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"videoalign: the weights in {checkpoint.directory} (and base {base}) do not fit "
                                 f"Qwen2VLModel: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
        self.rm_head = nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=dtype, device=device)
        if head.shape[0] not in (1, 3):
            raise ModelLoadError(f"videoalign: rm_head has {head.shape[0]} outputs; expected 1 or 3")
        with torch.no_grad():
            self.rm_head.weight.copy_(head)
        self.model = model.eval().requires_grad_(False).to(device)
        self.rm_head = self.rm_head.eval().requires_grad_(False).to(device)

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        vocab = self.tokenizer.get_vocab()
        absent = [t for t in SPECIAL_TOKENS if t not in vocab]
        if absent:
            self.tokenizer.add_tokens(absent, special_tokens=True)
        self.token_ids = [int(i) for i in self.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))]
        rows = self.model.language_model.embed_tokens.num_embeddings
        if max(self.token_ids) >= rows:
            raise ModelLoadError(f"videoalign: the tokenizer in {tokenizer_dir} gives the reward tokens ids "
                                 f"{self.token_ids}, beyond the checkpoint's {rows} embedding rows")
        self.video_token = int(config.video_token_id)
        if self.tokenizer.convert_tokens_to_ids("<|video_pad|>") != self.video_token:
            raise ModelLoadError(f"videoalign: the tokenizer in {tokenizer_dir} does not match {base}/config.json "
                                 "(<|video_pad|> id differs from video_token_id)")
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        vision = config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        pre = base / "preprocessor_config.json"
        pre_cfg = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = tuple(float(v) for v in pre_cfg.get("image_mean", CLIP_MEAN))
        self.std = tuple(float(v) for v in pre_cfg.get("image_std", CLIP_STD))
        self.forwards = 0
        self._memo: tuple[tuple, Any, torch.Tensor] | None = None
        VideoAlignModel.loads += 1

    def modules(self) -> list[nn.Module]:
        return [self.model, self.rm_head]

    @property
    def device(self) -> torch.device:
        return self.rm_head.weight.device

    def encode_text(self, template: str, prompt: str, video_tokens: int) -> tuple[list[int], int]:
        """Token ids of one sample (chat turn with the video's `video_tokens` slots), cut
        after the last reward token, and the index of the first video token."""
        user = template if VIDEO_SLOT in template else VIDEO_SLOT + template
        before, after = user.split(VIDEO_SLOT, 1)
        text = _CHAT.format(user=before.replace(PROMPT_SLOT, prompt) + _VISION + after.replace(PROMPT_SLOT, prompt))
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids.count(self.video_token) != 1 or any(ids.count(t) != 1 for t in self.token_ids):
            raise RewardError(f"videoalign: the prompt {prompt!r} must not contain the video or reward tokens "
                              f"({', '.join(SPECIAL_TOKENS)})")
        start = ids.index(self.video_token)
        ids = ids[:start] + [self.video_token] * video_tokens + ids[start + 1:]
        end = max(ids.index(t) for t in self.token_ids) + 1
        return ids[:end], start

    def _forward(self, videos: torch.Tensor, prompts: list[str], template: str, sampling: Sampling) -> torch.Tensor:
        device = self.device
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        pixels, grids, samples = [], [], []
        for video, prompt in zip(videos, prompts):
            frames = prepare_frames(video.to(device), sampling)
            patches, grid = patchify((frames - mean) / std, self.patch, self.merge, self.temporal)
            pixels.append(patches)
            grids.append(grid)
            samples.append(self.encode_text(template, prompt, patches.shape[0] // self.merge ** 2))
        b, length = len(samples), max(len(ids) for ids, _ in samples)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, length, dtype=torch.long)
        positions = torch.zeros(3, b, length, dtype=torch.long)
        types = torch.zeros(b, length, dtype=torch.long)
        for i, ((ids, start), grid) in enumerate(zip(samples, grids)):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            mask[i, :n] = 1
            positions[:, i, :n] = position_ids(n, start, grid, self.merge)
            types[i, :n][input_ids[i, :n] == self.video_token] = 2
        out = self.model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            pixel_values_videos=torch.cat(pixels).to(self.rm_head.weight.dtype),
            video_grid_thw=torch.tensor(grids, device=device), mm_token_type_ids=types.to(device), use_cache=False,
        )
        self.forwards += 1
        hidden = out.last_hidden_state  # [B, L, D]
        where = torch.stack([(input_ids == t).float().argmax(1) for t in self.token_ids], 1).to(device)  # [B, 3]
        rows = hidden.gather(1, where.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, 3, D]
        logits = self.rm_head(rows).float()  # [B, 3, 1 or 3]
        scores = logits.diagonal(dim1=1, dim2=2) if logits.shape[-1] == 3 else logits[..., 0]
        return scores.cpu()

    @torch.no_grad()
    def raw_scores(self, videos: torch.Tensor, prompts: list[str], template: str, sampling: Sampling,
                   batch_size: int) -> torch.Tensor:
        """Unnormalised VQ, MQ, TA `[B, 3]` (float32, CPU) of `videos` `[B, F, 3, H, W]`; the last
        batch's result is reused when the same tensor (unchanged) comes with the same prompts and
        settings."""
        try:
            version = videos._version
        except RuntimeError:  # inference-mode tensors have no version counter (and cannot change in place)
            version = None
        key = (tuple(videos.shape), videos.data_ptr(), version, videos.dtype, str(videos.device),
               tuple(prompts), template, sampling)
        if self._memo is not None and self._memo[0] == key and self._memo[1]() is videos:
            return self._memo[2]
        parts = [self._forward(videos[i:i + batch_size], prompts[i:i + batch_size], template, sampling)
                 for i in range(0, videos.shape[0], batch_size)]
        scores = torch.cat(parts)
        self._memo = (key, weakref.ref(videos), scores)
        return scores


_SHARED: dict[tuple[str, str, str, str], VideoAlignModel] = {}


def shared_model(folder: Path, base: Path, device: torch.device, dtype: torch.dtype,
                 name: str = "videoalign") -> VideoAlignModel:
    """The VideoReward loaded from `folder` and `base` on `device` in `dtype` (loaded once per
    process and shared by every reward asking for the same)."""
    key = (str(folder.resolve()), str(base.resolve()), str(device), str(dtype))
    if key not in _SHARED:
        _SHARED[key] = VideoAlignModel(folder, base, device, dtype, name)
    return _SHARED[key]


def clear_cache() -> None:
    """Forget the loaded models (the next reward built loads again)."""
    _SHARED.clear()


# ----------------------------------------------------------------------------------------------
# The rewards
# ----------------------------------------------------------------------------------------------


def read_template(template: str | Path | None, name: str = "videoalign") -> str:
    """The prompt template: `DEFAULT_TEMPLATE`, or the text of the file `template`, which must
    contain `{prompt}` and each reward token once (`{video}` at most once; absent: video first)."""
    if template is None or str(template) == "":
        return DEFAULT_TEMPLATE
    path = Path(template).expanduser()
    if not path.is_file():
        raise ConfigError(f"reward {name!r}: template '{path}' is not a file (a text file with {PROMPT_SLOT} and "
                          f"{', '.join(SPECIAL_TOKENS)})")
    text = path.read_text()
    problems = [f"{PROMPT_SLOT} missing"] if PROMPT_SLOT not in text else []
    problems += [f"{t} appears {text.count(t)} times" for t in SPECIAL_TOKENS if text.count(t) != 1]
    if text.count(VIDEO_SLOT) > 1:
        problems.append(f"{VIDEO_SLOT} appears {text.count(VIDEO_SLOT)} times")
    if problems:
        raise ConfigError(f"reward {name!r}: template {path}: {'; '.join(problems)} (it needs {PROMPT_SLOT} where the "
                          f"caption goes and each of {', '.join(SPECIAL_TOKENS)} once; {VIDEO_SLOT} optional)")
    return text


def _positive(name: str, option: str, value: Any, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ConfigError(f"reward {name!r}: {option} must be a positive {'integer' if integer else 'number'}, "
                          f"got {value!r}")
    return value


@register_reward("videoalign")
class VideoAlignReward(LocalModelReward):
    """VideoReward's scores of each video `[B, F, 3, H, W]` with its caption: `{"score": [B],
    "vq": [B], "mq": [B], "ta": [B]}`, `score` being `output` (`overall` = vq + mq + ta).

    Options: `path` (VideoReward folder), `base` (Qwen2-VL-2B-Instruct folder), `output`,
    `video_fps` (frame rate of the scored videos, default 16), `fps` / `num_frames` (frames taken:
    default the checkpoint's `data_config`, i.e. 2 per second), `max_pixels` / `min_pixels` (frame
    area; default `data_config.max_frame_pixels` and 128·28²), `template` (prompt file),
    `normalize` (by `inference_config` mean/std, default true), `device`, `dtype`, `batch_size`.
    """

    name = "videoalign"

    def __init__(self, *, path: str | None = None, base: str | None = None, output: str = "overall",
                 video_fps: float = 16.0, fps: float | None = None, num_frames: int | None = None,
                 max_pixels: int | None = None, min_pixels: int | None = None, template: str | None = None,
                 normalize: bool = True, device: str = "cpu", dtype: str = "float32", batch_size: int = 2) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        name = self.name
        if output not in OUTPUTS:
            raise ConfigError(f"reward {name!r}: output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if fps is not None and num_frames is not None:
            raise ConfigError(f"reward {name!r}: set fps or num_frames, not both")
        _positive(name, "video_fps", video_fps)
        if fps is not None:
            _positive(name, "fps", fps)
        if num_frames is not None:
            _positive(name, "num_frames", num_frames, integer=True)
        for option, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
            if value is not None:
                _positive(name, option, value, integer=True)
        self.output = output
        self.normalize = bool(normalize)
        self.template = read_template(template, name)
        folder = reward_folder(name, path, HINT)
        checkpoint = locate_checkpoint(folder, name)
        base_folder = resolve_base(base, checkpoint, name)
        self.shared = shared_model(folder, base_folder, self.device, DTYPES[dtype], name)
        data = self.shared.data_config
        if fps is None and num_frames is None:
            num_frames = data.get("num_frames")
            fps = None if num_frames is not None else float(data.get("fps") or DEFAULT_FPS)
        self.sampling = Sampling(
            video_fps=float(video_fps), fps=fps, num_frames=None if num_frames is None else int(num_frames),
            min_pixels=int(min_pixels or VIDEO_MIN_PIXELS),
            max_pixels=int(max_pixels or data.get("max_frame_pixels") or DEFAULT_MAX_FRAME_PIXELS),
            factor=self.shared.patch * self.shared.merge,
        )
        stats = self.shared.inference_config if self.normalize else None
        self.stats = None if not stats else {d: (float(stats[f"{d.upper()}_mean"]), float(stats[f"{d.upper()}_std"]))
                                             for d in DIMENSIONS}

    def modules(self) -> list[nn.Module]:
        return self.shared.modules()

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: list[str],
                 metadata: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Scores of `videos` `[B, F, 3, H, W]` in [0, 1]: `{"score", "vq", "mq", "ta"}`, each `[B]`."""
        raw = self.shared.raw_scores(videos, list(prompts), self.template, self.sampling, self.batch_size)
        out = {}
        for i, dim in enumerate(DIMENSIONS):
            mean, std = self.stats[dim] if self.stats else (0.0, 1.0)
            out[dim] = (raw[:, i] - mean) / std
        score = out["vq"] + out["mq"] + out["ta"] if self.output == "overall" else out[self.output]
        return {"score": score, **out}


def _variant(output: str) -> type[VideoAlignReward]:
    """`videoalign` with `output` fixed, registered as `videoalign_<output>`."""

    class Variant(VideoAlignReward):
        def __init__(self, **options: Any) -> None:
            super().__init__(output=output, **options)

    Variant.name = f"videoalign_{output}"
    Variant.__name__ = Variant.__qualname__ = f"VideoAlign{output.upper()}Reward"
    Variant.__doc__ = f"`videoalign` with output {output!r} (its score trains; all sub-scores are reported)."
    params = [p for n, p in inspect.signature(VideoAlignReward).parameters.items() if n != "output"]
    Variant.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return register_reward(Variant.name)(Variant)


VideoAlignVQReward = _variant("vq")
VideoAlignMQReward = _variant("mq")
VideoAlignTAReward = _variant("ta")


# ----------------------------------------------------------------------------------------------
# Tiny folders for tests
# ----------------------------------------------------------------------------------------------

_QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
_LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TINY_STATS = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
              "TA_mean": 2.8105, "TA_std": 2.5121}


def _tiny_tokenizer() -> Any:
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # 256 byte symbols
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens(list(_QWEN_TOKENS), special_tokens=True)
    return tokenizer


def write_tiny_videoalign(folder: str | Path, *, layout: str = "published", seed: int = 0, use_rslora: bool = False,
                          output_dim: int = 1, rank: int = 4, alpha: float = 8.0, step: int = 8) -> tuple[Path, Path]:
    """Write a random tiny VideoReward (`folder/VideoReward`) and its tiny Qwen2-VL base
    (`folder/Qwen2-VL-2B-Instruct`) in the real layouts; returns `(videoreward, base)`.

    The base: `config.json` in Qwen2-VL-2B-Instruct's (flat) form, a byte-level Qwen2 tokenizer
    with Qwen2-VL's special tokens, `preprocessor_config.json`, `model.safetensors` with the
    original key names. The checkpoint: `model_config.json` and `checkpoint-<step>/` with
    `model.pth` (whole PEFT state dict, LoRA unmerged) and `tokenizer/` (`layout="published"`),
    or `adapter_config.json`, `adapter_model.safetensors`, `non_lora_state_dict.pth`
    (`layout="adapter"`). Its vision tower differs from the base's (upstream trains it), its
    embedding has three more rows than the tokenizer, LoRA covers the language model's linear
    layers. The same `seed` gives the same network in both layouts.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLModel

    if layout not in ("published", "adapter"):
        raise ValueError(f"layout must be 'published' or 'adapter', got {layout!r}")
    folder = Path(folder)
    base, reward = folder / "Qwen2-VL-2B-Instruct", folder / "VideoReward"
    ckpt = reward / f"checkpoint-{step}"
    for d in (base, ckpt):
        d.mkdir(parents=True, exist_ok=True)

    tokenizer = _tiny_tokenizer()
    ids = dict(zip(_QWEN_TOKENS, tokenizer.convert_tokens_to_ids(list(_QWEN_TOKENS))))
    hidden, layers = 32, 2
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": 64, "initializer_range": 0.02,
        "max_position_embeddings": 4096, "max_window_layers": layers, "num_attention_heads": 4,
        "num_hidden_layers": layers, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 4096, "use_sliding_window": False, "tie_word_embeddings": True, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": 300,
        "vision_config": {"depth": 2, "embed_dim": 16, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
                          "hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (base / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "do_rescale": True, "do_normalize": True, "rescale_factor": 1 / 255}, indent=2))
    tokenizer.save_pretrained(base)

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Qwen2VLModel(Qwen2VLConfig.from_pretrained(base))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    # the original (transformers 4.4x) key names: model.* for the language model
    original = {(k if k.startswith("visual.") else "model." + k[len("language_model."):]): v for k, v in state.items()}
    original["lm_head.weight"] = original["model.embed_tokens.weight"].clone()
    save_file(original, str(base / "model.safetensors"))

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    rows = len(tokenizer) + len(SPECIAL_TOKENS)
    trained = {k: v + randn(*v.shape, std=0.01) for k, v in original.items() if k.startswith("visual.")}
    trained["model.embed_tokens.weight"] = torch.cat([original["model.embed_tokens.weight"][:len(tokenizer)],
                                                      randn(len(SPECIAL_TOKENS), hidden, std=0.5)])
    trained["rm_head.weight"] = randn(output_dim, hidden, std=0.5)
    lora = {}
    for i in range(layers):
        for target in _LORA_TARGETS:
            module = f"model.layers.{i}.{target}"
            out_features, in_features = original[f"{module}.weight"].shape
            lora[module] = (randn(rank, in_features, std=0.3), randn(out_features, rank, std=0.3))

    excluded = ["lm_head", "rm_head", "embed_tokens", "visual"]
    (reward / "model_config.json").write_text(json.dumps({
        "data_config": {"meta_data": "", "data_dir": "", "meta_data_test": None, "max_frame_pixels": 200704,
                        "num_frames": None, "fps": 2.0, "p_shuffle_frames": 0.0, "p_color_jitter": 0.0,
                        "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special", "add_noise": False,
                        "sample_type": "uniform", "use_tied_data": True},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "model_revision": "main",
                         "output_dim": output_dim, "use_special_tokens": True, "freeze_vision_tower": False,
                         "freeze_llm": False, "tune_merger": True, "torch_dtype": "bfloat16",
                         "reward_token": "special", "loss_type": "btt"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": rank, "lora_alpha": alpha,
                             "lora_dropout": 0.05, "lora_target_modules": None, "lora_namespan_exclude": excluded,
                             "lora_modules_to_save": None, "lora_task_type": "CAUSAL_LM", "use_rslora": use_rslora,
                             "num_lora_modules": -1},
        "inference_config": TINY_STATS,
    }, indent=2))

    prefix = "base_model.model."
    if layout == "published":
        full: dict[str, torch.Tensor] = {}
        for key, value in original.items():
            module, _, leaf = key.rpartition(".")
            if module in lora:
                full[f"{prefix}{module}.base_layer.{leaf}"] = value
            else:
                full[prefix + key] = trained.get(key, value)
        for module, (a, b) in lora.items():
            full[f"{prefix}{module}.lora_A.default.weight"] = a
            full[f"{prefix}{module}.lora_B.default.weight"] = b
        full[prefix + "rm_head.weight"] = trained["rm_head.weight"]
        torch.save(full, ckpt / "model.pth")
        tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
        tokenizer.save_pretrained(ckpt / "tokenizer")
    else:
        (ckpt / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct",
            "r": rank, "lora_alpha": alpha, "lora_dropout": 0.05, "use_rslora": use_rslora, "bias": "none",
            "target_modules": sorted(lora), "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
            "fan_in_fan_out": False, "inference_mode": True}, indent=2))
        adapter = {}
        for module, (a, b) in lora.items():
            adapter[f"{prefix}{module}.lora_A.weight"] = a
            adapter[f"{prefix}{module}.lora_B.weight"] = b
        save_file(adapter, str(ckpt / "adapter_model.safetensors"))
        torch.save({prefix + k: v for k, v in trained.items()}, ckpt / "non_lora_state_dict.pth")
    assert rows == trained["model.embed_tokens.weight"].shape[0]
    return reward, base
