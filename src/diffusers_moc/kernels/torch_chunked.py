"""The portable `torch` backend: exact MoC attention with memory linear in L, on CPU and CUDA, with autograd.

Work is organised per key chunk, as MoBA does: for chunk `c`, the query tokens that attend to it (per head) are
gathered, scored against the chunk's keys, and merged into running softmax statistics (online softmax). The work is
proportional to the attended (query, key) pairs whatever the routing looks like, and the largest temporary is one
`(B*H, tile, chunk_size)` score block. The backward pass recomputes the scores from the saved log-sum-exp, as
FlashAttention does, so nothing of size `L x L` (or of the attended pairs) is kept for autograd.
"""

from __future__ import annotations

import math

import torch

from ..routing import MoCRouting

# Upper bound on the elements of one (B*H, tile, chunk) score block.
_TILE_ELEMS = 1 << 24
# Running max starts finite so that exp(old - new) is 0, never NaN, on a token's first chunk.
_NEG_BIG = -1.0e30


def _chunk_rows(attend_c: torch.Tensor):
    """For one key chunk: per (b, h) row, the query tokens attending it, packed first; plus validity and count."""
    counts = attend_c.sum(1)
    width = int(counts.max().item())
    if width == 0:
        return None, None, 0
    order = torch.argsort(attend_c.to(torch.uint8), dim=1, descending=True, stable=True)[:, :width]
    valid = torch.arange(width, device=attend_c.device)[None, :] < counts[:, None]
    return order, valid, width


def _tiles(width: int, bh: int, chunk: int):
    step = max(1, _TILE_ELEMS // max(1, bh * chunk))
    for start in range(0, width, step):
        yield start, min(width, start + step)


def _gather(x: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])).to(dtype)


class _ChunkedMoCAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attend, offsets, scale):
        # q, k, v: (BH, L, D); attend: (BH, L, C) bool.
        BH, L, D = q.shape
        work = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 accumulate in fp32; fp64 stays fp64
        acc = torch.zeros(BH, L, v.shape[-1], device=q.device, dtype=work)
        row_max = torch.full((BH, L), _NEG_BIG, device=q.device, dtype=work)
        row_sum = torch.zeros(BH, L, device=q.device, dtype=work)
        for c in range(len(offsets) - 1):
            order, valid, width = _chunk_rows(attend[:, :, c])
            if width == 0:
                continue
            k_c = k[:, offsets[c] : offsets[c + 1]].to(work)
            v_c = v[:, offsets[c] : offsets[c + 1]].to(work)
            for t0, t1 in _tiles(width, BH, k_c.shape[1]):
                idx, ok = order[:, t0:t1], valid[:, t0:t1]
                s = torch.bmm(_gather(q, idx, work), k_c.transpose(1, 2)).mul_(scale)
                s.masked_fill_(~ok[..., None], float("-inf"))
                m_old = row_max.gather(1, idx)
                m_new = torch.maximum(m_old, s.amax(-1))
                alpha = torch.exp(m_old - m_new)
                p = torch.exp(s - m_new[..., None])
                row_sum.scatter_(1, idx, row_sum.gather(1, idx) * alpha + p.sum(-1))
                rows = _gather(acc, idx, work) * alpha[..., None] + torch.bmm(p, v_c)
                acc.scatter_(1, idx[..., None].expand(-1, -1, acc.shape[-1]), rows)
                row_max.scatter_(1, idx, m_new)
        out = (acc / row_sum[..., None]).to(q.dtype)
        lse = row_max + torch.log(row_sum)
        ctx.save_for_backward(q, k, v, attend, out, lse)
        ctx.offsets, ctx.scale = offsets, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attend, out, lse = ctx.saved_tensors
        offsets, scale = ctx.offsets, ctx.scale
        BH, L, D = q.shape
        work = lse.dtype
        grad_out = grad_out.to(work)
        delta = (grad_out * out.to(work)).sum(-1)
        dq = torch.zeros(BH, L, D, device=q.device, dtype=work)
        dk = torch.zeros_like(dq)
        dv = torch.zeros(BH, L, v.shape[-1], device=q.device, dtype=work)
        for c in range(len(offsets) - 1):
            order, valid, width = _chunk_rows(attend[:, :, c])
            if width == 0:
                continue
            lo, hi = offsets[c], offsets[c + 1]
            k_c, v_c = k[:, lo:hi].to(work), v[:, lo:hi].to(work)
            for t0, t1 in _tiles(width, BH, hi - lo):
                idx, ok = order[:, t0:t1], valid[:, t0:t1]
                q_g, do_g = _gather(q, idx, work), _gather(grad_out, idx, work)
                s = torch.bmm(q_g, k_c.transpose(1, 2)).mul_(scale)
                s.masked_fill_(~ok[..., None], float("-inf"))
                p = torch.exp(s - lse.gather(1, idx)[..., None])
                dv[:, lo:hi] += torch.bmm(p.transpose(1, 2), do_g)
                ds = p * (torch.bmm(do_g, v_c.transpose(1, 2)) - delta.gather(1, idx)[..., None])
                dq.scatter_add_(1, idx[..., None].expand(-1, -1, D), torch.bmm(ds, k_c) * scale)
                dk[:, lo:hi] += torch.bmm(ds.transpose(1, 2), q_g) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def torch_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: MoCRouting, scale: float | None = None
) -> torch.Tensor:
    r"""
    MoC attention with linear memory. `q, k, v` are `(B, L, H, D)`; returns `(B, L, H, D)` in `q.dtype`.

    Accumulates in float32 whatever the input dtype; differentiable with respect to `q`, `k` and `v`.
    """
    B, L, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    attend = routing.chunk_mask()  # (B, H, L, C): L x C per head
    if bool(attend.all()):
        # Every pair attended (full density): this is dense attention, so use the fused dense kernel.
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2)

    def heads_first(x):
        return x.permute(0, 2, 1, 3).reshape(B * H, L, x.shape[-1])

    out = _ChunkedMoCAttention.apply(
        heads_first(q), heads_first(k), heads_first(v), attend.reshape(B * H, L, -1), routing.layout.offsets, scale
    )
    return out.reshape(B, H, L, -1).permute(0, 2, 1, 3)
