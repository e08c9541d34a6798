"""Ulysses sequence parallelism: differentiable collectives over an SP process group.

Each rank of an SP group holds `L/sp` tokens of every sample. Self-attention swaps the sharded
dimension from tokens to heads with one all-to-all (`[B, L/sp, H, d] → [B, L, H/sp, d]`), runs
ordinary attention over all tokens for its heads, and swaps back. Loss-side reductions use
`all_reduce_replicated`: every rank computes the same loss from the reduced value and
back-propagates only through its own share, so the SP ranks' gradients sum to the true one.
"""
from __future__ import annotations

import abc

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


def check_heads_divisible(num_heads: int, sp_size: int) -> None:
    """ConfigError unless the attention heads split evenly over the SP group."""
    from megaflow.errors import ConfigError

    if num_heads % sp_size:
        raise ConfigError(f"the transformer has {num_heads} attention heads, which do not divide by "
                          f"parallel.sp_size={sp_size}; Ulysses gives each SP rank heads/sp heads. Choose an "
                          f"sp_size that divides {num_heads}")


class SequenceShards(abc.ABC):
    """Maps latents `[B, C, F, H, W]` to and from one SP rank's share of the transformer's output
    tokens. A family defines `patchify` / `unpatchify` (its token order and the output
    projection's channel order); the sharded forward returns this rank's zero-padded shard
    `[B, L_pad/sp, P]` of the `L` tokens (`L_pad` the next multiple of sp)."""

    #: The transformer's patch `(pt, ph, pw)` over latent frames, rows and columns.
    patch: tuple[int, int, int] = (1, 1, 1)

    def __init__(self, group) -> None:
        self.group = group
        self.sp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def grid(self, latent: torch.Tensor) -> tuple[int, int, int]:
        """Tokens along frames, rows and columns of a latent `[B, C, F, H, W]`."""
        _, _, f, h, w = latent.shape
        pt, ph, pw = self.patch
        return f // pt, h // ph, w // pw

    @abc.abstractmethod
    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """`[B, C, F, H, W]` → tokens `[B, L, P]` in the output projection's layout."""

    @abc.abstractmethod
    def unpatchify(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, L, P]` → the latent of `like`'s shape; the inverse of `patchify`."""

    def _bounds(self, length: int) -> tuple[int, int]:
        per = (length + (-length) % self.sp) // self.sp
        lo = min(self.rank * per, length)
        return lo, min(lo + per, length)

    def shard_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """This rank's real (unpadded) tokens of a latent: `[B, L_r, P]`."""
        tokens = self.patchify(latent)
        lo, hi = self._bounds(tokens.shape[1])
        return tokens[:, lo:hi]

    def valid(self, padded_shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Drop the pad tokens from the model's padded shard `[B, L_pad/sp, P]` → `[B, L_r, P]`."""
        lo, hi = self._bounds(self.patchify(like[:1]).shape[1])
        start = self.rank * padded_shard.shape[1]
        return padded_shard[:, lo - start:hi - start] if hi > lo else padded_shard[:, :0]

    def unshard(self, shard_tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Real tokens of every rank → the full latent shaped like `like` (differentiable)."""
        length = self.patchify(like[:1]).shape[1]
        per = (length + (-length) % self.sp) // self.sp
        padded = torch.cat([shard_tokens, shard_tokens.new_zeros(
            (shard_tokens.shape[0], per - shard_tokens.shape[1], shard_tokens.shape[2]))], dim=1)
        full = gather_seq(padded, self.group, dim=1)[:, :length]
        return self.unpatchify(full, like)
