"""Typed run configuration: dataclasses per section, YAML recipes, strict keys, `--set` overrides.

A recipe is a YAML mapping whose keys mirror the dataclasses below. Built-in recipes live in
`megaflow/recipes/NAME.yaml` and are addressed by name (`--config tiny`); anything else is a
path. Unknown keys and values of the wrong type are errors that name the key and the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from megaflow.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class ModelConfig:
    """Which model to train and which of its weights."""

    family: str = "wan"  #: adapter family (see megaflow.models.ADAPTERS)
    path: str = "tiny"  #: diffusers-format folder, or "tiny" for the built-in tiny random model
    lora: bool = True  #: train LoRA adapters (True) or every transformer weight (False)
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: list[str] | None = None  #: transformer submodules LoRA adapts; null: the family's default
    init_weights: str | None = None  #: start from trainable weights `megaflow export` wrote (LoRA file or transformer/)
    #: Attention kernels: native (torch SDPA) | flash | flash_varlen (flash-attn) | xformers | sage
    #: (sageattention); the non-native ones need CUDA and their package (`pip install -e ".[gpu]"`), and
    #: flash / flash_varlen / sage need train.precision=bf16 (megaflow.parallel.attention).
    attention_backend: str = "native"
    #: VAE decoding of the video families: `auto` tiles a latent larger than the VAE's tile (diffusers'
    #: enable_tiling; Wan 480×832 and Hunyuan 720×1280 are tiled) | `off` decodes whole frames (more memory).
    vae_tiling: str = "auto"
    #: Video families: decode a chunk's samples one at a time (videos and rewards independent of the chunk
    #: size and SP layout; one sample's decoder memory) | false: as one batch (faster on CPU at small sizes).
    vae_slicing: bool = True


@dataclass
class DataConfig:
    """Where prompts come from and how many an iteration uses."""

    prompt_file: str | None = None  #: one prompt per line, or JSONL {"prompt": ..., "image": path} (I2V)
    prompts: list[str] = field(default_factory=list)  #: inline prompts, used without prompt_file
    prompts_per_iteration: int = 2
    negative_prompt: str = ""  #: used for classifier-free guidance
    #: Folder of precomputed prompt embeddings (`megaflow preprocess` writes it, see
    #: megaflow.data.text_cache); set: training reads the prompts (and the negative prompt, and Wan
    #: I2V's CLIP image embeddings) from it and never loads the text encoders. null: encode online.
    text_cache: str | None = None
    #: A prompt or image the text cache lacks: `error` (name it and the `megaflow preprocess`
    #: command) | `fill` (load the encoders at start-up, encode what is missing into the cache, free them).
    text_cache_missing: str = "error"


@dataclass
class VideoConfig:
    """Generated video size in pixels."""

    frames: int = 5
    height: int = 16
    width: int = 16


@dataclass
class SamplingConfig:
    """The denoising grid and guidance."""

    num_steps: int = 6
    shift: float = 3.0
    guidance_scale: float = 4.5  #: true classifier-free guidance (a negative-prompt pass); <= 1 disables it
    embedded_guidance: float | None = None  #: guidance-distilled families' `guidance` input; null: the family's default


@dataclass
class RolloutConfig:
    """How samples are generated."""

    group_size: int = 4  #: G samples per prompt (a GRPO group)
    chunk_size: int = 4  #: samples denoised together (memory / throughput)
    share_noise: bool = True  #: one initial noise per group
    gather_weights: bool = False  #: ZeRO-3: gather the full transformer once per rollout instead of per layer and step
    best_of: int | None = None  #: keep the top n/2 and bottom n/2 samples of each group by advantage (DanceGRPO video); None: all
    best_of_renormalize: bool = False  #: recompute the kept samples' advantages among themselves


@dataclass
class AlgorithmConfig:
    """The GRPO variant and its hyper-parameters (ALGORITHMS.md)."""

    name: str = "flow_grpo"  #: flow_grpo | dance_grpo | flow_grpo_fast | mix_grpo | mix_grpo_flash | g2rpo
    noise_level: float | None = None  #: SDE noise (a or eta); None: the algorithm's default
    timestep_fraction: float | None = None  #: fraction of steps trained; None: the algorithm's default
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    adv_eps: float = 1e-6
    global_std: bool = False  #: normalise by the std of all rewards instead of the group's
    kl_beta: float = 0.0  #: weight of the KL to the reference policy
    drop_zero_std_groups: bool = False  #: give groups whose rewards are all equal zero weight
    reward_aggregation: str = "reward_aggr"  #: reward_aggr | advantage_aggr
    sde_kind: str | None = None  #: flow_grpo | dance | cps; None: the algorithm's own kind
    noise_schedule: str = "sqrt_ratio"  #: flow_grpo noise: sqrt_ratio (a·sqrt(σ/(1−σ))) | linear (Flow-GRPO's Wan step)
    loss: str = "clipped"  #: clipped (the PPO/GRPO surrogate) | grpo_guard (RatioNorm + 1/|dt| reweight)
    sde_window_size: int | None = None  #: flow_grpo_fast: SDE steps per iteration (default 2)
    sde_window_range: list[int] | None = None  #: flow_grpo_fast: [lo, hi) of the window's steps (default [0, N/2])
    window_size: int | None = None  #: mix_grpo(_flash): SDE steps in the sliding window (default 4)
    window_stride: int | None = None  #: mix_grpo(_flash): steps the window moves (default 1)
    window_shift_interval: int | None = None  #: mix_grpo(_flash): iterations between moves, τ (default 25)
    window_strategy: str | None = None  #: mix_grpo(_flash): progressive | random | frozen | decay (default progressive)
    flash_compression: float | None = None  #: mix_grpo_flash: share r of the steps after the window kept (default 0.4)
    branch_steps: list[int] | None = None  #: g2rpo: steps k of the ODE anchor that branch (default 0..min(7, N−2))
    granularities: list[int] | None = None  #: g2rpo: ODE strides λ each branch is finished with (default [1, 2])


@dataclass
class RewardConfig:
    """Reward components (registered names) with weights and per-component options."""

    components: dict[str, float] = field(default_factory=lambda: {"brightness": 1.0})
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Where reward models run: `same` (the rank's training device), `cpu` or `cuda:N`.
    device: str = "same"
    #: Move reward models to the CPU between scorings (frees accelerator memory for the update).
    offload: bool = False
    #: Score chunk i in a worker thread while chunk i+1 is denoised (reward time hides behind the rollout).
    overlap: bool = True


@dataclass
class TrainConfig:
    """The policy update and the run's bookkeeping."""

    iterations: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8  #: AdamW epsilon
    grad_clip: float = 1.0  #: max gradient norm; <= 0 disables clipping
    micro_batch_size: int = 4  #: samples per forward/backward; divides rollout.chunk_size
    grad_accum: int | None = None  #: micro-batches per optimizer step; None: one step per iteration
    precision: str = "fp32"  #: fp32 | bf16
    save_every: int = 0  #: checkpoint every k iterations (0: only at the end)
    sample_every: int = 1  #: log sample videos every k iterations (0: never)
    keep_checkpoints: int = 3  #: keep the newest k complete checkpoints (0: keep all)
    grad_checkpointing: float = 0.0  #: fraction of transformer blocks with activation checkpointing (0..1)
    compile: bool = False  #: torch.compile each transformer block's forward (regional; megaflow.parallel.compile)
    ema_decay: float | None = None  #: EMA of the trainable weights, used by eval and export; None: no EMA
    ema_every: int = 1  #: optimizer steps between EMA updates


