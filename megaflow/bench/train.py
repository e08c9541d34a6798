"""`megaflow bench train`: time and memory of a recipe's training phases, with random weights.

The recipe's `Trainer` is built exactly as training builds it (adapter, DeepSpeed engine, sequence
parallelism, activation checkpointing, sampler settings), with its real-size or `--scale`d
transformer in random weights (`model.path=random:NAME@SCALE`), and one chunk of the iteration is
measured phase by phase:

- rollout: `run_program` over one chunk of `rollout.chunk_size` samples, in seconds per denoising
  step per sample, against a plain Euler loop over the same transformer, inputs, dtype and
  attention backend in the same process (`rollout_vs_plain` = plain / rollout, goal >= 0.9);
- update: `policy_update` of that rollout with random advantages, in seconds per trained step per
  sample, with the FLOPs counted from the config (`megaflow.models.flops`), the achieved TFLOP/s
  per device and the MFU against the device's peak; `update_vs_rollout`;
- decode and reward: `adapter.decode` of the chunk and the recipe's reward components, per sample;
- peak memory of each phase, and under ZeRO-3 the rollout with and without
  `rollout.gather_weights` (hpZ is a start-up setting: one launch per `parallel.hpz_partition_size`).

On CPU the model runs at `--scale` sizes and the table's headline figures are the ratios; the
absolute times are in the JSON only. Under a distributed launcher every rank measures and rank 0
reports the slowest rank's times.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megaflow.bench.kernels import PeakMemory, _append_markdown, _device_name, _versions
from megaflow.errors import ConfigError

if TYPE_CHECKING:
    from megaflow.config import Config
    from megaflow.models.base import Conditioning, ModelAdapter
    from megaflow.sampling.plans import StepPlan
    from megaflow.trainer.loop import Trainer
    from megaflow.trainer.rollout import Rollout
    from megaflow.trainer.settings import SamplerSettings

#: Dense bf16 peak TFLOP/s by a substring of the device name (the MFU's denominator).
PEAK_TFLOPS: dict[str, float] = {"H100": 989.0, "H200": 989.0}
#: The model scale on CPU when `--scale` is not given (a note says so).
CPU_DEFAULT_SCALE = "width=0.1,depth=0.1"
#: The video (frames, height, width) on CPU when no size is given (a note says so): the recipes' sizes
#: take minutes per forward there.
CPU_DEFAULT_VIDEO = (9, 64, 64)
#: Prompts of the benchmark's text-to-video samples (the recipes' prompt files are the user's own).
BENCH_PROMPTS = (
    "a red ball bouncing on a beach",
    "a blue car driving through a city at night",
    "a green tree swaying in the wind",
    "a yellow kite flying over a field",
)
#: Image-to-video prompts with their images, shipped with the built-in recipes.
BENCH_I2V_PROMPTS = "tiny_i2v_prompts.jsonl"
#: The reward the trainer is built with: the bench scores with the recipe's own rewards, built on
#: their own so that one whose weights are missing is reported instead of stopping the bench.
TRAINER_REWARD = {"brightness": 1.0}


def default_peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak TFLOP/s from its name (H100/H200: 989), None when unknown (CPU)."""
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


@dataclass
class BenchSetup:
    """What the benchmark was asked to run: the resolved config and how it was made."""

    cfg: Config  #: what the Trainer is built from
    recipe: str
    real_model: str  #: name in `megaflow.models.real.REAL_MODELS`, or the model.path given with --set
    scale: str  #: the scale label, or "model.path" when the user named a model folder
    reward_components: dict[str, float]
    reward_options: dict[str, dict[str, Any]]
    notes: list[str]


