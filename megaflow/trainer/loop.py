"""One trainer for every model and algorithm: rollout → reward → advantages → update → monitor."""
from __future__ import annotations

import contextlib
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaflow.algorithms.advantages import Advantages, best_of, compute_advantages
from megaflow.algorithms.losses import LOSSES
from megaflow.algorithms.registry import (
    PlanContext,
    get_algorithm,
    group_ids,
    resolved_noise_level,
    resolved_sde_kind,
)
from megaflow.config import Config, save_config, validate_config, validate_parallel
from megaflow.data.prompts import PromptSet
from megaflow.errors import ConfigError, RewardError
from megaflow.data.images import load_image
from megaflow.models import get_adapter, resolve_model_path
from megaflow.models.base import Conditioning, ModelAdapter
from megaflow.models.vae import configure_vae
from megaflow.models.random_model import folder_transformer_loader, is_random_folder, random_weights_seed
from megaflow.monitor.progress import progress
from megaflow.monitor.writer import MetricsWriter
from megaflow.rewards import RewardSet
from megaflow.parallel.attention import apply_attention_backend, check_attention_backend
from megaflow.parallel.checkpointing import apply_activation_checkpointing
from megaflow.parallel.compile import compile_blocks
from megaflow.parallel.topology import init_topology, launched_world_size
from megaflow.sampling.plans import StepPlan
from megaflow.sampling.schedule import flow_sigmas
from megaflow.seeds import derive_seed
from megaflow.trainer.rollout import run_program
from megaflow.trainer.scoring import ChunkScorer
from megaflow.trainer.settings import SamplerSettings
from megaflow.trainer.preemption import StopRequest
from megaflow.trainer.ema import EMA
from megaflow.trainer.state import (
    check_resumable,
    find_resumable,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from megaflow.trainer.update import DistributedUpdate, UpdateSettings, local_sample_indices, policy_update

log = logging.getLogger("megaflow")


def load_adapter(cfg: Config, device: torch.device, transformer_loader: Any = None) -> ModelAdapter:
    """Load the model and make its trainable part (LoRA or full) ready for training.

    LoRA initialisation draws from torch's generator, seeded from `cfg.seed` so that every rank
    and every layout starts from the same weights. With `data.text_cache` the text encoders are
    not loaded (the prompts come from the cache, `megaflow.data.text_cache`). A random folder
    (`model.path=random:...`) gets random transformer weights seeded from `cfg.seed`."""
    frozen_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    lora = cfg.model.lora
    transformer_dtype = frozen_dtype if lora else torch.float32
    folder = resolve_model_path(cfg.model.path, cfg.model.family)
    if transformer_loader is None:
        transformer_loader = folder_transformer_loader(folder, device, cfg.seed)
    adapter = get_adapter(cfg.model.family).from_pretrained(
        folder, dtype=frozen_dtype, device=device, transformer_dtype=transformer_dtype,
        transformer_loader=transformer_loader, text_encoders=not cfg.data.text_cache)
    torch.manual_seed(derive_seed(cfg.seed, "init") % 2**62)
    if lora:
        adapter.apply_lora(cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
    if cfg.model.init_weights:
        from megaflow.parallel.engine import gathered_for_write

        stage = cfg.parallel.zero_stage
        adapter.init_trainable(cfg.model.init_weights, gather=lambda params: gathered_for_write(params, stage),
                               read=stage != 3 or not dist.is_initialized() or dist.get_rank() == 0)
    if not lora:
        adapter.enable_full_finetune(keep_reference=cfg.algorithm.kl_beta > 0 and cfg.parallel.zero_stage != 3,
                                     reference_dtype=frozen_dtype)
    return adapter


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Trainer:
    """Builds everything from a `Config` (validated, layout checked, before any model is loaded)
    and runs it: one process, or every rank of a `deepspeed` / `torchrun` launch.

    `resume`: None (start fresh), "auto" (the newest complete checkpoint under `output_dir`, if
    any) or a checkpoint directory.
    """

    def __init__(self, cfg: Config, *, show_progress: bool = True, resume: str | None = None) -> None:
        validate_config(cfg)
        validate_parallel(cfg, launched_world_size())
        check_attention_backend(cfg.model.attention_backend)
        p = cfg.parallel
        adapter_cls = get_adapter(cfg.model.family)
        if p.sp_size > 1:
            from megaflow.parallel.ulysses import check_heads_divisible

            check_heads_divisible(adapter_cls.attention_heads(resolve_model_path(cfg.model.path, cfg.model.family)),
                                  p.sp_size)
        embedded = cfg.sampling.embedded_guidance
        if embedded is not None and adapter_cls.default_embedded_guidance is None:
            raise ConfigError(f"sampling.embedded_guidance={embedded}, but model family '{cfg.model.family}' has no "
                              "embedded guidance input; use sampling.guidance_scale (true CFG) or leave it null")
        self.prompts = (PromptSet.from_file(cfg.data.prompt_file, seed=cfg.seed) if cfg.data.prompt_file
                        else PromptSet(cfg.data.prompts, seed=cfg.seed))
        if adapter_cls.needs_image and self.prompts.images is None:
            raise ConfigError(f"model family '{cfg.model.family}' is image-to-video: set data.prompt_file to a JSONL "
                              "file of {\"prompt\": ..., \"image\": path} records")
        self.topo = init_topology(p.sp_size, need_distributed=p.zero_stage > 0)
        self.cfg = cfg
        self.show_progress = show_progress and self.topo.is_main
        self.output_dir = Path(cfg.output_dir)
        resume_from = find_resumable(self.output_dir, resume, warn=self.topo.is_main) if resume else None
        if resume_from is not None:
            check_resumable(resume_from, family=cfg.model.family, lora=cfg.model.lora, zero_stage=p.zero_stage,
                            world_size=self.topo.world_size, sp_size=p.sp_size, ema=cfg.train.ema_decay is not None)
        self.algorithm = get_algorithm(cfg.algorithm.name)
        self.device = (torch.device("cuda", self.topo.local_rank) if torch.cuda.is_available()
                       else torch.device("cpu"))
        self.rewards = RewardSet(cfg.reward.components, cfg.reward.options, lazy=True, offload=cfg.reward.offload,
                                 device=str(self.device) if cfg.reward.device == "same" else cfg.reward.device)
        if self.topo.is_sp_leader:
            self.rewards.build()
        self.scorer = ChunkScorer(self.rewards, overlap=cfg.reward.overlap)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.topo.is_main:
            save_config(cfg, self.output_dir / "config.yaml")
        a = cfg.algorithm
        self.fraction = a.timestep_fraction or self.algorithm.timestep_fraction
        self.algorithm_state = self.algorithm.initial_state()
        steps_per_sample = self.plan(0, [(0, 0)]).steps_per_sample
        num_micro = cfg.samples_per_iteration // cfg.train.micro_batch_size
        window = num_micro if cfg.train.grad_accum is None else cfg.train.grad_accum
        self.engine = None
        loader = None
        if p.zero_stage > 0:
            from megaflow.parallel.engine import load_ds_config, zero3_transformer_loader

            self.ds_config, adamw = load_ds_config(
                cfg, grad_accum_steps=max(1, window // self.topo.dp_size * steps_per_sample))
            if p.zero_stage == 3:
                weightless = is_random_folder(resolve_model_path(cfg.model.path, cfg.model.family))
                loader = zero3_transformer_loader(self.ds_config, weights=not weightless,
                                                  seed=random_weights_seed(cfg.seed))
        self.adapter = load_adapter(cfg, self.device, loader)
        configure_vae(self.adapter, cfg.model.vae_tiling, cfg.model.vae_slicing)
        self._build_parallel(loader, adamw if p.zero_stage > 0 else None)
        self.ema = None
        if cfg.train.ema_decay is not None:
            trainable = [(n, q) for n, q in self.adapter.transformer.named_parameters() if q.requires_grad]
            self.ema = EMA(trainable, decay=cfg.train.ema_decay, every=cfg.train.ema_every, zero_stage=p.zero_stage)
        self.optimizer_steps = 0
        self.latent_shape = self.adapter.latent_shape(cfg.video.frames, cfg.video.height, cfg.video.width)
        self.settings = SamplerSettings(
            sigmas=flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift),
            sde_kind=resolved_sde_kind(cfg),
            noise_level=resolved_noise_level(cfg),
            guidance_scale=cfg.sampling.guidance_scale,
            precision=cfg.train.precision,
            logprob_backend=cfg.kernels.logprob,
            embedded_guidance=embedded if embedded is not None else adapter_cls.default_embedded_guidance,
        )
        self.update_settings = UpdateSettings(
            clip_range=a.clip_range, kl_beta=a.kl_beta, micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum, grad_clip=cfg.train.grad_clip, loss=a.loss)
        self.use_cfg = cfg.sampling.guidance_scale > 1.0
        self.text_cache = None  # data.text_cache: prompts from the cache, checked (or filled) here
        if cfg.data.text_cache:
            from megaflow.data.text_cache import open_for_training

            self.text_cache = open_for_training(cfg, self.adapter, self.prompts, show_progress=self.show_progress)
        self.negative = ((self.adapter.encode_prompts if self.text_cache is None else self.text_cache.text)(
            [cfg.data.negative_prompt]).to(self.device) if self.use_cfg else None)
        self.start_iteration = 0
        if resume_from is not None:
            self.start_iteration = load_checkpoint(resume_from, self.adapter, optimizer=self.optimizer,
                                                   engine=self.engine, topo=self.topo, ema=self.ema)
            state = read_trainer_state(resume_from)
            self.algorithm_state = state.get("algorithm", self.algorithm_state)
            self.optimizer_steps = int(state.get("optimizer_steps", 0))
            log.info("resumed from %s at iteration %d", resume_from, self.start_iteration)
        elif resume and self.topo.is_main:
            log.info("--resume %s: no complete checkpoint under %s; starting from iteration 0", resume,
                     self.output_dir / "checkpoints")
        # A resumed run logs its iterations again from the checkpoint on: what an earlier run logged
        # after it goes, so every iteration appears once.
        self.writer = (MetricsWriter(self.output_dir / "logs", purge_step=self.start_iteration + 1 if resume else None)
                       if self.topo.is_main else None)

    def _build_parallel(self, loader: Any, adamw: dict[str, Any] | None) -> None:
        """Reference engine, sequence parallelism, attention backend, activation checkpointing,
        regional compile, ZeRO leaf modules and the DeepSpeed engine (or the plain optimizer on the
        single-process path)."""
        cfg, topo, adapter = self.cfg, self.topo, self.adapter
        stage = cfg.parallel.zero_stage
        mpu = None
        if stage > 0:
            from megaflow.parallel.engine import gradient_divisor, initialize_engine, reference_engine, set_leaf_modules
            from megaflow.parallel.topology import Mpu

            mpu = Mpu(topo)
        if stage == 3 and not adapter.uses_lora and cfg.algorithm.kl_beta > 0:
            folder = resolve_model_path(cfg.model.path, cfg.model.family) / "transformer"
            reference = loader(type(adapter.transformer), folder, adapter.transformer_dtype).requires_grad_(False)
            set_leaf_modules(reference, adapter.block_classes)
            self.reference_engine = reference_engine(reference, self.ds_config, mpu)
            adapter._reference = reference
        if topo.sp_size > 1:
            adapter.enable_sequence_parallel(topo.sp_group)
        models = [m for m in (adapter.transformer, adapter._reference) if m is not None]
        for model in models:
            apply_attention_backend(model, cfg.model.attention_backend)
        apply_activation_checkpointing(adapter.transformer, adapter.block_classes, cfg.train.grad_checkpointing)
        if cfg.train.compile:  # last, once the blocks are what they will run (tracing is at the first forward)
            for model in models:
                compile_blocks(model, adapter.block_classes)
        self.loss_scale = 1.0
        if stage == 0:
            self.optimizer = torch.optim.AdamW(
                adapter.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps)
            return
        if stage == 3:
            set_leaf_modules(adapter.transformer, adapter.block_classes)
        self.engine, self.optimizer = initialize_engine(adapter.transformer, adapter.trainable_parameters(),
                                                        self.ds_config, adamw, mpu)
        adapter.engine = self.engine
        self.loss_scale = float(gradient_divisor(self.ds_config, topo.world_size, topo.sp_size))

    def images(self, batch: list[tuple[int, str]]) -> torch.Tensor | None:
        """The conditioning images of an iteration's prompts `[P, 3, H, W]` in [0, 1] (None: T2V)."""
        if self.prompts.images is None:
            return None
        v = self.cfg.video
        return torch.stack([load_image(str(self.prompts.images[idx]), v.height, v.width) for idx, _ in batch])

    def conditioning(self, texts: list[str], images: torch.Tensor | None) -> Conditioning:
        """Each prompt's conditioning `[P, ...]`: its text branch and, for I2V, its image encoded once;
        the negative prompt's own branch for CFG. A sample's is its prompt's row. With a text cache
        the text (and an I2V family's image-encoder output) comes from it."""
        cache = getattr(self, "text_cache", None)
        text = self.adapter.encode_prompts(texts) if cache is None else cache.text(texts, self.device)
        negative = None if self.negative is None else self.negative.expand(len(text))
        extra = {}
        if self.adapter.needs_image:
            cached = ({} if cache is None or self.adapter.cached_image_key is None
                      else {"cached": cache.images(images, self.device)})
            extra = self.adapter.image_conditioning(images.to(self.device), self.latent_shape, **cached)
        return Conditioning(text=text, negative=negative, extra=extra)

    def plan(self, iteration: int, keys: list[tuple[int, int]]) -> StepPlan:
        """The algorithm's plan of `iteration` for `keys`, from its current state."""
        cfg = self.cfg
        ctx = PlanContext(num_steps=cfg.sampling.num_steps, shift=cfg.sampling.shift, fraction=self.fraction,
                          options=cfg.algorithm, sample_keys=keys, group_size=cfg.rollout.group_size, seed=cfg.seed,
                          iteration=iteration)
        return self.algorithm.build_plan(ctx, self.algorithm_state)

    def _gather_rewards(self, local_idx: list[int], local: dict[str, torch.Tensor] | None,
                        n: int, columns: int) -> dict[str, torch.Tensor]:
        """Every sample's reward components and sub-scores `[n, columns]`, in global order, on every
        rank (each SP group's first rank contributes the scores of its samples)."""
        parts = [(local_idx, local)]
        if self.topo.distributed:
            parts = [None] * self.topo.world_size
            dist.all_gather_object(parts, (local_idx, local))
        full: dict[str, torch.Tensor] = {}
        for idx, comps in parts:
            if comps is not None:
                for name, values in comps.items():
                    full.setdefault(name, torch.empty(n, columns))[torch.tensor(idx, dtype=torch.long)] = values.float()
        return full

    def advantages(self, components: dict[str, torch.Tensor], groups: torch.Tensor) -> Advantages:
        """Group advantages of the iteration, then best-of-n selection if asked (`rollout.best_of`)."""
        a, r = self.cfg.algorithm, self.cfg.rollout
        common = dict(aggregation=a.reward_aggregation, eps=a.adv_eps, global_std=a.global_std,
                      clip_max=a.adv_clip_max, drop_zero_std=a.drop_zero_std_groups)
        adv = compute_advantages(components, self.rewards.weights, groups, **common)
        if r.best_of is None:
            return adv
        keep = best_of(adv.values, groups, r.best_of)
        if r.best_of_renormalize:
            return compute_advantages(components, self.rewards.weights, groups, keep=keep, **common)
        return Advantages(values=adv.values * keep, weights=adv.weights * keep, zero_std_groups=adv.zero_std_groups)

    def run_iteration(self, iteration: int) -> dict[str, float]:
        """One iteration end to end; returns its metrics (written to TensorBoard/jsonl by rank 0)."""
        cfg, topo = self.cfg, self.topo
        t_start = time.perf_counter()
        batch = self.prompts.batch(iteration, cfg.data.prompts_per_iteration)
        texts = [text for _, text in batch]
        keys = self.algorithm.sample_keys(len(batch), cfg.rollout.group_size, cfg.algorithm, cfg.sampling.num_steps)
        groups = group_ids(keys, cfg.rollout.group_size)
        n = len(keys)
        local_idx = local_sample_indices(n, cfg.train.micro_batch_size, topo.dp_size, topo.dp_rank)
        local_keys = [keys[i] for i in local_idx]
        images = self.images(batch)
        prompt_cond = self.conditioning(texts, images)
        cond = prompt_cond.select([slot for slot, _ in local_keys])
        plan = self.plan(iteration, keys)
        columns = self.algorithm.score_columns(cfg.algorithm)
        sample_videos: list[torch.Tensor] = []
        self.scorer.reset()

        def score(videos: torch.Tensor, idx: slice, column: int) -> None:
            chunk_keys = local_keys[idx]
            meta = [{**self.prompts.metadata[batch[slot][0]], "prompt_slot": slot, "sample": g, "iteration": iteration}
                    for slot, g in chunk_keys]
            if images is not None:
                for m in meta:
                    m["image"] = images[m["prompt_slot"]]
            first_group = [i for i, (slot, g) in enumerate(chunk_keys) if slot == 0 and g < cfg.rollout.group_size]
            if topo.is_main and first_group and column == 0:
                sample_videos.append(videos[first_group].float().cpu())
            self.scorer.submit(column, videos, [texts[slot] for slot, _ in chunk_keys], meta)

        t_rollout = time.perf_counter()
        with self._rollout_weights():
            rollout = self.rollout(prompt_cond, cond, local_keys, plan.select(local_idx), iteration, on_videos=score,
                                   subbatch_steps={i for steps in plan.trained for i in steps},
                                   show_progress=self.show_progress)
        try:
            scored = self.scorer.results()
        except RewardError as e:
            raise RewardError(f"iteration {iteration}: {e}") from e
        rollout_time = time.perf_counter() - t_rollout - self.scorer.exposed_s
        local_scores = None
        if topo.is_sp_leader:
            per_column: dict[str, dict[int, list[torch.Tensor]]] = {}
            for column, result in scored:
                for name, value in {**result.components, **result.details}.items():
                    per_column.setdefault(name, {}).setdefault(column, []).append(value)
            local_scores = {name: torch.stack([torch.cat(cols[c]) for c in range(columns)], dim=1)
                            for name, cols in per_column.items()}
        gathered = self._gather_rewards(local_idx, local_scores, n, columns)
        components = {name: gathered[name] for name in self.rewards.weights}
        details = {name: v for name, v in gathered.items() if name not in self.rewards.weights}
        total = self.rewards.weighted_sum(components)
        adv = self.advantages(components, groups)
        t_update = time.perf_counter()
        mine = torch.tensor(local_idx, dtype=torch.long)
        layout = self.update_layout()
        update_metrics = policy_update(self.adapter, rollout, cond, adv.values[mine], adv.weights[mine], self.settings,
                                       self.update_settings, self.optimizer, show_progress=self.show_progress,
                                       layout=layout, global_weights=adv.weights,
                                       on_optimizer_step=self._after_optimizer_step)
        update_time = time.perf_counter() - t_update
        if self.algorithm.advance is not None:
            self.algorithm_state = self.algorithm.advance(cfg.algorithm, cfg.sampling.num_steps, self.algorithm_state)
        peak = peak_memory_gb(self.device)
        if topo.distributed:
            peak_t = torch.tensor([peak], dtype=torch.float64)
            dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
            peak = float(peak_t)
        trained_steps = sorted({i for steps in plan.trained for i in steps})
        metrics = {
            "reward/mean": float(total.mean()),
            "reward/std": float(total.std(unbiased=False)),
            **{f"reward/{name}/{stat}": float(v.mean() if stat == "mean" else v.std(unbiased=False))
               for name, v in components.items() for stat in ("mean", "std")},
            **{f"reward/{name}": float(v.mean()) for name, v in details.items()},
            "advantage/zero_std_groups": float(adv.zero_std_groups),
            "advantage/abs_mean": float(adv.values.abs().mean()),
            "advantage/trained_fraction": float((adv.weights > 0).float().mean()),
            **update_metrics,
            "optim/lr": self.optimizer.param_groups[0]["lr"],
            "nfe/rollout_per_sample": float(rollout.nfe_per_sample),
            "plan/first_trained_step": float(trained_steps[0]),
            "plan/steps": float(plan.num_steps),
            "time/rollout_s": rollout_time,
            "time/reward_s": self.scorer.reward_s,
            "time/reward_exposed_s": self.scorer.exposed_s,
            "time/update_s": update_time,
            "time/iteration_s": time.perf_counter() - t_start,
            "memory/peak_gb": peak,
        }
        sampled = bool(cfg.train.sample_every and (iteration + 1) % cfg.train.sample_every == 0 and sample_videos)
        if self.writer is not None and sampled:
            videos = torch.cat(sample_videos)
            meta = [dict(self.prompts.metadata[batch[0][0]]) for _ in range(len(videos))]
            metrics.update({name: float(v.mean())
                            for name, v in self.rewards.monitor(videos, [texts[0]] * len(videos), meta).items()})
        if self.writer is not None:
            self.writer.log(iteration + 1, metrics)
            if sampled:
                self.writer.log_video("samples/videos", videos, iteration + 1)
                self.writer.log_text("samples/prompt", texts[0], iteration + 1)
        return metrics

    def rollout(self, prompt_cond: Conditioning, cond: Conditioning, local_keys: list[tuple[int, int]],
                plan: StepPlan, iteration: int, *, on_videos: Any, subbatch_steps: set[int],
                show_progress: bool) -> Any:
        """The algorithm's rollout program over this rank's samples `local_keys` (their `cond`, their
        `plan`) with the run's sampler, chunking, noise and layout settings (`run_program`)."""
        cfg, topo = self.cfg, self.topo
        return run_program(
            self.algorithm.program, self.adapter, prompt_cond, cond, local_keys, plan, self.settings,
            latent_shape=self.latent_shape, seed=cfg.seed, iteration=iteration, chunk_size=cfg.rollout.chunk_size,
            micro_batch_size=cfg.train.micro_batch_size, share_noise=cfg.rollout.share_noise, on_videos=on_videos,
            show_progress=show_progress, subbatch_steps=subbatch_steps,
            sp_group=topo.sp_group if topo.sp_size > 1 else None,
            keep_mean=LOSSES[cfg.algorithm.loss].needs_old_mean, collective=cfg.parallel.zero_stage == 3,
            **self.algorithm.program_options(cfg.algorithm))

    def update_layout(self) -> DistributedUpdate:
        """How `policy_update` splits and reduces over this run's ranks."""
        topo = self.topo
        return DistributedUpdate(engine=self.engine, dp_size=topo.dp_size, dp_rank=topo.dp_rank,
                                 dp_group=topo.dp_group if topo.distributed else None,
                                 sp_group=topo.sp_group if topo.sp_size > 1 else None, loss_scale=self.loss_scale)

    def _after_optimizer_step(self) -> None:
        """Count the job's optimizer steps (they survive a resume) and update the EMA."""
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.update(self.optimizer_steps)

    def _rollout_weights(self) -> Any:
        """With `rollout.gather_weights` under ZeRO-3: the whole transformer gathered once for the
        rollout (kept whole across layers and steps); otherwise per-layer gathers as usual."""
        if not self.cfg.rollout.gather_weights:
            return contextlib.nullcontext()
        from megaflow.parallel.engine import gathered_for_rollout

        return gathered_for_rollout(self.adapter.transformer)

    def save(self, iteration: int) -> Path:
        """Checkpoint after `iteration` iterations (collective)."""
        return save_checkpoint(self.adapter, self.output_dir, iteration, optimizer=self.optimizer,
                               engine=self.engine, topo=self.topo, keep=self.cfg.train.keep_checkpoints,
                               zero_stage=self.cfg.parallel.zero_stage, ema=self.ema,
                               trainer_state={"algorithm": self.algorithm_state, "optimizer_steps": self.optimizer_steps})

    def train(self) -> list[dict[str, float]]:
        """Run iterations `start_iteration .. train.iterations-1`, checkpointing every
        `train.save_every` and at the end. On SIGTERM / SIGUSR1 (any rank) every rank finishes
        the current iteration, checkpoints it and returns (`stopped_by` names the signal)."""
        cfg = self.cfg
        history = []
        self.stopped_by: str | None = None
        try:
            with StopRequest() as stop:
                for iteration in progress(range(self.start_iteration, cfg.train.iterations), "iterations",
                                          enabled=self.show_progress, unit="it"):
                    metrics = self.run_iteration(iteration)
                    history.append(metrics)
                    if self.topo.is_main:
                        log.info("iteration %d: reward %.4f, loss %.4g, %.1fs", iteration + 1, metrics["reward/mean"],
                                 metrics["loss/total"], metrics["time/iteration_s"])
                    done = iteration + 1
                    stopping = stop.agreed(self.device)
                    if (stopping or (cfg.train.save_every and done % cfg.train.save_every == 0)
                            or done == cfg.train.iterations):
                        path = self.save(done)
                    if stopping:
                        self.stopped_by = stopping
                        if self.topo.is_main:
                            log.warning("stopped by %s after iteration %d; checkpoint %s (continue with --resume auto)",
                                        self.stopped_by, done, path)
                        break
        finally:
            self.scorer.close()
            if self.writer is not None:
                self.writer.close()
        return history
