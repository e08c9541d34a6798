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
from megaflow.parallel.decode import spread_decode
from megaflow.sampling.plans import StepPlan, granular_indices
from megaflow.sampling.steps import StepOutput, step
from megaflow.seeds import generator
from megaflow.trainer.settings import SamplerSettings


@dataclass
class Rollout:
    """What the update consumes. S samples, K trained steps per sample, latents `[C, F, H, W]`."""

    slots: torch.Tensor  #: [S] long, the prompt's position in the iteration
    trained_steps: torch.Tensor  #: [S, K] long
    sigma: torch.Tensor  #: [S, K] float32
    sigma_next: torch.Tensor  #: [S, K] float32
    x: torch.Tensor  #: [S, K, C, F, H, W] float32, x_i
    x_next: torch.Tensor  #: [S, K, C, F, H, W] float32, x_{i+1}
    logp_old: torch.Tensor  #: [S, K] float32
    nfe_per_sample: float  #: velocity evaluations per trained sample
    mean_old: torch.Tensor | None = None  #: [S, K, C, F, H, W] float32, the step's mean (losses that need it)


class _Store:
    """The trained transitions of S samples × K steps, filled step by step."""

    def __init__(self, n: int, k_steps: int, latent_shape: tuple[int, ...], keep_mean: bool) -> None:
        names = ("x", "x_next", "mean") if keep_mean else ("x", "x_next")
        self.t = {name: torch.empty((n, k_steps) + latent_shape) for name in names}
        self.logp = torch.empty(n, k_steps)

    def put(self, g: int, k: int, x: torch.Tensor, x_next: torch.Tensor, mean: torch.Tensor, logp: torch.Tensor) -> None:
        self.t["x"][g, k] = x.cpu()
        self.t["x_next"][g, k] = x_next.cpu()
        if "mean" in self.t:
            self.t["mean"][g, k] = mean.cpu()
        self.logp[g, k] = logp.cpu()

    def rollout(self, keys: Sequence[tuple[int, int]], trained: torch.Tensor, sigmas: torch.Tensor,
                nfe_per_sample: float) -> Rollout:
        return Rollout(slots=torch.tensor([slot for slot, _ in keys], dtype=torch.long), trained_steps=trained,
                       sigma=sigmas[trained], sigma_next=sigmas[trained + 1], x=self.t["x"],
                       x_next=self.t["x_next"], logp_old=self.logp, nfe_per_sample=nfe_per_sample,
                       mean_old=self.t.get("mean"))


def initial_noise(keys: Sequence[tuple[int, int]], shape: tuple[int, ...], *, seed: int, iteration: int,
                  share_noise: bool) -> torch.Tensor:
    """`[len(keys), *shape]` float32 noise, one draw per `(slot, sample)` key (per slot if shared)."""
    return torch.stack([
        torch.randn(shape, generator=generator(seed, "init", iteration, slot, 0 if share_noise else sample))
        for slot, sample in keys
    ])


