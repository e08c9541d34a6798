"""DPM-Solver++(2M) on a flow-matching grid and the MixGRPO-Flash grid (ALGORITHMS.md §3).

On a flow-matching path `x_σ = (1−σ)·x0 + σ·noise` the solver sees `alpha = 1 − σ`, `sigma = σ` and
the half log-SNR `λ = log((1−σ)/σ)`; it integrates the data prediction `x̂0 = x − σ·v` with the
multistep second-order update in its midpoint form. The previous step's `x̂0` travels in a
`History`, which any step can fill (MixGRPO-Flash carries it across its SDE window, so the first
solver step after the window is already second order). All arithmetic is float32 whatever the
input dtype; sigmas may be scalars or per-sample `[B]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaflow.sampling.schedule import flow_sigmas, shift_sigmas
from megaflow.sampling.steps import _as_batch, _bcast


@dataclass(frozen=True)
class History:
    """The previous step's data prediction `x0` (`[B, ...]`) and the σ it was made at (`[B]` or a
    scalar). Both None: no history. A sample whose σ here is 1 (λ = −inf) or NaN has none either."""

    x0: torch.Tensor | None = None
    sigma: torch.Tensor | float | None = None


def data_prediction(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """`x̂0 = x − σ·v`, float32 `[B, ...]`, from `x`, `v` (`[B, ...]`) and σ (scalar or `[B]`)."""
    if x.shape != v.shape:
        raise ValueError(f"x and v must have the same shape, got {tuple(x.shape)} and {tuple(v.shape)}")
    s = _as_batch(sigma, x.shape[0], x.device)
    return x.float() - _bcast(s, x) * v.float()


def _half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log(1−σ) − log(σ): −inf at σ = 1, +inf at σ = 0."""
    return torch.log(1 - sigma) - torch.log(sigma)


def dpm_solver_2m_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    history: History | None = None,
) -> tuple[torch.Tensor, History]:
    """One DPM-Solver++(2M) step σ → σ_next: `x`, `v` `[B, ...]` → float32 `x_next` `[B, ...]` and
    the new `History` (this step's x̂0 and σ `[B]`).

    Per sample it is first order without a usable history (none, or its σ is 1 or NaN) and at
    σ_next = 0, where `x_next` is x̂0 exactly; second order (midpoint) otherwise.
    """
    batch, device = x.shape[0], x.device
    s = _as_batch(sigma, batch, device)
    s_next = _as_batch(sigma_next, batch, device)
    if bool(((s > 1) | (s_next < 0)).any()):
        raise ValueError("sigmas must lie in [0, 1]")
    if bool((s_next > s).any()):
        raise ValueError("sigma_next must not exceed sigma: sampling runs from sigma=1 to sigma=0")
    x0 = data_prediction(x, v, s)
    xf = x.float()

    # First order (DDIM in data prediction): x' = (σ'/σ)·x − α'·(e^{−h} − 1)·x̂0, h = λ' − λ.
    h = _half_log_snr(s_next) - _half_log_snr(s)
    ratio = s_next / s
    phi = (1 - s_next) * (torch.exp(-h) - 1.0)
    out = _bcast(ratio, xf) * xf - _bcast(phi, x0) * x0

    if history is not None and (history.x0 is None) != (history.sigma is None):
        raise ValueError("History needs both x0 and sigma, or neither")
    if history is not None and history.x0 is not None:
        if history.x0.shape != x.shape:
            raise ValueError(
                f"history.x0 has shape {tuple(history.x0.shape)}, expected the shape of x {tuple(x.shape)}"
            )
        s_prev = _as_batch(history.sigma, batch, device)
        usable = s_prev < 1  # False for σ = 1 (λ = −inf) and for NaN
        if bool((usable & (s_prev <= s)).any()):
            raise ValueError("history.sigma must be larger than sigma (it is the previous step's sigma)")
        second = usable & (s_next > 0)
        if bool(second.any()):
            # Midpoint 2M: x' = first − ½·α'·(e^{−h} − 1)·D1, D1 = (x̂0 − x̂0_prev)/r, r = h_prev/h.
            h_prev = _half_log_snr(s) - _half_log_snr(s_prev)
            r = h_prev / h
            d1 = _bcast(1.0 / r, x0) * (x0 - history.x0.float())
            out2 = out - _bcast(0.5 * phi, d1) * d1
            out = out2 if bool(second.all()) else torch.where(_bcast(second, out), out2, out)

    final = s_next == 0
    if bool(final.any()):
        # Lower order at the final step: the data prediction itself (exact even where x is not finite).
        out = x0 if bool(final.all()) else torch.where(_bcast(final, out), x0, out)
    return out, History(x0=x0, sigma=s)


def flash_grid(num_steps: int, shift: float, last_window_step: int, compression: float) -> torch.Tensor:
    """MixGRPO-Flash's grid, float32 `[L + 1 + n]`: `flow_sigmas(num_steps, shift)[:L + 2]`, then
    n − 1 more points evenly spaced in unshifted time down to exactly 0, shifted.

    `n = int(max((N − L)·r, 1))` counts both σ_{L+1} and 0 (L = `last_window_step`,
    r = `compression`); megaflow raises n to at least 2 so the grid always ends at 0, whereas the
    published code, with n = 1, stops at σ_{L+1} > 0. σ_{L+1} is flow_sigmas's value bit for bit.
    """
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2 (a window step plus the rest), got {num_steps!r}")
    if not isinstance(last_window_step, int) or not 0 <= last_window_step <= num_steps - 2:
        raise ValueError(
            f"last_window_step must be an integer in 0..num_steps-2 = 0..{num_steps - 2}, got {last_window_step!r}"
        )
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")
    n = max(int(max((num_steps - last_window_step) * compression, 1)), 2)
    head = flow_sigmas(num_steps, shift)[: last_window_step + 2]
    t_start = 1.0 - (last_window_step + 1) / num_steps  # unshifted time of σ_{L+1}
    tail = torch.linspace(t_start, 0.0, n, dtype=torch.float64).to(torch.float32)
    tail = shift_sigmas(tail, shift)
    # tail[0] is σ_{L+1} again; keep the head's copy (bit for bit flow_sigmas's value).
    return torch.cat([head, tail[1:]])