def _named(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def bench_config(recipe: str, overrides: list[str], *, scale: str | None, device_type: str, output_dir: str,
                 frames: int | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, chunk: int | None = None) -> BenchSetup:
    """The recipe's config for the benchmark: `--set` overrides, then the size flags. The model is
    the recipe's real model in random weights at `scale` (default 1 on CUDA; on CPU
    `CPU_DEFAULT_SCALE`, `CPU_DEFAULT_VIDEO` unless a size is given, and fp32 unless
    `train.precision` is set, each with a note) unless `model.path` is overridden. The prompts are
    the bench's own unless `data.prompts` or `data.prompt_file` is overridden; the trainer gets
    `TRAINER_REWARD` (the recipe's rewards are kept in the setup); no checkpoints or samples."""
    from megaflow.config import load_config

    notes: list[str] = []
    flags = [f"video.frames={frames}" if frames else None, f"video.height={height}" if height else None,
             f"video.width={width}" if width else None, f"sampling.num_steps={steps}" if steps else None,
             f"rollout.chunk_size={chunk}" if chunk else None]
    final = [*overrides, *(f for f in flags if f)]
    if _named(overrides, "model.path"):
        if scale is not None:
            raise ConfigError("--scale sizes the random-weight model of the recipe; it does not apply to a model "
                              "folder given with --set model.path=... (drop one of them)")
        cfg = load_config(recipe, final)
        real_model, label = cfg.model.path, "model.path"
    else:
        from megaflow.models.random_model import Scale, real_model_of_recipe

        if scale is None:
            scale = CPU_DEFAULT_SCALE if device_type == "cpu" else "1"
            if device_type == "cpu":
                notes.append(f"CPU: no --scale given, so the model runs at scale {scale}")
        if device_type == "cpu" and not (frames or height or width or any(_named(overrides, f"video.{k}")
                                                                          for k in ("frames", "height", "width"))):
            final += [f"video.{k}={v}" for k, v in zip(("frames", "height", "width"), CPU_DEFAULT_VIDEO)]
            notes.append("CPU: no video size given, so the video is {}×{}×{} (frames×height×width)".format(
                *CPU_DEFAULT_VIDEO))
        if device_type == "cpu" and not _named(overrides, "train.precision"):
            final.append("train.precision=fp32")
            notes.append("CPU: train.precision=fp32 (bf16 convolutions and matmuls take slow paths on CPUs without "
                         "bf16 units; --set train.precision=bf16 keeps the recipe's)")
        parsed = Scale.parse(scale)
        real = real_model_of_recipe(recipe)
        cfg = load_config(recipe, [*final, f"model.path=random:{real.name}@{parsed.label}"])
        real_model, label = real.name, parsed.label
    if not (_named(overrides, "data.prompts") or _named(overrides, "data.prompt_file")):
        from megaflow.models import get_adapter

        if get_adapter(cfg.model.family).needs_image:
            cfg.data.prompt_file, cfg.data.prompts = BENCH_I2V_PROMPTS, []
        else:
            cfg.data.prompt_file, cfg.data.prompts = None, list(BENCH_PROMPTS)
    components, options = dict(cfg.reward.components), dict(cfg.reward.options)
    cfg.reward.components, cfg.reward.options = dict(TRAINER_REWARD), {}
    cfg.output_dir = output_dir
    cfg.train.sample_every = 0
    cfg.train.save_every = 0
    return BenchSetup(cfg, recipe, real_model, label, components, options, notes)


class CallCounter:
    """Counts the forward calls of a module and the batch rows (`hidden_states`) they carried."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.calls = 0
        self.rows = 0
        self._handle: Any = None

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.calls += 1
        self.rows += int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) else 0

    def __enter__(self) -> CallCounter:
        self.calls = self.rows = 0
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


@torch.no_grad()
def plain_loop(adapter: ModelAdapter, cond: Conditioning, settings: SamplerSettings, x0: torch.Tensor,
               sigmas: torch.Tensor) -> torch.Tensor:
    """The upper bound of a rollout: a bare Euler ODE loop `x ← x + (σ_{i+1} − σ_i)·v` over `sigmas [N+1]`
    from `x0 [B, C, F, H, W]`, one `adapter.forward_transformer` call per step on the inputs
    `velocity_shard` builds (the CFG batch `2B` of negative and positive text when guidance is on),
    under the same autocast. Returns the final latents `[B, C, F, H, W]` float32."""
    from megaflow.models.base import TextConditioning

    device = adapter.device
    x = x0.to(device, torch.float32)
    b = x.shape[0]
    use_cfg = settings.guidance_scale > 1.0 and cond.negative is not None
    rep = 2 if use_cfg else 1
    text = TextConditioning.cat([cond.negative, cond.text]) if use_cfg else cond.text
    extra = {k: torch.cat([t] * rep) for k, t in cond.extra.items()}
    guidance = (None if settings.embedded_guidance is None
                else torch.full((b * rep,), float(settings.embedded_guidance), device=device))
    dtype = adapter.transformer_dtype
    for i in range(sigmas.numel() - 1):
        timestep = (sigmas[i].to(torch.float32) * adapter.timestep_scale).expand(b * rep).to(device)
        xin = x.to(dtype)
        with settings.autocast(device):
            out = adapter.forward_transformer(torch.cat([xin] * rep) if use_cfg else xin, timestep, text, extra,
                                              guidance).float()
        if use_cfg:
            v_uncond, v_cond = out.chunk(2)
            out = v_uncond + settings.guidance_scale * (v_cond - v_uncond)
        x = x + float(sigmas[i + 1] - sigmas[i]) * adapter.unshard(out, x)
    return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def timed(fn: Callable[[], Any], device: torch.device, *, collective: bool = True) -> tuple[float, Any]:
    """`(seconds, result)` of one call, the device synchronised; `collective`: every rank calls it,
    and they start together."""
    if collective:
        _barrier()
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def measured(fn: Callable[[], Any], device: torch.device, repeats: int, *,
             collective: bool = True) -> tuple[list[float], int | None, Any]:
    """One untimed warm-up call under `PhaseMemory` (its peak beyond the memory live on entry), then
    `repeats` timed calls: `(times, peak extra bytes, last result)`. `collective`: see `timed`."""
    with PhaseMemory(device) as mem:
        if collective:
            _barrier()
        result = fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        seconds, result = timed(fn, device, collective=collective)
        times.append(seconds)
    return times, mem.extra, result


class PhaseMemory:
    """Peak memory of a phase beyond what was live on entry (`extra`, bytes): on CUDA
    `PeakMemory` (`torch.cuda.max_memory_allocated` after a reset); on CPU the live bytes of the
    tensors the phase creates (`megaflow.bench.memory`, deterministic, unlike RSS)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra: int | None = None
        self._inner: Any = None

    @staticmethod
    def method(device: torch.device) -> str:
        """How the peaks are measured on `device`, in words."""
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated after a reset, minus the allocation on entry"
        return "peak live bytes of the tensors the phase creates (megaflow.bench.memory.TensorMemoryTracker)"

    def __enter__(self) -> PhaseMemory:
        if self.device.type == "cuda":
            self._inner = PeakMemory(self.device).__enter__()
        else:
            from megaflow.bench.memory import TensorMemoryTracker

            self._inner = TensorMemoryTracker(self.device.type).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)
        self.extra = self._inner.extra if self.device.type == "cuda" else self._inner.peak


