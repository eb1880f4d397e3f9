r"""The FlexAttention `BlockMask` of a routing: the one builder the `flex` backend and the benchmarks use.

Per (query block, key block) of `block` tokens, a block is

- *full* when every query of the block attends every key of it: the kernel runs it without a mask;
- *partial* when some query attends some key of it: `mask_mod` decides per token, reading the per-token chunk
  selection `(B, H, L, C)`;
- skipped otherwise.

Full blocks are decided from the queries' selections where a query block lies in one chunk, and from the mandatory
anchors alone where it straddles two chunks. Anchors do not depend on routing, so a query's full blocks never change
when queries of other chunks re-route; re-routing only adds or removes partial blocks in which such a query attends
nothing, and those add exact zeros to its softmax sums. That keeps the causal DAG property bit for bit.

Everything is computed on the routing's device from chunk-level facts: the largest tensors are the `(B, H, L, C)`
selection and the `(B, H, L / block, L / block)` block lists; nothing is `L x L`, and nothing is read to the host.
"""

from __future__ import annotations

import torch

from ..routing import MoCRouting

__all__ = ["BLOCK", "flex_block_mask"]

#: Block size of the block mask, in tokens (queries and keys): FlexAttention's and FlashAttention-4's tile.
BLOCK = 128


def _per_block(x: torch.Tensor, block: int, dim: int, reduce: str) -> torch.Tensor:
    """`any` / `all` of `x` over consecutive runs of `block` entries along `dim` (the last run may be shorter)."""
    n = x.shape[dim]
    whole = n // block * block
    parts = [getattr(x.narrow(dim, 0, whole).unflatten(dim, (n // block, block)), reduce)(dim + 1)]
    if whole < n:
        parts.append(getattr(x.narrow(dim, whole, n - whole), reduce)(dim, keepdim=True))
    return torch.cat(parts, dim=dim)


def _ordered(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(..., n)` bool -> `(count (...), indices (..., n))` int32: the True columns first in ascending order, then the
    others (a stable partition by one scatter, cheaper than a sort)."""
    t = mask.to(torch.int64)
    ones = t.cumsum(-1)
    count = ones[..., -1:]
    position = torch.where(mask, ones - 1, count + (1 - t).cumsum(-1) - 1)
    columns = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.int32).expand(mask.shape)
    return count[..., 0].to(torch.int32), torch.empty_like(columns).scatter_(-1, position, columns)


def _block_classes(routing: MoCRouting, attend: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(partial, full)` bool `(B, H, n, n)` from the `(B, H, L, C)` selection `attend` (module docstring)."""
    layout = routing.layout
    device = attend.device
    L = layout.num_tokens
    tok_chunk = layout.token_chunks(device)
    union = _per_block(attend, block, 2, "any")  # (B, H, n, C): chunks some query of the block attends
    every = _per_block(attend, block, 2, "all")  # ... that every query of the block attends
    starts = torch.arange(0, L, block, device=device)
    straddles = tok_chunk[starts] != tok_chunk[(starts + block).clamp(max=L) - 1]
    anchor_every = _per_block(routing.anchors[tok_chunk], block, 0, "all")  # (n, C)
    every = torch.where(straddles[:, None], anchor_every, every)
    offsets = torch.tensor(layout.offsets, device=device)
    blocks = starts[:, None] // block
    cover = ((offsets[:-1] // block <= blocks) & (blocks <= (offsets[1:] - 1) // block)).float()  # (n, C)
    # Exact in float32 (and TF32): 0/1 products, sums at most C.
    some = (union.float() @ cover.T) > 0
    full = (((~every).float() @ cover.T) == 0) & some
    return some & ~full, full


def flex_block_mask(routing: MoCRouting, block: int | None = None, compute_q_blocks: bool = True):
    r"""
    A FlexAttention `BlockMask` for exactly the attended set of `routing`, with a `mask_mod` that reads the per-token
    chunk selection (see the module docstring).

    Args:
        routing (`MoCRouting`): the routing of one attention call.
        block (`int`, *optional*): block size for queries and keys, [`BLOCK`] by default.
        compute_q_blocks (`bool`, defaults to `True`): also build the transposed block lists a backward needs.
    """
    from torch.nn.attention.flex_attention import BlockMask  # noqa: PLC0415

    block = BLOCK if block is None else block
    L = routing.layout.num_tokens
    device = routing.selected.device
    n = -(-L // block)
    # The selection, padded to whole blocks: kernels may read mask_mod at positions past L in the last block (and
    # mask them by length). Padded rows attend nothing; padded keys read chunk 0.
    table = torch.nn.functional.pad(routing.chunk_mask(), (0, 0, 0, n * block - L))  # (B, H, n * block, C)
    partial, full = _block_classes(routing, table[:, :, :L], block)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    chunk_of = torch.zeros(n * block, dtype=torch.int32, device=device)
    chunk_of[:L] = routing.layout.token_chunks(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return table[b, h, q_idx, chunk_of[kv_idx]]

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(L, L),
        compute_q_blocks=compute_q_blocks,
    )  # fmt: skip