@dataclass
class ParallelConfig:
    """Data/sequence parallel layout and ZeRO stage."""

    sp_size: int = 1  #: ranks per sequence-parallel group (Ulysses); world = dp × sp_size
    zero_stage: int = 0  #: 0: plain single process; 2 or 3: DeepSpeed ZeRO engine
    ds_config: str | None = None  #: DeepSpeed JSON; None: ds_configs/zero{stage}.json ("auto" filled from the recipe)
    hpz_partition_size: int = 1  #: ZeRO-3 hpZ secondary partition size (ranks per node); 1 disables it
    offload: bool = False  #: ZeRO-3 with optimizer state and parameters offloaded to CPU (zero3_offload.json)


@dataclass
class KernelsConfig:
    """Kernel backends."""

    logprob: str = "auto"  #: auto | triton | torch


@dataclass
class Config:
    """A whole run."""

    seed: int = 0
    output_dir: str = "runs/megaflow"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    @property
    def samples_per_iteration(self) -> int:
        """Trained samples per iteration: prompts × group size × the algorithm's groups per prompt
        (G²RPO: one group per branch step)."""
        from megaflow.algorithms.registry import groups_per_prompt

        return self.data.prompts_per_iteration * self.rollout.group_size * groups_per_prompt(self)


# ---- type coercion ---------------------------------------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a `--set` string) to type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}' has unsupported type {_type_name(tp)}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, path + "."))
    return keys


