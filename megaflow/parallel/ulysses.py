"""Ulysses sequence parallelism: differentiable collectives over an SP process group.

Each rank of an SP group holds `L/sp` tokens of every sample. Self-attention swaps the sharded
dimension from tokens to heads with one all-to-all (`[B, L/sp, H, d] → [B, L, H/sp, d]`), runs
ordinary attention over all tokens for its heads, and swaps back. Loss-side reductions use
`all_reduce_replicated`: every rank computes the same loss from the reduced value and
back-propagates only through its own share, so the SP ranks' gradients sum to the true one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into `sp` pieces along `scatter_dim`, send piece j to rank j, concatenate the
    received pieces along `gather_dim`."""
    sp = dist.get_world_size(group)
    inputs = [t.contiguous() for t in x.chunk(sp, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(sp)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """`[B, L/sp, H, d]` (this rank's tokens, all heads) → `[B, L, H/sp, d]` (all tokens, its heads)."""
    return _AllToAll.apply(x, group, 2, 1)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """`[B, L, H/sp, d]` → `[B, L/sp, H, d]`; the inverse of `seq_to_heads`."""
    return _AllToAll.apply(x, group, 1, 2)


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        sp = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(sp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, sp = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(sp, dim=ctx.dim)[rank].contiguous(), None, None


def gather_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather equal shards along `dim`. Every rank is assumed to use the result in the same
    (replicated) way, so the backward keeps only this rank's slice of the gradient."""
    return _GatherSeq.apply(x, group, dim)


class _AllReduceReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_reduce_replicated(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the SP group; the gradient passes through unchanged (each rank's loss is a
    replica, so summing the ranks' parameter gradients gives the gradient of one copy)."""
    return _AllReduceReplicated.apply(x, group)


def pad_to_multiple(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad `x` along `dim` to a length divisible by `multiple`."""
    extra = (-x.shape[dim]) % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def shard(x: torch.Tensor, dim: int, rank: int, sp: int) -> torch.Tensor:
    """This rank's contiguous `1/sp` slice of `x` along `dim` (length must divide)."""
    return x.chunk(sp, dim=dim)[rank]
