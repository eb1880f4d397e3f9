"""The portable `torch` backend: exact MoC attention with memory linear in L, on CPU and CUDA, with autograd.

Work is organised per key chunk, as MoBA does: for chunk `c`, the query tokens that attend to it (per head) are
gathered and attend to the chunk's keys; the partial results are merged with their log-sum-exp (online softmax).
The work is proportional to the attended (query, key) pairs whatever the routing looks like.

The backward pass recomputes each block from the saved global output and log-sum-exp, as FlashAttention does (a
block's share of the gradient only needs the global statistics), so nothing of size `L x L`, nor of the attended
pairs, is kept for autograd.

Each (queries, chunk) block runs through PyTorch's fused CPU flash-attention kernel when the tensors are on the CPU,
and through plain matmuls elsewhere (on CUDA the `triton` backend is the fast path).
"""

from __future__ import annotations

import math

import torch

from ..routing import MoCRouting
from .base import MoCKernel, kernel_attention

__all__ = ["TORCH", "torch_attention"]

# Upper bound on the elements of one (B*H, tile, chunk) score block in the matmul path.
_TILE_ELEMS = 1 << 24
# Running log-sum-exp starts finite so that exp(old - new) is 0 or 1, never NaN, on a token's first chunk.
_NEG_BIG = -1.0e30


# ---------------------------------------------------------------------------------------------- block attention
# A block is (gathered queries of B*H rows) x (one chunk of keys): q (BH, T, D), k and v (BH, n, D).


def _matmul_fwd(q, k, v, scale):
    work = torch.promote_types(q.dtype, torch.float32)
    s = torch.bmm(q.to(work), k.to(work).transpose(1, 2)).mul_(scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.bmm(s.sub_(lse[..., None]).exp_(), v.to(work)), lse


def _matmul_bwd(do, q, k, v, o, lse, scale):
    work = lse.dtype
    q, k, v, do = q.to(work), k.to(work), v.to(work), do.to(work)
    p = torch.bmm(q, k.transpose(1, 2)).mul_(scale).sub_(lse[..., None]).exp_()
    dv = torch.bmm(p.transpose(1, 2), do)
    delta = (do * o.to(work)).sum(-1, keepdim=True)
    ds = p.mul_(torch.bmm(do, v.transpose(1, 2)).sub_(delta))
    return torch.bmm(ds, k).mul_(scale), torch.bmm(ds.transpose(1, 2), q).mul_(scale), dv


def _cpu_flash_fwd(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], k[None], v[None], 0.0, False, scale=scale
    )
    return out[0], lse[0]


def _cpu_flash_bwd(do, q, k, v, o, lse, scale):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do[None], q[None], k[None], v[None], o[None], lse[None].contiguous(), 0.0, False, scale=scale
    )
    return dq[0], dk[0], dv[0]


def _block_ops(q: torch.Tensor, v: torch.Tensor):
    """(forward, backward, tile budget) for blocks of these tensors; the fused kernel needs no score tiles."""
    fused = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    # The fused CPU kernel needs one head size for queries and values.
    if q.device.type == "cpu" and fused and q.shape[-1] == v.shape[-1]:
        return _cpu_flash_fwd, _cpu_flash_bwd, None
    return _matmul_fwd, _matmul_bwd, _TILE_ELEMS


# ---------------------------------------------------------------------------------------------- chunk loop
def _chunk_rows(attend_c: torch.Tensor):
    """For one key chunk: per (b, h) row, the query tokens attending it packed first; their validity; the width."""
    counts = attend_c.sum(1)
    width = int(counts.max().item())
    if width == 0:
        return None, None, 0
    order = torch.argsort(attend_c.to(torch.uint8), dim=1, descending=True, stable=True)[:, :width]
    valid = torch.arange(width, device=attend_c.device)[None, :] < counts[:, None]
    return order, valid, width