def _unknown_key(key: str) -> ConfigError:
    valid = _all_keys(Config)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid top-level keys: {', '.join(f.name for f in dataclasses.fields(Config))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _apply_mapping(obj: Any, mapping: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key(key)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; expected a mapping of its keys, got {value!r}")
            _apply_mapping(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, tp, key))


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one `a.b.c=value` override (the value is converted to the key's type)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value (e.g. --set train.iterations=3)")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    obj: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(type(obj))
        if part not in hints:
            raise _unknown_key(key)
        tp = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}=...")
            setattr(obj, part, _coerce(raw, tp, key))
        elif typing.get_origin(tp) is dict:
            setattr(obj, part, _coerce(_set_in_mapping(getattr(obj, part), parts[i + 1:], raw, tp), tp,
                                       ".".join(parts[:i + 1])))
            return
        else:
            if not dataclasses.is_dataclass(tp):
                raise _unknown_key(key)
            obj = getattr(obj, part)


def _set_in_mapping(mapping: dict[str, Any], path: list[str], raw: str, tp: Any) -> dict[str, Any]:
    """A copy of a mapping-valued key with `path` (e.g. ["shapes", "soft"] of
    `reward.options.shapes.soft`) set to the YAML value `raw`; missing levels are created."""
    out = copy.deepcopy(mapping)
    node = out
    for name in path[:-1]:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}' inside a mapping: '{name}' holds {child!r}, not a mapping")
        node = child
    _, val_tp = typing.get_args(tp)
    # A typed top-level value (reward.components.NAME: float) stays text for `_coerce` to convert and
    # report; anything deeper, or a value of type Any, is parsed as YAML here.
    node[path[-1]] = raw if len(path) == 1 and val_tp is not Any else yaml.safe_load(raw)
    return out


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A built-in recipe name or a YAML path → the file, or ConfigError naming the choices."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"config file '{name_or_path}' does not exist; give a YAML path or one of the built-in recipes: {', '.join(builtin_recipes())}")
        return candidate
    builtin = RECIPES_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    close = difflib.get_close_matches(name_or_path, builtin_recipes(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"no built-in recipe named '{name_or_path}' and no such file.{hint} Built-in recipes: {', '.join(builtin_recipes())}")


def _recipe_chain(name_or_path: str, seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A recipe's mappings, its `base:` recipe's first (a recipe states only what differs from its base)."""
    path = resolve_recipe(name_or_path)
    if str(path.resolve()) in seen:
        raise ConfigError(f"recipe '{path}' is its own base (through {' -> '.join(seen)}); remove the cycle")
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    if not isinstance(mapping, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of config keys at the top level")
    base = mapping.pop("base", None)
    if base is None:
        return [mapping]
    if not isinstance(base, str):
        raise ConfigError(f"'base' in '{path}' names a recipe (built-in name or YAML path), got {base!r}")
    if not Path(base).suffix and not (RECIPES_DIR / f"{base}.yaml").is_file():
        sibling = path.parent / f"{base}.yaml"
        base = str(sibling) if sibling.is_file() else base
    return _recipe_chain(base, seen + (str(path.resolve()),)) + [mapping]


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the recipe (if any; after the recipe named by its `base:` key), then each
    `key=value` override in order."""
    cfg = Config()
    if name_or_path is not None:
        for mapping in _recipe_chain(name_or_path):
            _apply_mapping(cfg, mapping)
    recipe_options = set(cfg.reward.options)
    for assignment in overrides:
        apply_override(cfg, assignment)
    # An override that replaces the reward components drops the recipe's options of the rewards it
    # removed (options the overrides give for unconfigured rewards stay, and are an error).
    for name in recipe_options - set(cfg.reward.components):
        cfg.reward.options.pop(name, None)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config(path)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


PRECISIONS = ("fp32", "bf16")
#: `data.text_cache_missing` policies.
TEXT_CACHE_MISSING = ("error", "fill")


def validate_config(cfg: Config) -> None:
    """Check everything that can be checked before a model is loaded; raise ConfigError."""
    from megaflow.algorithms.advantages import AGGREGATIONS
    from megaflow.algorithms.registry import ALGORITHMS
    from megaflow.kernels import BACKENDS
    from megaflow.parallel.attention import backend_spec
    from megaflow.models.vae import check_vae_settings

    def bad(msg: str) -> None:
        raise ConfigError(msg)

    if cfg.algorithm.name not in ALGORITHMS:
        close = difflib.get_close_matches(cfg.algorithm.name, list(ALGORITHMS), n=1)
        bad(f"algorithm.name '{cfg.algorithm.name}' is not a known algorithm"
            + (f"; did you mean '{close[0]}'?" if close else "") + f" Choose one of: {', '.join(ALGORITHMS)}")
    if cfg.algorithm.reward_aggregation not in AGGREGATIONS:
        bad(f"algorithm.reward_aggregation must be one of {', '.join(AGGREGATIONS)}, got '{cfg.algorithm.reward_aggregation}'")
    if cfg.train.precision not in PRECISIONS:
        bad(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{cfg.train.precision}'")
    if cfg.kernels.logprob not in BACKENDS:
        bad(f"kernels.logprob must be one of {', '.join(BACKENDS)}, got '{cfg.kernels.logprob}'")
    if cfg.rollout.group_size < 2:
        bad(f"rollout.group_size is {cfg.rollout.group_size}, but GRPO needs at least 2 samples per prompt to "
            "compare them; set rollout.group_size >= 2")
    for key, value in (("train.iterations", cfg.train.iterations), ("rollout.chunk_size", cfg.rollout.chunk_size),
                       ("train.micro_batch_size", cfg.train.micro_batch_size),
                       ("data.prompts_per_iteration", cfg.data.prompts_per_iteration),
                       ("sampling.num_steps", cfg.sampling.num_steps), ("video.frames", cfg.video.frames),
                       ("video.height", cfg.video.height), ("video.width", cfg.video.width)):
        if value < 1:
            bad(f"{key} must be >= 1, got {value}")
    if cfg.sampling.num_steps < 2:
        bad(f"sampling.num_steps must be >= 2 (the last step is never trained), got {cfg.sampling.num_steps}")
    n = cfg.samples_per_iteration
    if n % cfg.rollout.chunk_size:
        bad(f"the iteration's {n} samples (data.prompts_per_iteration={cfg.data.prompts_per_iteration} × "
            f"rollout.group_size={cfg.rollout.group_size}) do not divide into chunks of rollout.chunk_size="
            f"{cfg.rollout.chunk_size}; choose a chunk size that divides {n}")
    if cfg.rollout.chunk_size % cfg.train.micro_batch_size:
        bad(f"train.micro_batch_size={cfg.train.micro_batch_size} does not divide rollout.chunk_size="
            f"{cfg.rollout.chunk_size}; the rollout evaluates trained steps in micro-batches so the update's "
            "first ratio is exactly 1. Choose a micro-batch size that divides the chunk size")
    if cfg.train.grad_accum is not None:
        micro = n // cfg.train.micro_batch_size
        if cfg.train.grad_accum < 1 or micro % cfg.train.grad_accum:
            bad(f"train.grad_accum={cfg.train.grad_accum} must be >= 1 and divide the iteration's {micro} "
                f"micro-batches ({n} samples / train.micro_batch_size={cfg.train.micro_batch_size}); "
                "or set it to null for one optimizer step per iteration")
    if cfg.algorithm.timestep_fraction is not None and not 0 < cfg.algorithm.timestep_fraction <= 1:
        bad(f"algorithm.timestep_fraction must be in (0, 1], got {cfg.algorithm.timestep_fraction}")
    if cfg.algorithm.noise_level is not None and cfg.algorithm.noise_level <= 0:
        bad(f"algorithm.noise_level must be > 0 (the policy must be stochastic), got {cfg.algorithm.noise_level}")
    if cfg.algorithm.clip_range <= 0:
        bad(f"algorithm.clip_range must be > 0, got {cfg.algorithm.clip_range}")
    if cfg.algorithm.kl_beta < 0:
        bad(f"algorithm.kl_beta must be >= 0, got {cfg.algorithm.kl_beta}")
    device = cfg.reward.device
    if not (device in ("same", "cpu") or (device.startswith("cuda:") and device[5:].isdigit())):
        bad(f"reward.device must be same, cpu or cuda:N (N a GPU index), got '{device}'")
    _validate_algorithm(cfg)
    validate_parallel(cfg)
    if not cfg.data.prompt_file and not [p for p in cfg.data.prompts if p.strip()]:
        bad("no prompts: set data.prompt_file to a text file with one prompt per line, or list data.prompts")
    if cfg.data.text_cache_missing not in TEXT_CACHE_MISSING:
        bad(f"data.text_cache_missing must be one of {', '.join(TEXT_CACHE_MISSING)}, got '{cfg.data.text_cache_missing}'")
    if cfg.data.text_cache is not None and (not cfg.data.text_cache.strip() or Path(cfg.data.text_cache).expanduser().is_file()):
        bad(f"data.text_cache must name a folder (made by `megaflow preprocess`), got '{cfg.data.text_cache}'")
    if cfg.model.init_weights:
        init = Path(cfg.model.init_weights)
        need = init / ("pytorch_lora_weights.safetensors" if cfg.model.lora else "transformer")
        if not need.exists():
            bad(f"model.init_weights '{init}' has no {need.name} (what `megaflow export` writes for a "
                f"{'LoRA' if cfg.model.lora else 'full fine-tuning'} run); export the weights there, or check "
                "model.lora matches the run they came from")
    if cfg.model.lora and cfg.model.lora_rank < 1:
        bad(f"model.lora_rank must be >= 1, got {cfg.model.lora_rank}")
    if backend_spec(cfg.model.attention_backend).half_only and cfg.train.precision != "bf16":
        bad(f"model.attention_backend={cfg.model.attention_backend} computes in fp16 / bf16 only; with "
            f"train.precision={cfg.train.precision} every attention call would fail. Set train.precision=bf16, "
            "or use model.attention_backend=native or xformers")
    check_vae_settings(cfg.model.family, cfg.model.vae_tiling, cfg.model.vae_slicing)


def _validate_algorithm(cfg: Config) -> None:
    """The algorithm's options, its step kind and loss, best-of-n and EMA."""
    from megaflow.algorithms.losses import LOSSES
    from megaflow.algorithms.registry import KIND_NOISE, check_algorithm

    a, r, t = cfg.algorithm, cfg.rollout, cfg.train

    def bad(msg: str) -> None:
        raise ConfigError(msg)

    def choose(key: str, value: str, choices: Any) -> None:
        if value not in choices:
            close = difflib.get_close_matches(value, list(choices), n=1)
            bad(f"{key} '{value}' is not one of {', '.join(choices)}" + (f"; did you mean '{close[0]}'?" if close else ""))

    if a.sde_kind is not None:
        choose("algorithm.sde_kind", a.sde_kind, KIND_NOISE)
    choose("algorithm.noise_schedule", a.noise_schedule, NOISE_SCHEDULES)
    choose("algorithm.loss", a.loss, LOSSES)
    if a.noise_schedule == "linear":
        from megaflow.algorithms.registry import ALGORITHMS

        if (a.sde_kind or ALGORITHMS[a.name].sde_kind) != "flow_grpo":
            bad("algorithm.noise_schedule=linear is Flow-GRPO's Wan step and needs the flow_grpo SDE kind; "
                "set algorithm.sde_kind=flow_grpo or noise_schedule=sqrt_ratio")
        if a.noise_level is not None:
            bad("algorithm.noise_schedule=linear has no noise level (s = sigma_max * sigma); remove algorithm.noise_level")
    check_algorithm(cfg)
    if r.best_of is not None and (r.best_of < 2 or r.best_of % 2 or r.best_of > r.group_size):
        bad(f"rollout.best_of={r.best_of} keeps the best n/2 and worst n/2 samples of each group: it must be even, "
            f">= 2 and at most rollout.group_size={r.group_size}")
    if r.best_of_renormalize and r.best_of is None:
        bad("rollout.best_of_renormalize=true needs rollout.best_of")
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        bad(f"train.ema_decay must be in (0, 1) (0.9-0.995 is usual), or null for no EMA; got {t.ema_decay}")
    if t.ema_every < 1:
        bad(f"train.ema_every must be >= 1, got {t.ema_every}")


NOISE_SCHEDULES = ("sqrt_ratio", "linear")


def validate_parallel(cfg: Config, world_size: int | None = None) -> None:
    """Check the parallel / checkpoint keys; with `world_size`, also the dp × sp layout of the run."""
    p, t = cfg.parallel, cfg.train

    def bad(msg: str) -> None:
        raise ConfigError(msg)

    if p.zero_stage not in (0, 2, 3):
        bad(f"parallel.zero_stage must be 0 (single process), 2 or 3 (DeepSpeed ZeRO), got {p.zero_stage}")
    if p.sp_size < 1:
        bad(f"parallel.sp_size must be >= 1, got {p.sp_size}")
    if p.hpz_partition_size < 1:
        bad(f"parallel.hpz_partition_size must be >= 1, got {p.hpz_partition_size}")
    if p.hpz_partition_size > 1 and p.zero_stage != 3:
        bad(f"parallel.hpz_partition_size={p.hpz_partition_size} is a ZeRO-3 option; set parallel.zero_stage=3 "
            "or parallel.hpz_partition_size=1")
    if p.offload and p.zero_stage != 3:
        bad("parallel.offload=true needs parallel.zero_stage=3 (it selects ds_configs/zero3_offload.json)")
    if p.offload and p.ds_config:
        bad("parallel.offload and parallel.ds_config both choose the DeepSpeed config; set only one")
    if p.ds_config and not Path(p.ds_config).is_file():
        bad(f"parallel.ds_config '{p.ds_config}' does not exist; give a DeepSpeed JSON file or null for the "
            "built-in template of parallel.zero_stage")
    if cfg.rollout.gather_weights and p.zero_stage != 3:
        bad("rollout.gather_weights=true only applies to ZeRO-3 (parameters are already whole otherwise); "
            "set parallel.zero_stage=3 or rollout.gather_weights=false")
    if p.sp_size > 1 and p.zero_stage == 0:
        bad(f"parallel.sp_size={p.sp_size} runs under DeepSpeed; set parallel.zero_stage to 2 or 3")
    if t.adam_eps <= 0:
        bad(f"train.adam_eps must be > 0, got {t.adam_eps}")
    if not 0.0 <= t.grad_checkpointing <= 1.0:
        bad(f"train.grad_checkpointing is the fraction of transformer blocks checkpointed, in [0, 1]; "
            f"got {t.grad_checkpointing}")
    if t.keep_checkpoints < 0:
        bad(f"train.keep_checkpoints must be >= 0 (0 keeps every checkpoint), got {t.keep_checkpoints}")
    if world_size is None:
        return
    if world_size > 1 and p.zero_stage == 0:
        bad(f"{world_size} processes were launched but parallel.zero_stage=0 is the single-process path; "
            "set parallel.zero_stage=2 or 3")
    if world_size % p.sp_size:
        bad(f"the world of {world_size} ranks does not divide by parallel.sp_size={p.sp_size}; "
            f"launch a multiple of {p.sp_size} processes or choose an sp_size that divides {world_size}")
    dp = world_size // p.sp_size
    n, m = cfg.samples_per_iteration, t.micro_batch_size
    micro = n // m
    if micro % dp:
        bad(f"the iteration's {micro} micro-batches ({n} samples / train.micro_batch_size={m}) do not divide "
            f"over dp={dp} data-parallel ranks (world {world_size} / sp {p.sp_size}); every rank must run the "
            "same number of forward calls. Change data.prompts_per_iteration, rollout.group_size, "
            "train.micro_batch_size or the number of processes")
    local = n // dp
    if local % cfg.rollout.chunk_size:
        bad(f"each of the dp={dp} ranks generates {local} samples, which do not divide into chunks of "
            f"rollout.chunk_size={cfg.rollout.chunk_size} (the chunk size is per rank); choose a chunk size "
            f"that divides {local}")
    if t.grad_accum is not None and t.grad_accum % dp:
        bad(f"train.grad_accum={t.grad_accum} counts micro-batches of the whole job per optimizer step and must "
            f"divide over dp={dp} ranks; choose a multiple of {dp} or null")
