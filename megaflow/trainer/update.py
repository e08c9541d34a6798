"""The policy update: recompute log-probs of the stored transitions with grad and step.

Micro-batches are consecutive runs of `micro_batch_size` samples in rollout order (the same
compositions the rollout evaluated its trained steps with); each micro-batch runs its K trained
steps (one forward + backward each). The optimizer steps once per `grad_accum` micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaflow.algorithms.losses import clipped_surrogate
from megaflow.kernels import sde_log_prob
from megaflow.models.base import Conditioning, ModelAdapter
from megaflow.monitor.progress import progress
from megaflow.sampling.steps import step
from megaflow.trainer.rollout import Rollout
from megaflow.trainer.settings import SamplerSettings


@dataclass(frozen=True)
class UpdateSettings:
    """Loss and optimisation knobs of the update."""

    clip_range: float
    kl_beta: float
    micro_batch_size: int
    grad_accum: int | None
    grad_clip: float


def _accumulation_windows(num_micro: int, grad_accum: int | None) -> list[range]:
    size = num_micro if grad_accum is None else grad_accum
    return [range(s, min(s + size, num_micro)) for s in range(0, num_micro, size)]


def policy_update(adapter: ModelAdapter, rollout: Rollout, cond: Conditioning, advantages: torch.Tensor,
                  weights: torch.Tensor, settings: SamplerSettings, update: UpdateSettings,
                  optimizer: torch.optim.Optimizer, *, show_progress: bool = True) -> dict[str, float]:
    """Run the update over all samples; returns metric values (see README, "Metrics").

    `advantages`, `weights`: `[S]`; a sample of weight 0 contributes no gradient.
    """
    device = adapter.device
    params = adapter.trainable_parameters()
    n, k_steps = rollout.logp_old.shape
    m = update.micro_batch_size
    micro = [slice(s, min(s + m, n)) for s in range(0, n, m)]
    windows = _accumulation_windows(len(micro), update.grad_accum)
    ratios, clipped, approx_kl, grad_norms = [], [], [], []
    policy_sum = kl_sum = weight_total = 0.0
    first_dev = 0.0
    bar = progress(len(micro) * k_steps, "update", enabled=show_progress, unit="fwd", leave=False)
    for w_index, window in enumerate(windows):
        w_weight = float(sum(weights[micro[j]].sum() for j in window))
        optimizer.zero_grad(set_to_none=True)
        for j in window:
            mb = micro[j]
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
                        v_ref = adapter.velocity(x, sigma, mb_cond, settings.guidance_scale)
                    mean_ref = step(settings.sde_kind, x, v_ref, sigma, sigma_next, noise_level=settings.noise_level,
                                    sigma_max=settings.sigma_max, prev_sample=x_next, compute_log_prob=False).mean
                with settings.autocast(device):
                    v = adapter.velocity(x, sigma, mb_cond, settings.guidance_scale)
                out = sde_log_prob(settings.sde_kind, x, v, x_next, sigma, sigma_next,
                                   noise_level=settings.noise_level, sigma_max=settings.sigma_max,
                                   mean_ref=mean_ref, backend=settings.logprob_backend)
                per_sample, stats = clipped_surrogate(out.log_prob, rollout.logp_old[mb, k].to(device), adv,
                                                      update.clip_range)
                kl = out.kl if out.kl is not None else torch.zeros_like(per_sample)
                if w_weight > 0:
                    loss = ((per_sample + update.kl_beta * kl) * wts).sum() / (w_weight * k_steps)
                    loss.backward()
                ratios.append(stats["ratio"].cpu())
                clipped.append(stats["clipped"].cpu())
                approx_kl.append(stats["approx_kl"].cpu())
                policy_sum += float((per_sample.detach() * wts).sum())
                kl_sum += float((kl.detach() * wts).sum())
                weight_total += float(wts.sum())
                if w_index == 0:
                    first_dev = max(first_dev, float((stats["ratio"] - 1).abs().max()))
                bar.update(1)
        if w_weight > 0:
            max_norm = update.grad_clip if update.grad_clip > 0 else float("inf")
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            optimizer.step()
    bar.close()
    ratio = torch.cat(ratios)
    denom = max(weight_total, 1e-12)
    policy = policy_sum / denom
    kl_mean = kl_sum / denom
    return {
        "loss/total": policy + update.kl_beta * kl_mean,
        "loss/policy": policy,
        "loss/kl": kl_mean,
        "policy/ratio_mean": float(ratio.mean()),
        "policy/ratio_max_dev": first_dev,
        "policy/clip_frac": float(torch.cat(clipped).float().mean()),
        "policy/approx_kl": float(torch.cat(approx_kl).mean()),
        "optim/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
        "optim/steps": float(len(grad_norms)),
        "nfe/train_per_sample": float(k_steps * (2 if update.kl_beta > 0 else 1)),
    }
