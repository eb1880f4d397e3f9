"""Ulysses context parallelism for MoC: move between sequence shards and head shards with all-to-all.

diffusers' `ContextParallelConfig(ulysses_degree=P)` splits the token sequence over `P` ranks. Its own attention
(`TemplatedUlyssesAttention`) exchanges shards so that each rank holds *all* tokens for `H / P` heads, runs dense
attention and exchanges back. MoC routing is per head and needs the whole sequence (chunk means, top-k over every
chunk), so a MoC processor does the same exchange itself around `moc_attention`, with the functions here.

Ring attention (`ring_degree > 1`) never gives a rank the whole sequence, so MoC cannot run under it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "ulysses_config",
    "check_ulysses_divisible",
    "sequence_to_heads",
    "heads_to_sequence",
    "gather_sequence",
    "all_gather_sequence",
    "head_shard",
]


def ulysses_config(parallel_config: Any) -> Any | None:
    r"""
    The `ContextParallelConfig` a processor must honour, or `None` when attention is not context-parallel.

    Args:
        parallel_config: what diffusers' `enable_parallelism` set on the processor (`ParallelConfig`), or `None`.

    Raises:
        `NotImplementedError`: for ring attention or "Ulysses anything" mode, which MoC does not support.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        # No parallelism, or tensor parallelism (weights sharded by heads: the processor sees whole sequences).
        return None
    if cp.ring_degree > 1:
        raise NotImplementedError(
            f"MoC attention supports Ulysses context parallelism only, got ring_degree={cp.ring_degree}: ring "
            "attention never holds the whole sequence on one rank, which MoC routing needs; use "
            "ContextParallelConfig(ulysses_degree=N)"
        )
    if getattr(cp, "ulysses_anything", False):
        raise NotImplementedError(
            "MoC attention does not support ContextParallelConfig(ulysses_anything=True); the sequence length and "
            "head count must be divisible by ulysses_degree"
        )
    if cp.ulysses_degree <= 1:
        return None
    return cp


def check_ulysses_divisible(degree: int, heads: int, tokens: int) -> None:
    r"""
    Refuse a Ulysses degree that does not divide the attention heads and the video tokens evenly.

    Ulysses gives each of the `degree` ranks `tokens / degree` tokens and, around attention, `heads / degree` heads;
    check this before loading a model rather than failing inside the first forward.

    Raises:
        `ValueError`: naming the heads or tokens and the degree.
    """
    bad = [f"{n} {what}" for n, what in ((heads, "attention heads"), (tokens, "video tokens")) if n % degree]
    if bad:
        raise ValueError(
            f"Ulysses context parallelism over {degree} processes splits the attention heads and the video tokens "
            f"evenly, but {' and '.join(bad)} {'are' if len(bad) > 1 else 'is'} not divisible by {degree}"
        )


def sequence_shard(parallel_config: Any) -> tuple[int, int]:
    """`(rank, world)`: this rank holds tokens `[rank * L / world, (rank + 1) * L / world)` of the sequence; `(0, 1)`
    without context parallelism."""
    cp = ulysses_config(parallel_config)
    if cp is None:
        return 0, 1
    group, world = _group_and_size(cp)
    return dist.get_rank(group), world


def head_shard(cp: Any, local_heads: int) -> tuple[int, int]:
    r"""
    `(first, total)`: after [`sequence_to_heads`] this rank holds heads `first : first + local_heads` of `total`
    (rank `r` of the Ulysses group gets the `r`-th group of heads). MoC's drop-off and drop-in draw for all `total`
    heads and keep this slice, so a context-parallel run draws what one device draws.
    """
    rank = getattr(cp, "_ulysses_local_rank", None)  # set by diffusers' `ContextParallelConfig.setup`: a plain int
    if rank is None:
        rank = dist.get_rank(_group_and_size(cp)[0])
    return rank * local_heads, cp.ulysses_degree * local_heads


def _group_and_size(cp: Any) -> tuple[Any, int]:
    return cp._ulysses_mesh.get_group(), cp.ulysses_degree


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    # x is (P, ...) contiguous; slice r goes to rank r, and slice r of the result came from rank r.
    # Contiguous first: `empty_like` of a permuted view would copy its strides, and the collective assumes none.
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
        ctx.group, ctx.world = group, world
        return _seq_to_heads(x, group, world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _heads_to_seq(grad, ctx.group, ctx.world), None, None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
        ctx.group, ctx.world = group, world
        return _heads_to_seq(x, group, world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _seq_to_heads(grad, ctx.group, ctx.world), None, None


def _seq_to_heads(x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    B, L_local, H, D = x.shape
    if H % world:
        raise ValueError(
            f"Ulysses context parallelism needs the head count ({H}) divisible by ulysses_degree ({world})"
        )
    # (P, B, L/P, H/P, D): head group r is sent to rank r; we receive our head group from every sequence shard.
    x = x.reshape(B, L_local, world, H // world, D).permute(2, 0, 1, 3, 4)
    x = _all_to_all(x, group)
    return x.permute(1, 0, 2, 3, 4).reshape(B, world * L_local, H // world, D)


def _heads_to_seq(x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    B, L, H_local, D = x.shape
    # (P, B, L/P, H/P, D): sequence shard r goes back to rank r; we receive every head group of our shard.
    x = x.reshape(B, world, L // world, H_local, D).permute(1, 0, 2, 3, 4)
    x = _all_to_all(x, group)
    return x.permute(1, 2, 0, 3, 4).reshape(B, L // world, world * H_local, D)


def sequence_to_heads(x: torch.Tensor, cp: Any) -> torch.Tensor:
    r"""
    `(B, L / P, H, D)` sequence shard -> `(B, L, H / P, D)` head shard (all tokens, this rank's heads). Differentiable.

    Args:
        x (`torch.Tensor`): this rank's tokens for all heads.
        cp: the `ContextParallelConfig` returned by [`ulysses_config`].
    """
    group, world = _group_and_size(cp)
    return _SequenceToHeads.apply(x, group, world)


def heads_to_sequence(x: torch.Tensor, cp: Any) -> torch.Tensor:
    r"""Inverse of [`sequence_to_heads`]: `(B, L, H / P, D)` -> `(B, L / P, H, D)`. Differentiable."""
    group, world = _group_and_size(cp)
    return _HeadsToSequence.apply(x, group, world)


def gather_sequence(x: torch.Tensor, dim: int, cp: Any) -> torch.Tensor:
    r"""
    All ranks' shards of `x` concatenated along `dim` (e.g. the rotary table, which the CP plan splits like the
    tokens, so that a processor can read the global video grid off it). Not differentiable: for constants only.
    """
    group, world = _group_and_size(cp)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _AllGatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: Any, world: int) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.world = dim, group, world
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank used the whole gathered tensor: this shard's gradient is the sum of all ranks' gradients for it.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.chunk(ctx.world, dim=ctx.dim)[rank], None, None, None


def all_gather_sequence(x: torch.Tensor, dim: int, cp: Any) -> torch.Tensor:
    r"""
    Differentiable all-gather of sequence shards along `dim` (e.g. caption tokens that the CP plan split, for a
    cross-attention whose queries stay local). The backward sums every rank's gradient for this rank's shard.
    """
    group, world = _group_and_size(cp)
    return _AllGatherSequence.apply(x, dim, group, world)
