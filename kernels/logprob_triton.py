"""Triton implementation of the fused SDE log-probability and its gradient w.r.t. the velocity.

Forward: one pass over the latents; program `(block, sample)` computes μ = a·x + b·v in float32
for `BLOCK` elements of one sample and writes its partial sums of (x_next−μ)², (μ−mean_ref)²,
(μ−mean_old)² to a `[K, B, nblocks]` buffer; a second kernel reduces each `(quantity, sample)`
row in a fixed order. No atomics and a fixed launch configuration (no autotuning), so results
are bit-identical run to run, and a sample's result does not depend on the rest of the batch.
Backward: one pass computing dL/dv from x, v, x_next and the means (μ is recomputed).

Importing this module imports triton, whose interpreter mode (`TRITON_INTERPRET=1`, needed
for CPU tensors) is fixed when triton is first imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import FunctionCtx, once_differentiable

from megaflow.kernels.reference import LogProbOut, assemble, check_inputs, check_kind, sde_coefficients

BLOCK = 2048
"""Elements of one sample handled by one program (forward and backward)."""
REDUCE_BLOCK = 1024
"""Per-block partial sums reduced per loop iteration by the final reduction."""
NUM_WARPS = 4
FP_FUSION = True
"""Contract a·x + b·v into FMAs (pinned: triton 3.10 changes the default)."""
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _partial_sums_kernel(
    x_ptr, v_ptr, xn_ptr, mr_ptr, mo_ptr, a_ptr, b_ptr, part_ptr,
    n, nblocks, batch,
    stride_x, stride_v, stride_xn, stride_mr, stride_mo,
    HAS_REF: tl.constexpr, HAS_OLD: tl.constexpr, OLD_SLOT: tl.constexpr, BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(xn_ptr + row * stride_xn + offs, mask=mask, other=0.0).to(tl.float32)
    mu = a * x + b * v
    d = xn - mu
    out = part_ptr + row * nblocks + blk
    plane = batch * nblocks
    tl.store(out, tl.sum(d * d, axis=0))
    if HAS_REF:
        mr = tl.load(mr_ptr + row * stride_mr + offs, mask=mask, other=0.0).to(tl.float32)
        dr = mu - mr
        tl.store(out + plane, tl.sum(dr * dr, axis=0))
    if HAS_OLD:
        mo = tl.load(mo_ptr + row * stride_mo + offs, mask=mask, other=0.0).to(tl.float32)
        do = mu - mo
        tl.store(out + OLD_SLOT * plane, tl.sum(do * do, axis=0))


@triton.jit
def _reduce_rows_kernel(part_ptr, out_ptr, nblocks, REDUCE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = part_ptr + row * nblocks
    cols = tl.arange(0, REDUCE_BLOCK)
    acc = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)
    for start in range(0, nblocks, REDUCE_BLOCK):
        idx = start + cols
        acc += tl.load(base + idx, mask=idx < nblocks, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _grad_v_kernel(
    x_ptr, v_ptr, xn_ptr, mr_ptr, mo_ptr, a_ptr, b_ptr, coef_ptr, g_ptr,
    n, batch,
    stride_x, stride_v, stride_xn, stride_mr, stride_mo,
    USE_LP: tl.constexpr, USE_REF: tl.constexpr, USE_OLD: tl.constexpr, BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
    mu = a * x + b * v
    g = tl.zeros([BLOCK], dtype=tl.float32)
    if USE_LP:
        c_lp = tl.load(coef_ptr + row)
        xn = tl.load(xn_ptr + row * stride_xn + offs, mask=mask, other=0.0).to(tl.float32)
        g += c_lp * (xn - mu)
    if USE_REF:
        c_ref = tl.load(coef_ptr + batch + row)
        mr = tl.load(mr_ptr + row * stride_mr + offs, mask=mask, other=0.0).to(tl.float32)
        g += c_ref * (mu - mr)
    if USE_OLD:
        c_old = tl.load(coef_ptr + 2 * batch + row)
        mo = tl.load(mo_ptr + row * stride_mo + offs, mask=mask, other=0.0).to(tl.float32)
        g += c_old * (mu - mo)
    tl.store(g_ptr + row * n + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter (decided when triton was first imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_partial_sums_kernel, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """`t` `[B, ...]` as a `[B, n]` tensor with unit element stride (a view when possible)."""
    r = t.reshape(batch, -1)
    if r.shape[1] > 1 and r.stride(1) != 1:
        r = r.contiguous()
    return r


def _row_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _forward_sums(
    x: torch.Tensor, v: torch.Tensor, xn: torch.Tensor, mr: torch.Tensor | None, mo: torch.Tensor | None,
    a: torch.Tensor, b: torch.Tensor,
) -> torch.Tensor:
    """Per-sample sums `[K, B]` float32 of (x_next−μ)² then (μ−mean_ref)², (μ−mean_old)² if given."""
    batch, n = x.shape
    nblocks = triton.cdiv(n, BLOCK)
    k = 1 + (mr is not None) + (mo is not None)
    partials = torch.empty((k, batch, nblocks), dtype=torch.float32, device=x.device)
    _partial_sums_kernel[(nblocks, batch)](
        x, v, xn, x if mr is None else mr, x if mo is None else mo, a, b, partials,
        n, nblocks, batch,
        x.stride(0), v.stride(0), xn.stride(0), _row_stride(mr), _row_stride(mo),
        HAS_REF=mr is not None, HAS_OLD=mo is not None, OLD_SLOT=k - 1, BLOCK=BLOCK,
        num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
    )
    sums = torch.empty((k, batch), dtype=torch.float32, device=x.device)
    _reduce_rows_kernel[(k * batch,)](
        partials, sums, nblocks, REDUCE_BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
    )
    return sums


class _FusedSquaredSums(torch.autograd.Function):
    """`(v, x, x_next, mean_ref, mean_old, a, b)` -> per-sample sums `[B]` of the squared
    distances, one output per quantity (log-prob, then KL and RatioNorm if their means are given).

    Differentiable w.r.t. `v` only; the other tensors are data.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, v: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor, mean_ref: torch.Tensor | None,
        mean_old: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The per-sample sums, float32 `[B]` each; saves the `[B, n]` row views for backward."""
        batch = x.shape[0]
        xr, vr, xnr = _rows(x, batch), _rows(v, batch), _rows(x_next, batch)
        mrr = None if mean_ref is None else _rows(mean_ref, batch)
        mor = None if mean_old is None else _rows(mean_old, batch)
        sums = _forward_sums(xr, vr, xnr, mrr, mor, a, b)
        ctx.save_for_backward(xr, vr, xnr, mrr, mor, a, b)
        ctx.v_shape = v.shape
        ctx.set_materialize_grads(False)
        return tuple(sums.unbind(0))

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, *grads: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        """dL/dv (v's shape and dtype) from the upstream grads `[B]` of the sums, in one kernel pass."""
        xr, vr, xnr, mrr, mor, a, b = ctx.saved_tensors
        g_lp = grads[0]
        g_ref = grads[1] if mrr is not None else None
        g_old = grads[-1] if mor is not None else None
        if not ctx.needs_input_grad[0] or (g_lp is None and g_ref is None and g_old is None):
            return (None,) * 7
        batch, n = xr.shape
        zero = torch.zeros_like(b)
        # d/dv of Σ(x_next−μ)² = −2b(x_next−μ); of Σ(μ−m)² = 2b(μ−m).
        coef = torch.stack([
            zero if g_lp is None else -2 * b * g_lp.float(),
            zero if g_ref is None else 2 * b * g_ref.float(),
            zero if g_old is None else 2 * b * g_old.float(),
        ]).contiguous()
        grad = torch.empty((batch, n), dtype=vr.dtype, device=vr.device)
        _grad_v_kernel[(triton.cdiv(n, BLOCK), batch)](
            xr, vr, xnr, xr if mrr is None else mrr, xr if mor is None else mor, a, b, coef, grad,
            n, batch,
            xr.stride(0), vr.stride(0), xnr.stride(0), _row_stride(mrr), _row_stride(mor),
            USE_LP=g_lp is not None, USE_REF=g_ref is not None, USE_OLD=g_old is not None,
            BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
        )
        return (grad.view(ctx.v_shape),) + (None,) * 6


def sde_log_prob_triton(
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
) -> LogProbOut:
    """Fused kernel with `sde_log_prob_torch`'s semantics: tensors `[B, ...]` float32/bf16/fp16,
    sigmas scalar or `[B]`; outputs float32 `[B]`. Gradients flow to `v` only.
    """
    check_kind(kind)
    check_inputs(x, v, x_next, mean_ref, mean_old)
    for name, t in {"x": x, "v": v, "x_next": x_next, "mean_ref": mean_ref, "mean_old": mean_old}.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the triton backend takes float32, bfloat16 or float16 tensors; {name} is {t.dtype} "
                            "(use backend='torch' for it)")
    batch = x.shape[0]
    a, b, std = sde_coefficients(kind, sigma, sigma_next, batch=batch, noise_level=noise_level,
                                 sigma_max=sigma_max, device=x.device)
    sums = _FusedSquaredSums.apply(v, x, x_next, mean_ref, mean_old, a.contiguous(), b.contiguous())
    return assemble(sums[0], sums[1] if mean_ref is not None else None, sums[-1] if mean_old is not None else None,
                    std, numel=x[0].numel(), partial=partial)
