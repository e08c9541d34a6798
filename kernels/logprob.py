"""`sde_log_prob`: the fused SDE log-probability with a backend dispatcher (Triton or eager torch)."""
from __future__ import annotations

import functools
import os

import torch

from megaflow.errors import MegaflowError
from megaflow.kernels.reference import LogProbOut, check_inputs, check_kind, sde_log_prob_torch

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class KernelBackendError(MegaflowError, RuntimeError):
    """The requested kernel backend cannot run these tensors in this process."""


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when triton imports, else the reason it does not (cached)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def _tensors(*ts: torch.Tensor | None) -> list[torch.Tensor]:
    return [t for t in ts if t is not None]


def _check_triton_runnable(tensors: list[torch.Tensor]) -> None:
    """Raise KernelBackendError unless backend='triton' can run on these tensors here."""
    reason = triton_import_error()
    if reason is not None:
        raise KernelBackendError(
            f"backend='triton' needs the triton package, which does not import ({reason}); "
            "install it (pip install triton) or use backend='torch' or 'auto'"
        )
    if any(t.device.type != "cuda" for t in tensors):
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise KernelBackendError(
                "backend='triton' on CPU tensors runs only in Triton's interpreter: set the environment "
                "variable TRITON_INTERPRET=1 before triton is imported, or use backend='torch' or 'auto'"
            )
        from megaflow.kernels import logprob_triton

        if not logprob_triton.interpreted():
            raise KernelBackendError(
                "TRITON_INTERPRET=1 was set after triton had been imported, so the kernels were compiled "
                "for a GPU and cannot run on CPU tensors; set it before anything imports triton (e.g. in "
                "the environment), or use backend='torch' or 'auto'"
            )


def resolve_backend(backend: str, tensors: list[torch.Tensor]) -> str:
    """The concrete backend ('triton' or 'torch') that `backend` selects for these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        on_gpu = all(t.is_cuda for t in tensors)
        supported = all(t.dtype in TRITON_DTYPES for t in tensors)
        return "triton" if on_gpu and supported and triton_import_error() is None else "torch"
    return backend


def sde_log_prob(
    kind: str,
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float,
    sigma_max: float | torch.Tensor | None = None,
    mean_ref: torch.Tensor | None = None,
    mean_old: torch.Tensor | None = None,
    partial: bool = False,
    backend: str = "auto",
) -> LogProbOut:
    """Per-sample log p, KL and RatioNorm `[B]` of one SDE step; tensors `[B, ...]`, sigmas scalar or `[B]`.

    Semantics of `sde_log_prob_torch`. `backend`: "auto" (Triton for CUDA tensors when triton
    imports, else torch), "torch", or "triton" (on CPU tensors only with TRITON_INTERPRET=1).
    The Triton path is differentiable w.r.t. `v` only.
    """
    check_kind(kind)
    check_inputs(x, v, x_next, mean_ref, mean_old)
    tensors = _tensors(x, v, x_next, mean_ref, mean_old)
    chosen = resolve_backend(backend, tensors)
    kwargs = dict(noise_level=noise_level, sigma_max=sigma_max, mean_ref=mean_ref, mean_old=mean_old,
                  partial=partial)
    if chosen == "torch":
        return sde_log_prob_torch(kind, x, v, x_next, sigma, sigma_next, **kwargs)
    _check_triton_runnable(tensors)
    from megaflow.kernels.logprob_triton import sde_log_prob_triton

    return sde_log_prob_triton(kind, x, v, x_next, sigma, sigma_next, **kwargs)
