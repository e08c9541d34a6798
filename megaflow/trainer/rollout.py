"""Chunked rollouts: generate the iteration's samples and keep what the update needs.

For every trained step of every sample the rollout keeps `(x_i, x_{i+1}, log p_old)`, what the
update reads; for the other steps it keeps nothing. Noise is a function of `(seed, iteration, prompt slot,
sample, step)` only, so results do not depend on the chunk size or on where a sample runs.
At steps where some sample of the chunk is trained, the velocity is evaluated in
micro-batches of exactly the composition the update will use, which makes the update's
first ratio exactly 1 at any batch size. Whether a step is evaluated in micro-batches is decided
for the whole iteration (`subbatch_steps`: a step any sample of the iteration trains), so every
data-parallel rank runs the same number of forward calls at every step (ZeRO-3 gathers are
collective). Under sequence parallelism the velocity comes back as this rank's token shard; the
step runs on the gathered velocity and the log-prob on the shard, summed over the SP group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from megaflow.kernels import LogProbOut, sde_log_prob
from megaflow.models.base import Conditioning, ModelAdapter
from megaflow.monitor.progress import progress
from megaflow.sampling.plans import StepPlan
from megaflow.sampling.steps import step
from megaflow.seeds import generator
from megaflow.trainer.settings import SamplerSettings


@dataclass
class Rollout:
    """What the update consumes. S samples, K trained steps per sample, latents `[C, F, H, W]`."""

    slots: torch.Tensor  #: [S] long, the prompt's position in the iteration (its group)
    trained_steps: torch.Tensor  #: [S, K] long
    sigma: torch.Tensor  #: [S, K] float32
    sigma_next: torch.Tensor  #: [S, K] float32
    x: torch.Tensor  #: [S, K, C, F, H, W] float32, x_i
    x_next: torch.Tensor  #: [S, K, C, F, H, W] float32, x_{i+1}
    logp_old: torch.Tensor  #: [S, K] float32
    nfe_per_sample: int  #: velocity evaluations per sample


def initial_noise(keys: Sequence[tuple[int, int]], shape: tuple[int, ...], *, seed: int, iteration: int,
                  share_noise: bool) -> torch.Tensor:
    """`[len(keys), *shape]` float32 noise, one draw per `(slot, sample)` key (per slot if shared)."""
    return torch.stack([
        torch.randn(shape, generator=generator(seed, "init", iteration, slot, 0 if share_noise else sample))
        for slot, sample in keys
    ])


def step_noise(keys: Sequence[tuple[int, int]], shape: tuple[int, ...], *, seed: int, iteration: int,
               step_index: int) -> torch.Tensor:
    """`[len(keys), *shape]` float32 SDE noise of one step for each `(slot, sample)` key."""
    return torch.stack([
        torch.randn(shape, generator=generator(seed, "sde", iteration, slot, sample, step_index))
        for slot, sample in keys
    ])


def _velocity(adapter: ModelAdapter, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
              settings: SamplerSettings, sub_batch: int | None) -> torch.Tensor:
    """Velocity of the whole chunk in this rank's layout (`velocity_shard`), evaluated at once or
    in sub-batches of `sub_batch`."""
    with settings.autocast(x.device):
        if sub_batch is None or sub_batch >= x.shape[0]:
            return adapter.velocity_shard(x, sigma, cond, settings.guidance_scale, settings.embedded_guidance)
        return torch.cat([
            adapter.velocity_shard(x[i:i + sub_batch], sigma[i:i + sub_batch], cond.select(slice(i, i + sub_batch)),
                                   settings.guidance_scale, settings.embedded_guidance)
            for i in range(0, x.shape[0], sub_batch)
        ])


def step_log_prob(adapter: ModelAdapter, settings: SamplerSettings, kind: str, x: torch.Tensor, v_shard: torch.Tensor,
                  x_next: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float, *,
                  mean_ref_shard: torch.Tensor | None = None, sp_group: Any = None) -> LogProbOut:
    """Per-sample log p (and KL) `[B]` of `x → x_next` (`[B, C, F, H, W]`) for the velocity in this
    rank's layout. With an SP group: partial sums over this rank's tokens, summed over the group
    (gradient passed through, see `all_reduce_replicated`), divided by the total count."""
    common = dict(noise_level=settings.noise_level, sigma_max=settings.sigma_max, backend=settings.logprob_backend)
    if sp_group is None:
        return sde_log_prob(kind, x, v_shard, x_next, sigma, sigma_next, mean_ref=mean_ref_shard, **common)
    from megaflow.parallel.ulysses import all_reduce_replicated

    out = sde_log_prob(kind, adapter.shard_latent(x), v_shard, adapter.shard_latent(x_next), sigma, sigma_next,
                       mean_ref=mean_ref_shard, partial=True, **common)
    kl = out.kl if out.kl is not None else torch.zeros_like(out.log_prob)
    total = all_reduce_replicated(torch.stack([out.log_prob, kl, out.count.to(out.log_prob.dtype)]), sp_group)
    return LogProbOut(log_prob=total[0] / total[2], std=out.std,
                      kl=None if out.kl is None else total[1] / total[2])


@torch.no_grad()
def run_rollout(adapter: ModelAdapter, cond: Conditioning, keys: Sequence[tuple[int, int]], plan: StepPlan,
                settings: SamplerSettings, *, latent_shape: tuple[int, int, int, int], seed: int, iteration: int,
                chunk_size: int, micro_batch_size: int, share_noise: bool,
                on_videos: Callable[[torch.Tensor, slice], None] | None, show_progress: bool = True,
                subbatch_steps: set[int] | None = None, sp_group: Any = None) -> Rollout:
    """Generate `len(keys)` samples (`keys[s] = (slot, sample)`) in chunks, decode each chunk and
    hand its videos `[c, F, 3, H, W]` to `on_videos(videos, sample_slice)` (None: no decode, the
    SP ranks other than the group's first). `subbatch_steps`: steps evaluated in micro-batches
    (default: the steps `plan` trains for some sample)."""
    device = adapter.device
    sigmas = settings.sigmas
    n, k_steps = len(keys), plan.steps_per_sample
    store = {name: torch.empty((n, k_steps) + latent_shape) for name in ("x", "x_next")}
    logp_old = torch.empty(n, k_steps)
    trained = torch.tensor(plan.trained, dtype=torch.long).reshape(n, k_steps)
    if subbatch_steps is None:
        subbatch_steps = {i for steps in plan.trained for i in steps}
    bar = progress(n * plan.num_steps, "rollout", enabled=show_progress, unit="step", leave=False)
    for start in range(0, n, chunk_size):
        idx = slice(start, min(start + chunk_size, n))
        chunk_keys = keys[idx]
        chunk_cond = cond.select(idx)
        c = len(chunk_keys)
        x = initial_noise(chunk_keys, latent_shape, seed=seed, iteration=iteration, share_noise=share_noise).to(device)
        for i in range(plan.num_steps):
            sigma = sigmas[i].expand(c).to(device)
            slot_of = {s: list(plan.trained[start + s]).index(i) for s in range(c) if i in plan.trained[start + s]}
            v_shard = _velocity(adapter, x, sigma, chunk_cond, settings,
                                micro_batch_size if i in subbatch_steps else None)
            v = adapter.unshard(v_shard, x)
            kind = settings.sde_kind if plan.sde[i] else "ode"
            noise = None
            if kind != "ode":
                noise = step_noise(chunk_keys, latent_shape, seed=seed, iteration=iteration, step_index=i).to(device)
            out = step(kind, x, v, sigmas[i], sigmas[i + 1], noise_level=settings.noise_level,
                       sigma_max=settings.sigma_max, noise=noise, compute_log_prob=False)
            if slot_of:
                for m0 in range(0, c, micro_batch_size):
                    mb = slice(m0, m0 + micro_batch_size)
                    lp = step_log_prob(adapter, settings, kind, x[mb], v_shard[mb], out.prev_sample[mb], sigmas[i],
                                       sigmas[i + 1], sp_group=sp_group).log_prob
                    for s in range(m0, min(m0 + micro_batch_size, c)):
                        if s in slot_of:
                            g, k = start + s, slot_of[s]
                            store["x"][g, k] = x[s].cpu()
                            store["x_next"][g, k] = out.prev_sample[s].cpu()
                            logp_old[g, k] = lp[s - m0].cpu()
            x = out.prev_sample
            bar.update(c)
        if on_videos is not None:
            on_videos(adapter.decode(x.to(adapter.dtype)), idx)
    bar.close()
    return Rollout(
        slots=torch.tensor([slot for slot, _ in keys], dtype=torch.long),
        trained_steps=trained,
        sigma=sigmas[trained],
        sigma_next=sigmas[trained + 1],
        x=store["x"], x_next=store["x_next"], logp_old=logp_old,
        nfe_per_sample=plan.num_steps,
    )