def step_noise(keys: Sequence[tuple[int, int]], shape: tuple[int, ...], *, seed: int, iteration: int,
               step_index: int | Sequence[int]) -> torch.Tensor:
    """`[len(keys), *shape]` float32 SDE noise of one step for each `(slot, sample)` key (`step_index`:
    one step for all, or each key's own)."""
    steps = [step_index] * len(keys) if isinstance(step_index, int) else list(step_index)
    return torch.stack([
        torch.randn(shape, generator=generator(seed, "sde", iteration, slot, sample, i))
        for (slot, sample), i in zip(keys, steps)
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
                  mean_ref_shard: torch.Tensor | None = None, mean_old_shard: torch.Tensor | None = None,
                  sp_group: Any = None) -> LogProbOut:
    """Per-sample log p (and KL, RatioNorm) `[B]` of `x → x_next` (`[B, C, F, H, W]`) for the velocity
    in this rank's layout. With an SP group: partial sums over this rank's tokens, summed over the
    group (gradient passed through, see `all_reduce_replicated`), divided by the total count."""
    common = dict(noise_level=settings.noise_level, sigma_max=settings.sigma_max, backend=settings.logprob_backend,
                  mean_ref=mean_ref_shard, mean_old=mean_old_shard)
    if sp_group is None:
        return sde_log_prob(kind, x, v_shard, x_next, sigma, sigma_next, **common)
    from megaflow.parallel.ulysses import all_reduce_replicated

    out = sde_log_prob(kind, adapter.shard_latent(x), v_shard, adapter.shard_latent(x_next), sigma, sigma_next,
                       partial=True, **common)
    zeros = torch.zeros_like(out.log_prob)
    parts = [out.log_prob, zeros if out.kl is None else out.kl, zeros if out.ratio_norm is None else out.ratio_norm]
    total = all_reduce_replicated(torch.stack(parts + [out.count.to(out.log_prob.dtype)]), sp_group)
    return LogProbOut(log_prob=total[0] / total[3], std=out.std,
                      kl=None if out.kl is None else total[1] / total[3],
                      ratio_norm=None if out.ratio_norm is None else total[2] / total[3])


def _trained_step(adapter: ModelAdapter, settings: SamplerSettings, kind: str, store: _Store, x: torch.Tensor,
                  v_shard: torch.Tensor, out: StepOutput, sigma: torch.Tensor, sigma_next: torch.Tensor,
                  slot_of: dict[int, tuple[int, int]], micro_batch_size: int, sp_group: Any) -> None:
    """Old log-probs of a chunk's stochastic step in update-sized micro-batches; keep the
    transitions of the samples that train it (`slot_of[s] = (global sample, trained slot)`)."""
    for m0 in range(0, x.shape[0], micro_batch_size):
        mb = slice(m0, m0 + micro_batch_size)
        if not any(s in slot_of for s in range(m0, min(m0 + micro_batch_size, x.shape[0]))):
            continue
        lp = step_log_prob(adapter, settings, kind, x[mb], v_shard[mb], out.prev_sample[mb], sigma[mb],
                           sigma_next[mb], sp_group=sp_group).log_prob
        for s in range(m0, min(m0 + micro_batch_size, x.shape[0])):
            if s in slot_of:
                store.put(*slot_of[s], x[s], out.prev_sample[s], out.mean[s], lp[s - m0])


@torch.no_grad()
def run_rollout(adapter: ModelAdapter, cond: Conditioning, keys: Sequence[tuple[int, int]], plan: StepPlan,
                settings: SamplerSettings, *, latent_shape: tuple[int, int, int, int], seed: int, iteration: int,
                chunk_size: int, micro_batch_size: int, share_noise: bool,
                on_videos: Callable[[torch.Tensor, slice, int], None] | None, show_progress: bool = True,
                subbatch_steps: set[int] | None = None, sp_group: Any = None, keep_mean: bool = False) -> Rollout:
    """The chain program: generate `len(keys)` samples (`keys[s] = (slot, sample)`) along `plan`
    (its grid and per-step solver: Euler, the SDE kind, or DPM-Solver++(2M), whose history of
    data predictions runs through every step of a sample) in chunks; decode each chunk and hand
    its videos `[c, F, 3, H, W]` to `on_videos(videos, sample_slice, 0)` (None: no decode). Under
    sequence parallelism every rank of the group decodes a share of the chunk and only the group's
    first rank calls `on_videos` (`megaflow.parallel.decode`), so all pass it or none.
    `subbatch_steps`: steps evaluated in micro-batches (default: the steps `plan` trains for some
    sample). `keep_mean`: also keep each trained step's mean (GRPO-Guard)."""
    from megaflow.sampling.dpm import History, data_prediction, dpm_solver_2m_step

    device = adapter.device
    sigmas = plan.sigmas
    n, k_steps = len(keys), plan.steps_per_sample
    store = _Store(n, k_steps, latent_shape, keep_mean)
    trained = torch.tensor(plan.trained, dtype=torch.long).reshape(n, k_steps)
    if subbatch_steps is None:
        subbatch_steps = {i for steps in plan.trained for i in steps}
    uses_dpm = "dpm2" in plan.solvers
    bar = progress(n * plan.num_steps, "rollout", enabled=show_progress, unit="step", leave=False)
    for start in range(0, n, chunk_size):
        idx = slice(start, min(start + chunk_size, n))
        chunk_keys = keys[idx]
        chunk_cond = cond.select(idx)
        c = len(chunk_keys)
        x = initial_noise(chunk_keys, latent_shape, seed=seed, iteration=iteration, share_noise=share_noise).to(device)
        history = History(None, None)
        for i, solver in enumerate(plan.solvers):
            sigma = sigmas[i].expand(c).to(device)
            sigma_next = sigmas[i + 1].expand(c).to(device)
            slot_of = {s: (start + s, list(plan.trained[start + s]).index(i))
                       for s in range(c) if i in plan.trained[start + s]}
            v_shard = _velocity(adapter, x, sigma, chunk_cond, settings,
                                micro_batch_size if i in subbatch_steps else None)
            v = adapter.unshard(v_shard, x)
            if solver == "dpm2":
                x_next, history = dpm_solver_2m_step(x, v, sigma, sigma_next, history)
            else:
                kind = settings.sde_kind if solver == "sde" else "ode"
                noise = None
                if kind != "ode":
                    noise = step_noise(chunk_keys, latent_shape, seed=seed, iteration=iteration, step_index=i).to(device)
                out = step(kind, x, v, sigma, sigma_next, noise_level=settings.noise_level,
                           sigma_max=settings.sigma_max, noise=noise, compute_log_prob=False)
                if slot_of:
                    _trained_step(adapter, settings, kind, store, x, v_shard, out, sigma, sigma_next, slot_of,
                                  micro_batch_size, sp_group)
                if uses_dpm:
                    history = History(data_prediction(x, v, sigma), sigma)
                x_next = out.prev_sample
            x = x_next
            bar.update(c)
        if on_videos is not None:
            videos = spread_decode(adapter.decode, x.to(adapter.dtype), sp_group)
            if videos is not None:
                on_videos(videos, idx, 0)
    bar.close()
    return store.rollout(keys, trained, sigmas, float(plan.num_steps))


def tree_nfe_per_sample(num_steps: int, branch_steps: Sequence[int], granularities: Sequence[int]) -> float:
    """G²RPO's rollout velocity evaluations per trained sample: a prompt's ODE anchor up to its last
    branch point, plus per sample its SDE step and every granularity's ODE finish, over the
    |M|·G samples of the prompt (the anchor is shared by them)."""
    per_sample = [1 + sum(len(granular_indices(num_steps, k, lam)) - 1 for lam in granularities) for k in branch_steps]
    return max(branch_steps) / len(branch_steps) + sum(per_sample) / len(per_sample)


@torch.no_grad()
def run_tree_rollout(adapter: ModelAdapter, prompt_cond: Conditioning, cond: Conditioning,
                     keys: Sequence[tuple[int, int]], plan: StepPlan, settings: SamplerSettings, *,
                     granularities: Sequence[int], latent_shape: tuple[int, int, int, int], seed: int,
                     iteration: int, chunk_size: int, micro_batch_size: int,
                     on_videos: Callable[[torch.Tensor, slice, int], None] | None, collective: bool,
                     show_progress: bool = True, sp_group: Any = None, keep_mean: bool = False) -> Rollout:
    """G²RPO's tree program (ALGORITHMS.md §6). Per prompt (`prompt_cond`, `[P]`) one ODE anchor
    from one initial noise; each sample `keys[s]` (with `cond[s]`) takes one SDE step from the
    anchor at its trained step k, which the update trains, and is finished by Euler once per
    granularity λ on the grid `granular_indices`, which ends at σ = 0. Videos of granularity j go
    to `on_videos(videos, sample_slice, j)` (decoded as in `run_rollout`). `collective`: every rank
    must make the same number of model calls (ZeRO-3), so a chunk whose samples have all finished
    still calls the model."""
    device = adapter.device
    sigmas = plan.sigmas
    n, num_steps = len(keys), plan.num_steps
    ks = sorted({int(t[0]) for t in plan.trained})
    branch = sorted(i for i, sde in enumerate(plan.sde) if sde)
    store = _Store(n, 1, latent_shape, keep_mean)
    trained = torch.tensor(plan.trained, dtype=torch.long).reshape(n, 1)
    anchors: dict[tuple[int, int], torch.Tensor] = {}
    num_prompts = len(prompt_cond)
    lengths = {(k, lam): len(granular_indices(num_steps, k, lam)) - 1 for k in branch for lam in granularities}
    steps = num_prompts * max(branch) + sum(1 + sum(lengths[(int(t[0]), lam)] for lam in granularities)
                                            for t in plan.trained)
    bar = progress(steps, "rollout", enabled=show_progress, unit="step", leave=False)
    for start in range(0, num_prompts, chunk_size):
        slots = list(range(start, min(start + chunk_size, num_prompts)))
        x = initial_noise([(slot, 0) for slot in slots], latent_shape, seed=seed, iteration=iteration,
                          share_noise=True).to(device)
        chunk_cond = prompt_cond.select(slots)
        for i in range(max(branch) + 1):
            if i in ks:
                for j, slot in enumerate(slots):
                    anchors[(slot, i)] = x[j].cpu()
            if i == max(branch):
                break
            sigma = sigmas[i].expand(len(slots)).to(device)
            v = adapter.unshard(_velocity(adapter, x, sigma, chunk_cond, settings, None), x)
            x = step("ode", x, v, sigmas[i], sigmas[i + 1]).prev_sample
            bar.update(len(slots))
    for start in range(0, n, chunk_size):
        idx = slice(start, min(start + chunk_size, n))
        chunk_keys = keys[idx]
        chunk_cond = cond.select(idx)
        k_of = [int(t[0]) for t in plan.trained[idx]]
        x0 = torch.stack([anchors[(slot, k)] for (slot, _), k in zip(chunk_keys, k_of)]).to(device)
        sigma = sigmas[k_of].to(device)
        sigma_next = sigmas[[k + 1 for k in k_of]].to(device)
        v_shard = _velocity(adapter, x0, sigma, chunk_cond, settings, micro_batch_size)
        v = adapter.unshard(v_shard, x0)
        noise = step_noise(chunk_keys, latent_shape, seed=seed, iteration=iteration, step_index=k_of).to(device)
        out = step(settings.sde_kind, x0, v, sigma, sigma_next, noise_level=settings.noise_level,
                   sigma_max=settings.sigma_max, noise=noise, compute_log_prob=False)
        _trained_step(adapter, settings, settings.sde_kind, store, x0, v_shard, out, sigma, sigma_next,
                      {s: (start + s, 0) for s in range(len(chunk_keys))}, micro_batch_size, sp_group)
        bar.update(len(chunk_keys))
        for column, lam in enumerate(granularities):
            x = out.prev_sample.clone()
            grids = [granular_indices(num_steps, k, lam) for k in k_of]
            for t in range(max(lengths[(k, lam)] for k in branch)):
                active = [s for s, g in enumerate(grids) if t < len(g) - 1]
                rows = active or ([0] if collective else [])
                if not rows:
                    continue
                s_now = sigmas[[grids[s][t] if s in active else num_steps for s in rows]].to(device)
                s_next = sigmas[[grids[s][t + 1] if s in active else num_steps for s in rows]].to(device)
                xa = x[rows]
                v = adapter.unshard(_velocity(adapter, xa, s_now, chunk_cond.select(rows), settings, None), xa)
                if active:
                    x[active] = step("ode", xa[: len(active)], v[: len(active)], s_now[: len(active)],
                                     s_next[: len(active)]).prev_sample
                    bar.update(len(active))
            if on_videos is not None:
                videos = spread_decode(adapter.decode, x.to(adapter.dtype), sp_group)
                if videos is not None:
                    on_videos(videos, idx, column)
    bar.close()
    return store.rollout(keys, trained, sigmas, tree_nfe_per_sample(num_steps, branch, granularities))


def run_program(program: str, adapter: ModelAdapter, prompt_cond: Conditioning, cond: Conditioning,
                keys: Sequence[tuple[int, int]], plan: StepPlan, settings: SamplerSettings, *, share_noise: bool,
                subbatch_steps: set[int] | None, collective: bool, granularities: Sequence[int] = (),
                **common: Any) -> Rollout:
    """Run an algorithm's rollout program: `chain` (`run_rollout`) or `tree` (`run_tree_rollout`).
    `prompt_cond [P]`: each prompt's conditioning; `cond`: each of `keys`'s."""
    if program == "tree":
        return run_tree_rollout(adapter, prompt_cond, cond, keys, plan, settings, granularities=granularities,
                                collective=collective, **common)
    if program != "chain":
        raise ValueError(f"unknown rollout program {program!r}; choose chain or tree")
    return run_rollout(adapter, cond, keys, plan, settings, share_noise=share_noise, subbatch_steps=subbatch_steps,
                       **common)