def _cuda_peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@dataclass
class Workload:
    """One chunk of iteration 0 on this rank, prepared as `Trainer.run_iteration` prepares it."""

    texts: list[str]
    batch: list[tuple[int, str]]
    images: torch.Tensor | None
    prompt_cond: Conditioning  #: each prompt's `[P, ...]`
    cond: Conditioning  #: each of this rank's samples' `[chunk, ...]`
    keys: list[tuple[int, int]]  #: every rank's samples (chunk_size × dp)
    local_idx: list[int]
    local_keys: list[tuple[int, int]]
    plan: StepPlan  #: the plan of this rank's samples
    subbatch_steps: set[int]


def prepare(trainer: Trainer) -> Workload:
    """The first `chunk_size × dp` samples of iteration 0 (each data-parallel rank one chunk), their
    conditioning and plan; `ConfigError` for a tree program or an iteration with fewer samples."""
    from megaflow.trainer.update import local_sample_indices

    cfg, topo = trainer.cfg, trainer.topo
    if trainer.algorithm.program != "chain":
        raise ConfigError(f"megaflow bench train measures the chain rollout program; algorithm "
                          f"'{cfg.algorithm.name}' runs the {trainer.algorithm.program} program (use another algorithm "
                          "with --set algorithm.name=...)")
    n = cfg.rollout.chunk_size * topo.dp_size
    batch = trainer.prompts.batch(0, cfg.data.prompts_per_iteration)
    all_keys = trainer.algorithm.sample_keys(len(batch), cfg.rollout.group_size, cfg.algorithm, cfg.sampling.num_steps)
    if len(all_keys) < n:
        raise ConfigError(f"the bench runs one chunk of {cfg.rollout.chunk_size} samples on each of {topo.dp_size} "
                          f"data-parallel rank(s), but an iteration has only {len(all_keys)} samples; raise "
                          "data.prompts_per_iteration or rollout.group_size, or lower --chunk")
    keys = list(all_keys[:n])
    batch = batch[:max(slot for slot, _ in keys) + 1]
    local_idx = local_sample_indices(n, cfg.train.micro_batch_size, topo.dp_size, topo.dp_rank)
    local_keys = [keys[i] for i in local_idx]
    texts = [text for _, text in batch]
    images = trainer.images(batch)
    prompt_cond = trainer.conditioning(texts, images)
    plan = trainer.plan(0, keys)
    return Workload(texts=texts, batch=batch, images=images, prompt_cond=prompt_cond,
                    cond=prompt_cond.select([slot for slot, _ in local_keys]), keys=keys, local_idx=local_idx,
                    local_keys=local_keys, plan=plan.select(local_idx),
                    subbatch_steps={i for steps in plan.trained for i in steps})


