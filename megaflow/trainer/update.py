"""The policy update: recompute log-probs of the stored transitions with grad and step.

Micro-batches are consecutive runs of `micro_batch_size` samples in rollout order (the same
compositions the rollout evaluated its trained steps with); each micro-batch runs its K trained
steps (one forward + backward each). The optimizer steps once per `grad_accum` micro-batches.

Layout. The iteration's samples form global micro-batches `0..M-1`; data-parallel rank d holds
micro-batches d, d+dp, d+2dp, … and an optimizer window covers `grad_accum` consecutive global
micro-batches (grad_accum/dp on each rank), so every layout steps on the same samples.

Loss scaling. One process minimises `Σ_s w_s·L_s / (W·K)` per window (W: the window's total
sample weight, K: trained steps per sample). A rank computes the same expression over its own
samples with the global W; the SP ranks of a sample each back-propagate one replica of the loss
through their own tokens (their gradients add up to the sample's gradient), and DeepSpeed sums
over the sequence × data group and divides by `gradient_divisor` (ZeRO-2: dp; ZeRO-3's
reduce-scatter: dp·sp). So each rank's loss is multiplied by that divisor (`loss_scale`) and
backward runs with `scale_wrt_gas=False`; the result is the one-process gradient, which the
layout-invariance test checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from megaflow.algorithms.losses import LOSSES, StepTerms
from megaflow.models.base import Conditioning, ModelAdapter
from megaflow.monitor.progress import progress
from megaflow.sampling.steps import step
from megaflow.trainer.rollout import Rollout, step_log_prob
from megaflow.trainer.settings import SamplerSettings


@dataclass(frozen=True)
class UpdateSettings:
    """Loss and optimisation knobs of the update."""

    clip_range: float
    kl_beta: float
    micro_batch_size: int
    grad_accum: int | None
    grad_clip: float
    loss: str = "clipped"  #: a name in `megaflow.algorithms.losses.LOSSES`


def accumulation_windows(num_micro: int, grad_accum: int | None) -> list[range]:
    """Global micro-batch indices of each optimizer window."""
    size = num_micro if grad_accum is None else grad_accum
    return [range(s, min(s + size, num_micro)) for s in range(0, num_micro, size)]


def local_micro_batches(num_micro: int, dp_size: int, dp_rank: int) -> list[int]:
    """The global micro-batches data-parallel rank `dp_rank` holds: `dp_rank, dp_rank+dp, …`."""
    return list(range(dp_rank, num_micro, dp_size))


def local_sample_indices(num_samples: int, micro_batch_size: int, dp_size: int, dp_rank: int) -> list[int]:
    """Global sample indices of a data-parallel rank, in its rollout / update order."""
    return [s for j in local_micro_batches(num_samples // micro_batch_size, dp_size, dp_rank)
            for s in range(j * micro_batch_size, (j + 1) * micro_batch_size)]


@dataclass
class DistributedUpdate:
    """How the update is spread over ranks (defaults: one process, plain optimizer)."""

    engine: Any = None  #: DeepSpeed engine (None: torch optimizer + clip_grad_norm_)
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Any = None
    sp_group: Any = None
    loss_scale: float = 1.0  #: multiplies each rank's loss (`megaflow.parallel.engine.gradient_divisor`)


def _all_sum(values: list[float], group: Any) -> list[float]:
    if group is None or not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def policy_update(adapter: ModelAdapter, rollout: Rollout, cond: Conditioning, advantages: torch.Tensor,
                  weights: torch.Tensor, settings: SamplerSettings, update: UpdateSettings,
                  optimizer: torch.optim.Optimizer, *, show_progress: bool = True,
                  layout: DistributedUpdate | None = None, global_weights: torch.Tensor | None = None,
                  on_optimizer_step: Callable[[], None] | None = None) -> dict[str, float]:
    """Run the update over this rank's samples; returns metric values of the whole job.
    `on_optimizer_step` runs after every optimizer step (the EMA's update).

    `advantages`, `weights`, `cond`, `rollout`: this rank's samples (`local_sample_indices`);
    `global_weights [S_total]`: every sample's weight, for the window totals (default `weights`).
    A sample of weight 0 contributes no gradient.
    """
    layout = layout or DistributedUpdate()
    engine = layout.engine
    global_weights = weights if global_weights is None else global_weights
    device = adapter.device
    params = adapter.trainable_parameters()
    n, k_steps = rollout.logp_old.shape
    m = update.micro_batch_size
    num_micro = global_weights.shape[0] // m
    mine = local_micro_batches(num_micro, layout.dp_size, layout.dp_rank)
    position = {j: p for p, j in enumerate(mine)}
    loss_fn = LOSSES[update.loss]
    if loss_fn.needs_old_mean and rollout.mean_old is None:
        raise ValueError(f"loss '{update.loss}' needs the rollout's step means; run the rollout with keep_mean=True")
    ratios, clipped, approx_kl, grad_norms = [], [], [], []
    policy_sum = kl_sum = weight_total = 0.0
    first_dev = 0.0
    bar = progress(len(mine) * k_steps, "update", enabled=show_progress, unit="fwd", leave=False)
    for w_index, window in enumerate(accumulation_windows(num_micro, update.grad_accum)):
        w_weight = float(sum(global_weights[j * m:(j + 1) * m].sum() for j in window))
        local = [position[j] for j in window if j in position]
        if engine is None:
            optimizer.zero_grad(set_to_none=True)
        n_backward = len(local) * k_steps
        done = 0
        for p in local:
            mb = slice(p * m, (p + 1) * m)
            mb_cond = cond.select(mb)
            adv = advantages[mb].to(device)
            wts = weights[mb].to(device)
            for k in range(k_steps):
                x = rollout.x[mb, k].to(device)
                x_next = rollout.x_next[mb, k].to(device)
                sigma = rollout.sigma[mb, k].to(device)
                sigma_next = rollout.sigma_next[mb, k].to(device)
                mean_ref = None
                if update.kl_beta > 0:
                    with torch.no_grad(), adapter.reference_mode(), settings.autocast(device):
                        v_ref = adapter.velocity_shard(x, sigma, mb_cond, settings.guidance_scale,
                                                       settings.embedded_guidance)
                    xs, xns = adapter.shard_latent(x), adapter.shard_latent(x_next)
                    mean_ref = step(settings.sde_kind, xs, v_ref, sigma, sigma_next, noise_level=settings.noise_level,
                                    sigma_max=settings.sigma_max, prev_sample=xns, compute_log_prob=False).mean
                mean_old = None
                if loss_fn.needs_old_mean:
                    mean_old = adapter.shard_latent(rollout.mean_old[mb, k].to(device))
                with torch.set_grad_enabled(w_weight > 0):
                    with settings.autocast(device):
                        v = adapter.velocity_shard(x, sigma, mb_cond, settings.guidance_scale, settings.embedded_guidance)
                    out = step_log_prob(adapter, settings, settings.sde_kind, x, v, x_next, sigma, sigma_next,
                                        mean_ref_shard=mean_ref, mean_old_shard=mean_old, sp_group=layout.sp_group)
                    terms = StepTerms(logp_new=out.log_prob, logp_old=rollout.logp_old[mb, k].to(device),
                                      advantages=adv, std=out.std, dt=sigma_next - sigma, ratio_norm=out.ratio_norm)
                    per_sample, stats = loss_fn.fn(terms, update.clip_range)
                    kl = out.kl if out.kl is not None else torch.zeros_like(per_sample)
                if w_weight > 0:
                    loss = ((per_sample + update.kl_beta * kl) * wts).sum() / (w_weight * k_steps)
                    done += 1
                    if engine is None:
                        loss.backward()
                    else:
                        engine.set_gradient_accumulation_boundary(done == n_backward)
                        engine.backward(loss * layout.loss_scale, scale_wrt_gas=False)
                        engine.step()
                ratios.append(stats["ratio"].detach().cpu())
                clipped.append(stats["clipped"].cpu())
                approx_kl.append(stats["approx_kl"].detach().cpu())
                policy_sum += float((per_sample.detach() * wts).sum())
                kl_sum += float((kl.detach() * wts).sum())
                weight_total += float(wts.sum())
                if w_index == 0:
                    first_dev = max(first_dev, float((stats["ratio"] - 1).abs().max()))
                bar.update(1)
        if w_weight > 0:
            if engine is None:
                max_norm = update.grad_clip if update.grad_clip > 0 else float("inf")
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
                optimizer.step()
            else:
                grad_norms.append(float(engine.get_global_grad_norm()))
            if on_optimizer_step is not None:
                on_optimizer_step()
    bar.close()
    ratio = torch.cat(ratios).double()
    clip_t = torch.cat(clipped).double()
    akl = torch.cat(approx_kl).double()
    policy_sum, kl_sum, weight_total, ratio_sum, clip_sum, akl_sum, count = _all_sum(
        [policy_sum, kl_sum, weight_total, float(ratio.sum()), float(clip_t.sum()), float(akl.sum()),
         float(ratio.numel())], layout.dp_group)
    if layout.dp_group is not None and dist.is_initialized():
        dev = torch.tensor([first_dev], dtype=torch.float64)
        dist.all_reduce(dev, op=dist.ReduceOp.MAX)
        first_dev = float(dev)
    denom = max(weight_total, 1e-12)
    policy = policy_sum / denom
    kl_mean = kl_sum / denom
    return {
        "loss/total": policy + update.kl_beta * kl_mean,
        "loss/policy": policy,
        "loss/kl": kl_mean,
        "policy/ratio_mean": ratio_sum / count,
        "policy/ratio_max_dev": first_dev,
        "policy/clip_frac": clip_sum / count,
        "policy/approx_kl": akl_sum / count,
        "optim/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
        "optim/steps": float(len(grad_norms)),
        "nfe/train_per_sample": float(k_steps * (2 if update.kl_beta > 0 else 1)),
    }
