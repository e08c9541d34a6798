import torch

from megaflow.algorithms.losses import clipped_surrogate


def test_clipped_surrogate_values_and_stats():
    logp_old = torch.zeros(4)
    logp_new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, stats = clipped_surrogate(logp_new, logp_old, adv, clip_range=0.2)
    # r=1: -A; r=1.5, A>0: clipped to 1.2 -> max(-1.5, -1.2) = -1.2; r=0.5, A<0: max(0.5, 0.8) = 0.8;
    # r=1.05 (inside), A=-2: 2.1
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.2, 0.8, 2.1]))
    assert stats["clipped"].tolist() == [False, True, True, False]
    torch.testing.assert_close(stats["ratio"], torch.tensor([1.0, 1.5, 0.5, 1.05]))
    torch.testing.assert_close(stats["approx_kl"], 0.5 * logp_new**2)


def test_clipped_branch_has_no_gradient():
    logp_new = torch.tensor([0.5, 0.01], requires_grad=True)
    loss, _ = clipped_surrogate(logp_new, torch.zeros(2), torch.tensor([1.0, 1.0]), clip_range=0.1)
    loss.sum().backward()
    assert logp_new.grad[0] == 0 and logp_new.grad[1] != 0


# ---- GRPO-Guard -----------------------------------------------------------------------------------
from megaflow.algorithms.losses import LOSSES, StepTerms, ratio_norm_log_ratio  # noqa: E402
from megaflow.kernels import sde_log_prob  # noqa: E402
from megaflow.sampling import flow_sigmas, step  # noqa: E402


def guard_terms(v_new: torch.Tensor, v_old: torch.Tensor, noise: torch.Tensor, step_index: int = 2) -> StepTerms:
    """One flow_grpo step sampled under v_old, scored under v_new, as the update computes it."""
    sigmas = flow_sigmas(8, 3.0)
    b = v_new.shape[0]
    x = torch.linspace(-1, 1, v_new[0].numel()).reshape(v_new.shape[1:]).expand_as(v_new).contiguous()
    s, sn = sigmas[step_index].expand(b), sigmas[step_index + 1].expand(b)
    old = step("flow_grpo", x, v_old, s, sn, noise_level=0.7, sigma_max=sigmas[1], noise=noise)
    new = sde_log_prob("flow_grpo", x, v_new, old.prev_sample, s, sn, noise_level=0.7, sigma_max=float(sigmas[1]),
                       mean_old=old.mean, backend="torch")
    return StepTerms(logp_new=new.log_prob, logp_old=old.log_prob, advantages=torch.ones(b), std=new.std,
                     dt=sn - s, ratio_norm=new.ratio_norm)


def test_ratio_norm_is_zero_on_policy_and_centred_off_policy():
    g = torch.Generator().manual_seed(0)
    v_old = torch.randn(1, 4, 6, 6, generator=g)
    v_new = v_old + 0.3 * torch.randn(1, 4, 6, 6, generator=g)
    same = guard_terms(v_old.expand(3, -1, -1, -1), v_old.expand(3, -1, -1, -1), torch.randn(3, 4, 6, 6, generator=g))
    assert torch.equal(ratio_norm_log_ratio(same), torch.zeros(3))
    # Over many draws of the step's noise, the RatioNorm log-ratio has mean 0 (it equals mean(ε·(μ_θ − μ_old))),
    # while the raw log-ratio is biased by −mean((μ_θ − μ_old)²)/(2s²): what GRPO-Guard corrects.
    draws = 4000
    t = guard_terms(v_new.expand(draws, -1, -1, -1), v_old.expand(draws, -1, -1, -1),
                    torch.randn(draws, 4, 6, 6, generator=g))
    log_r = ratio_norm_log_ratio(t)
    raw = t.logp_new - t.logp_old
    assert abs(float(log_r.mean())) < 4 * float(log_r.std()) / draws**0.5
    assert abs(float(raw.mean() + t.ratio_norm.mean())) < 4 * float(raw.std()) / draws**0.5
    assert float(raw.mean()) < -10 * float(raw.std()) / draws**0.5


def test_ratio_norm_is_per_sample():
    g = torch.Generator().manual_seed(1)
    v_old, v_new, noise = (torch.randn(4, 4, 6, 6, generator=g) for _ in range(3))
    batch = ratio_norm_log_ratio(guard_terms(v_new, v_old, noise))
    for j in range(4):
        alone = ratio_norm_log_ratio(guard_terms(v_new[j:j + 1], v_old[j:j + 1], noise[j:j + 1]))
        torch.testing.assert_close(batch[j:j + 1], alone, rtol=1e-6, atol=0)
    # changing another sample leaves sample 0's value unchanged
    v_new2 = v_new.clone()
    v_new2[1:] += 1.0
    assert torch.equal(ratio_norm_log_ratio(guard_terms(v_new2, v_old, noise))[0], batch[0])


def test_grpo_guard_divides_each_step_by_abs_dt():
    g = torch.Generator().manual_seed(2)
    v_old, noise = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    v_new = v_old + 0.01 * torch.randn(2, 4, 6, 6, generator=g)
    for k in (0, 5):
        t = guard_terms(v_new, v_old, noise, step_index=k)
        loss, stats = LOSSES["grpo_guard"].fn(t, 1e-5)
        plain, _ = clipped_surrogate(t.logp_new, t.logp_old, t.advantages, 1e-5, log_ratio=ratio_norm_log_ratio(t))
        torch.testing.assert_close(loss, plain / t.dt.abs())
        torch.testing.assert_close(stats["ratio"], torch.exp(ratio_norm_log_ratio(t)))
    assert LOSSES["grpo_guard"].needs_old_mean and not LOSSES["clipped"].needs_old_mean