def _blocks(attend: torch.Tensor, offsets: tuple[int, ...], budget: int | None):
    """Yield `(lo, hi, idx, valid)` for every key chunk `lo:hi` and tile of the queries that attend to it."""
    BH = attend.shape[0]
    for c in range(len(offsets) - 1):
        order, valid, width = _chunk_rows(attend[:, :, c])
        if width == 0:
            continue
        lo, hi = offsets[c], offsets[c + 1]
        step = width if budget is None else max(1, budget // (BH * (hi - lo)))
        for t0 in range(0, width, step):
            yield lo, hi, order[:, t0 : t0 + step], valid[:, t0 : t0 + step]


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Flat row numbers of `x` (BH, L, ...) for per-(b, h) token indices `idx` (BH, T)."""
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * x.shape[1]).reshape(-1)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # Row gathers through index_select on a flat view run at copy speed; `gather` with an expanded index does not.
    return x.reshape(-1, x.shape[-1]).index_select(0, _rows(x, idx)).view(*idx.shape, x.shape[-1])


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> (B*H, L, D); contiguous: with B == 1 the reshape is a strided view, and every row gather
    would copy it whole."""
    B, L, H, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(B * H, L, D).contiguous()


def _tokens_first(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """(B*H, L, D) -> (B, L, H, D)."""
    return x.reshape(B, H, x.shape[1], x.shape[-1]).permute(0, 2, 1, 3)


def _dense_ops(q: torch.Tensor, v: torch.Tensor, attend: torch.Tensor):
    """The fused dense kernel's (forward, backward) when every pair is attended (full density) and one exists."""
    fused = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    if q.device.type == "cpu" and fused and q.shape[-1] == v.shape[-1] and bool(attend.all()):
        return _cpu_flash_fwd, _cpu_flash_bwd
    return None


def _forward(q, k, v, routing: MoCRouting, scale: float):
    B, L, H, _ = q.shape
    attend = routing.chunk_mask().reshape(B * H, L, -1)  # L x C per head
    q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
    dense = _dense_ops(q, v, attend)
    if dense is not None:
        out, lse = dense[0](q, k, v, scale)
    else:
        out, lse = _chunked_forward(q, k, v, attend, routing.layout.offsets, scale)
    return _tokens_first(out, B, H), lse.reshape(B, H, L)


def _chunked_forward(q, k, v, attend, offsets, scale):
    # q, k, v: (BH, L, D); attend: (BH, L, C) bool.
    BH, L, _ = q.shape
    work = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 merge in fp32; fp64 stays fp64
    fwd, _, budget = _block_ops(q, v)
    out = torch.zeros(BH, L, v.shape[-1], device=q.device, dtype=work)
    lse = torch.full((BH, L), _NEG_BIG, device=q.device, dtype=work)
    for lo, hi, idx, ok in _blocks(attend, offsets, budget):
        o_blk, lse_blk = fwd(_gather(q, idx), k[:, lo:hi], v[:, lo:hi], scale)
        # Padding rows (queries that do not attend this chunk) get weight exp(-inf) = 0 in the merge.
        lse_blk = lse_blk.to(work).masked_fill(~ok, float("-inf"))
        lse_old = lse.gather(1, idx)
        # Only exp, log and single arithmetic ops here: their CPU results do not depend on where a row sits in
        # the tensor, whereas sigmoid, logaddexp and lerp round differently in the vectorised body and the scalar
        # tail. So a query's output never depends on which other queries attend the same chunk; causal routing
        # then keeps earlier shots bit-identical when later shots change.
        top = torch.maximum(lse_old, lse_blk)
        w_old, w_blk = torch.exp(lse_old - top), torch.exp(lse_blk - top)
        total = w_old + w_blk
        rows = _gather(out, idx) * (w_old / total)[..., None] + o_blk.to(work) * (w_blk / total)[..., None]
        out.view(-1, out.shape[-1]).index_copy_(0, _rows(out, idx), rows.view(-1, rows.shape[-1]))
        lse.scatter_(1, idx, top + torch.log(total))
    return out.to(q.dtype), lse


def _backward(grad_out, q, k, v, out, lse, routing: MoCRouting, scale: float):
    B, L, H, _ = q.shape
    attend = routing.chunk_mask().reshape(B * H, L, -1)
    q, k, v, out, grad_out = (_heads_first(x) for x in (q, k, v, out, grad_out))
    lse = lse.reshape(B * H, L)
    dense = _dense_ops(q, v, attend)
    if dense is not None:
        grads = dense[1](grad_out, q, k, v, out, lse, scale)
    else:
        grads = _chunked_backward(grad_out, q, k, v, out, lse, attend, routing.layout.offsets, scale)
    return tuple(_tokens_first(g, B, H) for g in grads)


def _chunked_backward(grad_out, q, k, v, out, lse, attend, offsets, scale):
    _, bwd, budget = _block_ops(q, v)
    dq = torch.zeros(q.shape, device=q.device, dtype=lse.dtype)
    dk = torch.zeros_like(dq)
    dv = torch.zeros(v.shape, device=q.device, dtype=lse.dtype)
    for lo, hi, idx, ok in _blocks(attend, offsets, budget):
        # Padding rows get probabilities exp(s - inf) = 0 and zero upstream gradient, so their share of dq, dk
        # and dv is exactly zero (a finite lse could overflow exp for a query that never attended this chunk).
        keep = ok[..., None]
        do_g = _gather(grad_out, idx) * keep
        o_g = _gather(out, idx) * keep
        lse_g = lse.gather(1, idx).masked_fill(~ok, float("inf"))
        dq_g, dk_c, dv_c = bwd(do_g, _gather(q, idx), k[:, lo:hi], v[:, lo:hi], o_g, lse_g, scale)
        dq.view(-1, dq.shape[-1]).index_add_(0, _rows(dq, idx), dq_g.reshape(-1, dq.shape[-1]).to(dq.dtype))
        dk[:, lo:hi] += dk_c.to(dk.dtype)
        dv[:, lo:hi] += dv_c.to(dv.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


TORCH = MoCKernel("torch", _forward, _backward)


def torch_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: MoCRouting, scale: float | None = None
) -> torch.Tensor:
    r"""
    MoC attention with linear memory. `q, k, v` are `(B, L, H, D)`; returns `(B, L, H, D)` in `q.dtype`.

    Merges in float32 (float64 inputs stay float64); differentiable with respect to `q`, `k` and `v`.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return kernel_attention(TORCH, q, k, v, routing, scale)[0]
