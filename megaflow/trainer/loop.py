"""One trainer for every model and algorithm: rollout → reward → advantages → update → monitor."""
from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import torch

from megaflow.algorithms.advantages import compute_advantages
from megaflow.algorithms.registry import get_algorithm
from megaflow.config import Config, save_config, validate_config
from megaflow.data.prompts import PromptSet
from megaflow.errors import RewardError
from megaflow.models import get_adapter
from megaflow.models.base import Conditioning, ModelAdapter
from megaflow.monitor.progress import progress
from megaflow.monitor.writer import MetricsWriter
from megaflow.rewards import RewardSet
from megaflow.sampling.schedule import flow_sigmas
from megaflow.trainer.rollout import run_rollout
from megaflow.trainer.settings import SamplerSettings
from megaflow.trainer.state import save_checkpoint
from megaflow.trainer.update import UpdateSettings, policy_update

log = logging.getLogger("megaflow")


def resolve_model_path(path: str) -> Path:
    """`"tiny"` → the built-in tiny random Wan model (written once to the cache); else the path."""
    if path == "tiny":
        from megaflow.models.tiny import tiny_model_dir

        return tiny_model_dir()
    return Path(path)


def load_adapter(cfg: Config, device: torch.device) -> ModelAdapter:
    """Load the model and make its trainable part (LoRA or full) ready for training."""
    frozen_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    lora = cfg.model.lora
    transformer_dtype = frozen_dtype if lora else torch.float32
    adapter = get_adapter(cfg.model.family).from_pretrained(
        resolve_model_path(cfg.model.path), dtype=frozen_dtype, device=device, transformer_dtype=transformer_dtype)
    if lora:
        adapter.apply_lora(cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
    else:
        adapter.enable_full_finetune(keep_reference=cfg.algorithm.kl_beta > 0)
    return adapter


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Trainer:
    """Builds everything from a `Config` (validated before any model is loaded) and runs it."""

    def __init__(self, cfg: Config, *, show_progress: bool = True) -> None:
        validate_config(cfg)
        self.cfg = cfg
        self.show_progress = show_progress
        self.algorithm = get_algorithm(cfg.algorithm.name)
        self.prompts = (PromptSet.from_file(cfg.data.prompt_file, seed=cfg.seed) if cfg.data.prompt_file
                        else PromptSet(cfg.data.prompts, seed=cfg.seed))
        self.rewards = RewardSet(cfg.reward.components, cfg.reward.options)
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.output_dir / "config.yaml")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.adapter = load_adapter(cfg, self.device)
        self.latent_shape = self.adapter.latent_shape(cfg.video.frames, cfg.video.height, cfg.video.width)
        a = cfg.algorithm
        self.settings = SamplerSettings(
            sigmas=flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift),
            sde_kind=self.algorithm.sde_kind,
            noise_level=a.noise_level if a.noise_level is not None else self.algorithm.noise_level,
            guidance_scale=cfg.sampling.guidance_scale,
            precision=cfg.train.precision,
            logprob_backend=cfg.kernels.logprob,
        )
        self.update_settings = UpdateSettings(
            clip_range=a.clip_range, kl_beta=a.kl_beta, micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum, grad_clip=cfg.train.grad_clip)
        self.optimizer = torch.optim.AdamW(
            self.adapter.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2))
        self.writer = MetricsWriter(self.output_dir / "logs")
        self.use_cfg = cfg.sampling.guidance_scale > 1.0
        self.negative = self.adapter.encode_prompts([cfg.data.negative_prompt]) if self.use_cfg else None

    def conditioning(self, texts: list[str], group_size: int) -> Conditioning:
        """Embeddings of the iteration's prompts repeated per sample: `[P·G, L, D]`."""
        embeds = self.adapter.encode_prompts(texts).repeat_interleave(group_size, dim=0)
        negative = None if self.negative is None else self.negative.expand(embeds.shape[0], -1, -1)
        return Conditioning(embeds=embeds, negative=negative)

    def run_iteration(self, iteration: int) -> dict[str, float]:
        """One iteration end to end; returns its metrics (also written to TensorBoard/jsonl)."""
        cfg = self.cfg
        t_start = time.perf_counter()
        group_size = cfg.rollout.group_size
        batch = self.prompts.batch(iteration, cfg.data.prompts_per_iteration)
        texts = [text for _, text in batch]
        keys = [(slot, g) for slot in range(len(batch)) for g in range(group_size)]
        sample_prompts = [texts[slot] for slot, _ in keys]
        cond = self.conditioning(texts, group_size)
        fraction = cfg.algorithm.timestep_fraction or self.algorithm.timestep_fraction
        plan = self.algorithm.build_plan(cfg.sampling.num_steps, fraction, sample_keys=keys, seed=cfg.seed,
                                         iteration=iteration)
        scores: dict[str, list[torch.Tensor]] = {name: [] for name in self.rewards.weights}
        sample_videos: list[torch.Tensor] = []
        reward_time = 0.0

        def score(videos: torch.Tensor, idx: slice) -> None:
            nonlocal reward_time
            t0 = time.perf_counter()
            meta = [{"prompt_slot": keys[s][0], "sample": keys[s][1], "iteration": iteration}
                    for s in range(idx.start, idx.stop)]
            try:
                for name, value in self.rewards(videos.float().cpu(), sample_prompts[idx], meta).items():
                    scores[name].append(value)
            except RewardError as e:
                raise RewardError(f"iteration {iteration}: {e}") from e
            if idx.start < group_size:
                sample_videos.append(videos[: group_size - idx.start].float().cpu())
            reward_time += time.perf_counter() - t0

        t_rollout = time.perf_counter()
        rollout = run_rollout(
            self.adapter, cond, keys, plan, self.settings, latent_shape=self.latent_shape, seed=cfg.seed,
            iteration=iteration, chunk_size=cfg.rollout.chunk_size, micro_batch_size=cfg.train.micro_batch_size,
            share_noise=cfg.rollout.share_noise, on_videos=score, show_progress=self.show_progress)
        rollout_time = time.perf_counter() - t_rollout - reward_time
        components = {name: torch.cat(parts) for name, parts in scores.items()}
        total = self.rewards.weighted_sum(components)
        adv = compute_advantages(
            components, self.rewards.weights, rollout.slots, aggregation=cfg.algorithm.reward_aggregation,
            eps=cfg.algorithm.adv_eps, global_std=cfg.algorithm.global_std, clip_max=cfg.algorithm.adv_clip_max,
            drop_zero_std=cfg.algorithm.drop_zero_std_groups)
        t_update = time.perf_counter()
        update_metrics = policy_update(self.adapter, rollout, cond, adv.values, adv.weights, self.settings,
                                       self.update_settings, self.optimizer, show_progress=self.show_progress)
        update_time = time.perf_counter() - t_update
        metrics = {
            "reward/mean": float(total.mean()),
            "reward/std": float(total.std(unbiased=False)),
            **{f"reward/{name}": float(v.mean()) for name, v in components.items()},
            "advantage/zero_std_groups": float(adv.zero_std_groups),
            "advantage/abs_mean": float(adv.values.abs().mean()),
            **update_metrics,
            "optim/lr": self.optimizer.param_groups[0]["lr"],
            "nfe/rollout_per_sample": float(rollout.nfe_per_sample),
            "time/rollout_s": rollout_time,
            "time/reward_s": reward_time,
            "time/update_s": update_time,
            "time/iteration_s": time.perf_counter() - t_start,
            "memory/peak_gb": peak_memory_gb(self.device),
        }
        self.writer.log(iteration + 1, metrics)
        if cfg.train.sample_every and (iteration + 1) % cfg.train.sample_every == 0 and sample_videos:
            self.writer.log_video("samples/videos", torch.cat(sample_videos), iteration + 1)
            self.writer.log_text("samples/prompt", texts[0], iteration + 1)
        return metrics

    def train(self) -> list[dict[str, float]]:
        """Run `train.iterations` iterations, checkpointing every `train.save_every` and at the end."""
        cfg = self.cfg
        history = []
        try:
            for iteration in progress(range(cfg.train.iterations), "iterations", enabled=self.show_progress,
                                      unit="it"):
                metrics = self.run_iteration(iteration)
                history.append(metrics)
                log.info("iteration %d: reward %.4f, loss %.4g, %.1fs", iteration + 1, metrics["reward/mean"],
                         metrics["loss/total"], metrics["time/iteration_s"])
                done = iteration + 1
                if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == cfg.train.iterations:
                    save_checkpoint(self.adapter, self.output_dir, done)
        finally:
            self.writer.close()
        return history