def rollout_chunk(trainer: Trainer, w: Workload) -> Rollout:
    """`Trainer.rollout` over this rank's chunk, as `run_iteration` calls it, without decoding."""
    return trainer.rollout(w.prompt_cond, w.cond, w.local_keys, w.plan, 0, on_videos=None,
                           subbatch_steps=w.subbatch_steps, show_progress=False)


def update_chunk(trainer: Trainer, w: Workload, rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
    """`policy_update` of the chunk's rollout with `advantages [chunk × dp]` and unit weights, laid out
    as `run_iteration` lays it out."""
    from megaflow.trainer.update import policy_update

    weights = torch.ones(len(w.keys))
    mine = torch.tensor(w.local_idx, dtype=torch.long)
    return policy_update(trainer.adapter, rollout, w.cond, advantages[mine], weights[mine], trainer.settings,
                         trainer.update_settings, trainer.optimizer, show_progress=False, layout=trainer.update_layout(),
                         global_weights=weights, on_optimizer_step=trainer._after_optimizer_step)


def flop_counts(trainer: Trainer, w: Workload) -> dict[str, float | int]:
    """Analytic FLOPs per sample: one rollout step (a forward, CFG doubling its batch) and one
    trained step (forward + backward + checkpoint recompute, plus the KL reference forward when
    `kl_beta > 0`), from the transformer's config and the run's token counts."""
    from megaflow.models.flops import train_step_flops, transformer_flops, video_tokens

    cfg, adapter = trainer.cfg, trainer.adapter
    config = dict(adapter.transformer.config)
    family = cfg.model.family
    vt = video_tokens(family, config, trainer.latent_shape)
    tt = int(w.cond.text.embeds.shape[1])
    it = int(w.cond.extra["image_embeds"].shape[1]) if "image_embeds" in w.cond.extra else 0
    cfg_batch = 2 if trainer.use_cfg else 1
    forward = transformer_flops(family, config, batch=cfg_batch, video_tokens=vt, text_tokens=tt, image_tokens=it)
    reference = forward.total if cfg.algorithm.kl_beta > 0 else 0.0
    return {"video_tokens": vt, "text_tokens": tt, "image_tokens": it, "cfg_batch": cfg_batch,
            "update_forwards_per_trained_step": 2 if reference else 1,
            "rollout_flops_per_step_per_sample": forward.total,
            "update_flops_per_trained_step_per_sample":
                train_step_flops(forward, checkpoint_fraction=cfg.train.grad_checkpointing) + reference}


def _reduce_max(values: dict[str, float | None]) -> dict[str, float | None]:
    """Every rank's values, their maximum over the ranks (None: measured nowhere)."""
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([math.nan if values[k] is None else float(values[k]) for k in keys], dtype=torch.float64)
    t = torch.where(torch.isnan(t), torch.full_like(t, -math.inf), t)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {k: None if math.isinf(float(v)) and float(v) < 0 else float(v) for k, v in zip(keys, t.tolist())}


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def _median(times: list[float]) -> float:
    return statistics.median(times)


@contextlib.contextmanager
def _weights(trainer: Trainer, gather: bool) -> Iterator[None]:
    """The trainer's rollout weights context with `rollout.gather_weights` set to `gather`."""
    saved = trainer.cfg.rollout.gather_weights
    trainer.cfg.rollout.gather_weights = gather
    try:
        with trainer._rollout_weights():
            yield
    finally:
        trainer.cfg.rollout.gather_weights = saved


def gather_rows(trainer: Trainer, w: Workload, repeats: int) -> dict[str, float | None]:
    """ZeRO-3: the rollout's seconds per step per sample with per-layer gathers and with the whole
    transformer gathered once (`rollout.gather_weights`), and that one-time gather's seconds."""
    device = trainer.device
    per = w.plan.num_steps * len(w.local_keys)
    out: dict[str, float | None] = {}
    for gather in (False, True):
        name = "gathered" if gather else "per_layer"
        with contextlib.ExitStack() as stack:
            enter_s, _ = timed(lambda: stack.enter_context(_weights(trainer, gather)), device)
            rollout_chunk(trainer, w)
            times = [timed(lambda: rollout_chunk(trainer, w), device)[0] for _ in range(repeats)]
        out[f"zero3_rollout_{name}_s_per_step_per_sample"] = _median(times) / per
        if gather:
            out["zero3_full_gather_s"] = enter_s
    out["zero3_gather_s_per_rollout"] = (out["zero3_rollout_per_layer_s_per_step_per_sample"]
                                         - out["zero3_rollout_gathered_s_per_step_per_sample"]) * per
    return out


def run_bench(setup: BenchSetup, *, repeats: int, peak_tflops: float | None, command: str) -> dict[str, Any]:
    """Build the trainer and measure every phase; returns the row (every rank's maxima on every rank)."""
    from megaflow.trainer.loop import Trainer

    trainer = Trainer(setup.cfg, show_progress=False)
    try:
        return measure(trainer, setup, repeats=repeats, peak_tflops=peak_tflops, command=command)
    finally:
        trainer.scorer.close()
        if trainer.writer is not None:
            trainer.writer.close()


def measure(trainer: Trainer, setup: BenchSetup, *, repeats: int, peak_tflops: float | None,
            command: str) -> dict[str, Any]:
    """Every phase of one chunk on a built `Trainer` (see the module docstring); the result row."""
    from megaflow.parallel.decode import spread_decode
    from megaflow.rewards import RewardSet
    from megaflow.trainer.rollout import initial_noise

    cfg, topo, adapter, device = trainer.cfg, trainer.topo, trainer.adapter, trainer.device
    w = prepare(trainer)
    chunk = len(w.local_keys)
    steps = w.plan.num_steps
    x0 = initial_noise(w.local_keys, trainer.latent_shape, seed=cfg.seed, iteration=0,
                       share_noise=cfg.rollout.share_noise)
    timings: dict[str, float | None] = {}

    # rollout and the plain loop, interleaved, inside the rollout's weights context (ZeRO-3 gathers)
    counter = CallCounter(adapter.transformer)
    with trainer._rollout_weights():
        with counter, PhaseMemory(device) as mem_rollout:
            _barrier()
            rollout = rollout_chunk(trainer, w)
            _sync(device)
        rollout_calls, rollout_rows = counter.calls, counter.rows
        timings["peak_rollout_gib_allocated"] = _cuda_peak(device)
        with counter, PhaseMemory(device) as mem_plain:
            _barrier()
            latents = plain_loop(adapter, w.cond, trainer.settings, x0, w.plan.sigmas)
            _sync(device)
        plain_calls, plain_rows = counter.calls, counter.rows
        t_rollout, t_plain = [], []
        for _ in range(repeats):
            seconds, latents = timed(lambda: plain_loop(adapter, w.cond, trainer.settings, x0, w.plan.sigmas), device)
            t_plain.append(seconds)
            seconds, rollout = timed(lambda: rollout_chunk(trainer, w), device)
            t_rollout.append(seconds)
    timings["rollout_s_per_step_per_sample"] = _median(t_rollout) / (steps * chunk)
    timings["plain_s_per_step_per_sample"] = _median(t_plain) / (steps * chunk)
    timings["peak_rollout_mib"] = _mib(mem_rollout.extra)
    timings["peak_plain_mib"] = _mib(mem_plain.extra)

    # decode (spread over the SP group, as the rollout decodes) and reward on the ranks that score
    sp_group = topo.sp_group if topo.sp_size > 1 else None
    times, extra, videos = measured(lambda: spread_decode(adapter.decode, latents.to(adapter.dtype), sp_group),
                                    device, repeats)
    timings["decode_s_per_sample"] = _median(times) / chunk
    timings["peak_decode_mib"] = _mib(extra)
    timings["peak_decode_gib_allocated"] = _cuda_peak(device)
    reward_status = "not scored on this rank"
    timings["reward_s_per_sample"] = timings["peak_reward_mib"] = None  # every rank reduces the same keys
    if videos is not None:
        rewards = RewardSet(setup.reward_components, setup.reward_options, lazy=True, offload=cfg.reward.offload,
                            device=str(device) if cfg.reward.device == "same" else cfg.reward.device)
        try:
            rewards.build()
        except Exception as exc:  # a learned reward whose weights are not here: reported, the bench goes on
            reward_status = f"unavailable: {type(exc).__name__}: {exc}"
        else:
            prompts = [w.texts[slot] for slot, _ in w.local_keys]
            meta = [{**trainer.prompts.metadata[w.batch[slot][0]], "prompt_slot": slot, "sample": g, "iteration": 0}
                    for slot, g in w.local_keys]
            if w.images is not None:
                for m in meta:
                    m["image"] = w.images[m["prompt_slot"]]
            times, extra, _ = measured(lambda: rewards.score(videos, prompts, meta), device, repeats,
                                      collective=False)
            timings["reward_s_per_sample"] = _median(times) / chunk
            timings["peak_reward_mib"] = _mib(extra)
            reward_status = "ok"
    videos = None  # the decoded chunk is freed before the update is measured

    # the update of the chunk's rollout
    generator = torch.Generator().manual_seed(cfg.seed)
    advantages = torch.randn(len(w.keys), generator=generator)
    trained_steps = int(rollout.x.shape[1])
    times, extra, _ = measured(lambda: update_chunk(trainer, w, rollout, advantages), device, repeats)
    timings["update_s_per_trained_step_per_sample"] = _median(times) / (trained_steps * chunk)
    timings["peak_update_mib"] = _mib(extra)
    timings["peak_update_gib_allocated"] = _cuda_peak(device)

    if cfg.parallel.zero_stage == 3:
        timings.update(gather_rows(trainer, w, repeats))
    timings = _reduce_max(timings)

    flops = flop_counts(trainer, w)
    sp = topo.sp_size
    rollout_s, update_s = timings["rollout_s_per_step_per_sample"], timings["update_s_per_trained_step_per_sample"]
    rollout_tflops = flops["rollout_flops_per_step_per_sample"] / (rollout_s * sp) / 1e12
    update_tflops = flops["update_flops_per_trained_step_per_sample"] / (update_s * sp) / 1e12
    c, f, h, wd = trainer.latent_shape
    row: dict[str, Any] = {
        "recipe": setup.recipe,
        "family": cfg.model.family,
        "real_model": setup.real_model,
        "scale": setup.scale,
        "model_path": cfg.model.path,
        "transformer_config": {k: v for k, v in dict(adapter.transformer.config).items() if not k.startswith("_")},
        "transformer_parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                      for p in adapter.transformer.parameters()),
        "video": [cfg.video.frames, cfg.video.height, cfg.video.width],
        "latent_shape": [c, f, h, wd],
        **{k: flops[k] for k in ("video_tokens", "text_tokens", "image_tokens", "cfg_batch")},
        "world_size": topo.world_size,
        "sp": sp,
        "dp": topo.dp_size,
        "chunk": chunk,
        "micro_batch": cfg.train.micro_batch_size,
        "num_steps": steps,
        "trained_steps_per_sample": trained_steps,
        "grad_checkpointing": cfg.train.grad_checkpointing,
        "zero_stage": cfg.parallel.zero_stage,
        "hpz_partition_size": cfg.parallel.hpz_partition_size,
        "gather_weights": cfg.rollout.gather_weights,
        "attention_backend": cfg.model.attention_backend,
        "vae_tiling": cfg.model.vae_tiling,
        "compile": cfg.train.compile,
        "lora": cfg.model.lora,
        "kl_beta": cfg.algorithm.kl_beta,
        "precision": cfg.train.precision,
        "dtype": str(adapter.transformer_dtype).removeprefix("torch."),
        "device": _device_name(device),
        "device_type": device.type,
        "repeats": repeats,
        "rollout_transformer_calls": rollout_calls,
        "plain_transformer_calls": plain_calls,
        "rollout_transformer_rows": rollout_rows,
        "plain_transformer_rows": plain_rows,
        **timings,
        "rollout_vs_plain": timings["plain_s_per_step_per_sample"] / rollout_s,
        "update_vs_rollout": update_s / rollout_s,
        "rollout_flops_per_step_per_sample": flops["rollout_flops_per_step_per_sample"],
        "update_flops_per_trained_step_per_sample": flops["update_flops_per_trained_step_per_sample"],
        "update_forwards_per_trained_step": flops["update_forwards_per_trained_step"],
        "rollout_tflops_per_device": rollout_tflops,
        "update_tflops_per_device": update_tflops,
        "peak_tflops": peak_tflops,
        "rollout_mfu": None if peak_tflops is None else rollout_tflops / peak_tflops,
        "update_mfu": None if peak_tflops is None else update_tflops / peak_tflops,
        "reward_components": setup.reward_components,
        "reward_status": reward_status,
        "command": command,
    }
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines: the ratios first; absolute times and TFLOP/s only for CUDA rows."""
    absolute = any(r["device_type"] == "cuda" for r in rows)
    head = ["recipe", "model @ scale", "video F×H×W (tokens)", "sp×dp", "chunk/micro", "ckpt", "ZeRO", "attention",
            "precision", "rollout vs plain", "update / rollout"]
    if absolute:
        head += ["rollout s/step/sample", "update s/step/sample", "update TFLOP/s", "MFU", "decode s/sample",
                 "reward s/sample", "peak GiB rollout/update/decode"]
    else:
        head += ["peak MiB rollout/update/decode"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 9 + "---:|" * (len(head) - 9)]
    for r in rows:
        cells = [r["recipe"], f"{r['real_model']} @ {r['scale']}",
                 f"{'×'.join(map(str, r['video']))} ({r['video_tokens']}+{r['text_tokens']})", f"{r['sp']}×{r['dp']}",
                 f"{r['chunk']}/{r['micro_batch']}", f"{r['grad_checkpointing']:g}",
                 f"{r['zero_stage']}" + (f" hpZ {r['hpz_partition_size']}" if r["hpz_partition_size"] > 1 else ""),
                 r["attention_backend"], r["precision"],
                 f"{r['rollout_vs_plain']:.2f}", f"{r['update_vs_rollout']:.2f}"]
        if absolute:
            cells += [_fmt(r["rollout_s_per_step_per_sample"], ".3g"),
                      _fmt(r["update_s_per_trained_step_per_sample"], ".3g"),
                      _fmt(r["update_tflops_per_device"], ".0f"), _fmt(r["update_mfu"], ".1%"),
                      _fmt(r.get("decode_s_per_sample"), ".3g"),
                      _fmt(r.get("reward_s_per_sample"), ".3g") if r["reward_status"] == "ok" else "n/a",
                      "/".join(_fmt(r.get(f"peak_{p}_gib_allocated"), ".1f") for p in ("rollout", "update", "decode"))]
        else:
            cells += ["/".join(_fmt(r.get(f"peak_{p}_mib"), ".0f") for p in ("rollout", "update", "decode"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_gather_table(rows: list[dict[str, Any]]) -> list[str]:
    """ZeRO-3 rollout rows: per-layer gathers vs the whole transformer gathered once (empty if none)."""
    rows = [r for r in rows if r.get("zero3_gather_s_per_rollout") is not None]
    if not rows:
        return []
    lines = ["| recipe | ranks (sp×dp) | hpZ | rollout per-layer / gathered-once | gather s per chunk rollout | "
             "one-time full gather s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["zero3_rollout_per_layer_s_per_step_per_sample"] / r["zero3_rollout_gathered_s_per_step_per_sample"]
        lines.append(f"| {r['recipe']} | {r['world_size']} ({r['sp']}×{r['dp']}) | {r['hpz_partition_size']} | "
                     f"{ratio:.2f} | {r['zero3_gather_s_per_rollout']:.3g} | {r['zero3_full_gather_s']:.3g} |")
    return lines


def _markdown_section(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    peak = (f"{r['peak_tflops']:g} TFLOP/s ({meta['peak_source']})" if r["peak_tflops"] is not None
            else "n/a (no known peak for this device; give --peak-tflops)")
    lines = [f"## Training phases (megaflow bench train), {meta['date']}", "",
             f"- command: `{meta['command']}`", f"- device: {meta['device']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- one chunk of iteration 0 per rank, median of {r['repeats']} timed runs after a warm-up; random "
             "weights; rank 0 reports the slowest rank",
             "- rollout vs plain: a bare Euler loop over the same transformer, inputs, dtype and attention backend "
             "(its seconds over the rollout's; goal >= 0.9); update / rollout: seconds per trained step per sample "
             "over seconds per rollout step per sample",
             f"- MFU peak: {peak}; FLOPs from `megaflow.models.flops` (matmuls and attention, checkpoint recompute, "
             "the KL reference forward), TFLOP/s per device",
             f"- peak memory: {meta['memory_method']}",
             f"- reward: {r['reward_status']}"]
    lines += [f"- {note}" for note in meta["notes"]]
    if r["device_type"] != "cuda":
        lines.append("- CPU: only the ratios are reported here (absolute times are in the JSON)")
    gather = format_gather_table(rows)
    if gather:
        lines.append("- ZeRO-3 gathers: the rollout with per-layer gathers vs the whole transformer gathered once "
                     "(`rollout.gather_weights`), in this launch; hpZ (`parallel.hpz_partition_size`) is set at "
                     "start-up, so each hpZ setting is a launch of its own")
    body = format_table(rows) + ([""] + gather if gather else [])
    return "\n".join(lines + [""] + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the training-phase benchmark; rank 0 prints the table, writes --json and appends to --markdown."""
    parser = argparse.ArgumentParser(prog="megaflow bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="built-in recipe name (e.g. wan_t2v_1_3b) or a YAML path")
    parser.add_argument("--scale", help="model scale: one factor (0.25) or width=W,depth=D (default: 1 on CUDA, "
                        f"{CPU_DEFAULT_SCALE} on CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set model.attention_backend=flash")
    parser.add_argument("--frames", type=int, help="video frames (default: the recipe's)")
    parser.add_argument("--height", type=int, help="video height (default: the recipe's)")
    parser.add_argument("--width", type=int, help="video width (default: the recipe's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the recipe's sampling.num_steps)")
    parser.add_argument("--chunk", type=int,
                        help="samples per rollout chunk (default: the recipe's rollout.chunk_size)")
    parser.add_argument("--repeats", type=int, help="timed runs per phase after one warm-up (default 5 CUDA, 3 CPU)")
    parser.add_argument("--json", type=Path, help="write the row and metadata as JSON here")
    parser.add_argument("--markdown", type=Path, help="append a section with the table to this file (BENCHMARKS.md)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak TFLOP/s for the MFU (default: 989 for H100/H200 bf16 dense; n/a "
                             "elsewhere)")
    args = parser.parse_args(argv)
    for flag in ("frames", "height", "width", "steps", "chunk", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"--{flag}: expected a positive integer, got {value}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise SystemExit(f"--peak-tflops: expected a positive number, got {args.peak_tflops}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (5 if device.type == "cuda" else 3)
    device_name = _device_name(device)
    peak, peak_source = args.peak_tflops, "--peak-tflops"
    if peak is None and device.type == "cuda":
        peak = default_peak_tflops(device_name)
        peak_source = f"{device_name} bf16 dense"
    command = "megaflow bench train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    output_dir = tempfile.mkdtemp(prefix="megaflow-bench-train-")
    try:
        setup = bench_config(args.config, list(args.overrides), scale=args.scale, device_type=device.type,
                             output_dir=output_dir, frames=args.frames, height=args.height, width=args.width,
                             steps=args.steps, chunk=args.chunk)
        row = run_bench(setup, repeats=repeats, peak_tflops=peak, command=command.strip())
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    memory_method = PhaseMemory.method(device)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command.strip(),
            "device": device_name, "versions": _versions(), "memory_method": memory_method,
            "peak_source": peak_source, "notes": setup.notes}
    rows = [row]
    for note in setup.notes:
        print(note)
    print("\n".join(format_table(rows)))
    gather = format_gather_table(rows)
    if gather:
        print("\n".join(gather))
    print(f"reward: {row['reward_status']}")
    print("MFU peak: " + (f"{peak:g} TFLOP/s ({peak_source})" if peak is not None else "n/a (no known peak for this "
                                                                                       "device; give --peak-tflops)"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.markdown:
        _append_markdown(args.markdown, _markdown_section(meta, rows))
        print(f"appended to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
