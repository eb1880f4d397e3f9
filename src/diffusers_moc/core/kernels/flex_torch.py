r"""A FlexAttention `BlockMask` run as torch operations: the `flex` backend where FlexAttention's kernels cannot serve
it (on the CPU they run inference only and return no log-sum-exp).

It visits the blocks as FlexAttention's kernels do: per query block, its partial blocks through `mask_mod`, then its
full blocks whole, each list in ascending order, with an online softmax. A block in which a row attends nothing leaves
that row's running sums unchanged to the last bit, so the backend's exactness (the causal DAG property) holds here as
on the GPU kernels.

Host reads: the block lists, per query block. A correctness path, not a fast one.
"""

from __future__ import annotations

import torch

__all__ = ["blockwise_forward", "blockwise_backward"]


def _visits(mask, L: int):
    """`(b, h, rows, [(cols, partial), ...])` per query block, its key blocks in FlexAttention's order."""
    block = mask.BLOCK_SIZE[1]
    B, H, n = mask.kv_num_blocks.shape
    lists = [(mask.kv_num_blocks, mask.kv_indices, True), (mask.full_kv_num_blocks, mask.full_kv_indices, False)]
    device = mask.kv_indices.device
    for b in range(B):
        for h in range(H):
            for i in range(n):
                rows = torch.arange(i * block, min(L, (i + 1) * block), device=device)
                blocks = [
                    (torch.arange(j * block, min(L, (j + 1) * block), device=device), partial)
                    for num, idx, partial in lists
                    for j in idx[b, h, i, : int(num[b, h, i])].tolist()
                ]
                yield b, h, rows, blocks


def _scores(mask, b, h, rows, cols, partial, qi, kc, scale):
    s = qi @ kc.T * scale
    if partial:
        s = s.masked_fill(~mask.mask_mod(b, h, rows[:, None], cols[None, :]), float("-inf"))
    return s


def blockwise_forward(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out (B, L, H, Dv) in q.dtype, lse (B, H, L))` of `(B, L, H, D)` inputs under the block mask `mask`."""
    B, L, H, _ = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(B, L, H, v.shape[-1], dtype=work, device=q.device)
    lse = torch.empty(B, H, L, dtype=work, device=q.device)
    for b, h, rows, blocks in _visits(mask, L):
        qi = q[b, rows, h].to(work)
        m = torch.full((len(rows),), float("-inf"), dtype=work, device=q.device)
        s_sum = torch.zeros_like(m)
        acc = torch.zeros(len(rows), v.shape[-1], dtype=work, device=q.device)
        for cols, partial in blocks:
            s = _scores(mask, b, h, rows, cols, partial, qi, k[b, cols, h].to(work), scale)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)  # a row that attended nothing yet stays at 0
            alpha = torch.exp(m - m_safe)
            p = torch.exp(s - m_safe[:, None])
            s_sum = s_sum * alpha + p.sum(-1)
            acc = acc * alpha[:, None] + p @ v[b, cols, h].to(work)
            m = m_new
        out[b, rows, h] = acc / s_sum[:, None]
        lse[b, h, rows] = m + torch.log(s_sum)
    return out.to(q.dtype), lse


def blockwise_backward(grad_out, q, k, v, out, lse, mask, scale: float):
    """`(dq, dk, dv)` of [`blockwise_forward`] from its output and log-sum-exp."""
    B, L, H, _ = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (torch.zeros(x.shape, dtype=work, device=x.device) for x in (q, k, v))
    for b, h, rows, blocks in _visits(mask, L):
        qi, do = q[b, rows, h].to(work), grad_out[b, rows, h].to(work)
        delta = (do * out[b, rows, h].to(work)).sum(-1, keepdim=True)
        for cols, partial in blocks:
            kc, vc = k[b, cols, h].to(work), v[b, cols, h].to(work)
            p = torch.exp(_scores(mask, b, h, rows, cols, partial, qi, kc, scale) - lse[b, h, rows, None].to(work))
            ds = p * (do @ vc.T - delta)
            dq[b, rows, h] += ds @ kc * scale
            dk[b, cols, h] += ds.T @ qi * scale
            dv[b, cols, h] += p.T @ do
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
