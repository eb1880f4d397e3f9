"""The reference backend: explicit `(B, H, L, L)` mask and plain softmax attention. Exact, slow, short inputs only.

NaN as in SDPA (`docs/semantics.md` section 4): a NaN query or key spreads through the masked softmax by itself; a
NaN value would also reach rows that do not attend it (their zero probabilities times NaN), so values are multiplied
with their NaN set to 0 and the attended NaN value columns are set back to NaN.
"""

from __future__ import annotations

import math

import torch

from ..routing import MoCRouting, expand_routing
from .base import MoCKernel
from .nan_guard import check_scale

__all__ = ["MAX_REFERENCE_TOKENS", "REFERENCE"]

#: Longest sequence the reference backend accepts; its mask and scores are L x L.
MAX_REFERENCE_TOKENS = 8192


def _scores(q: torch.Tensor, k: torch.Tensor, routing: MoCRouting, scale: float) -> torch.Tensor:
    check_scale(scale)
    L = q.shape[1]
    if L > MAX_REFERENCE_TOKENS:
        raise ValueError(
            f"the reference backend materialises an L x L mask and refuses L={L} > {MAX_REFERENCE_TOKENS} tokens; "
            "use backend='torch' (or 'auto') for long sequences"
        )
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.transpose(1, 2).to(work), k.transpose(1, 2).to(work).transpose(-1, -2)) * scale
    return scores.masked_fill(~expand_routing(routing), float("-inf"))


def _forward(q, k, v, routing, scale):
    scores = _scores(q, k, routing, scale)
    vh = v.transpose(1, 2).to(scores.dtype)
    nan_v = vh.isnan()
    out = torch.matmul(torch.softmax(scores, dim=-1), vh.masked_fill(nan_v, 0.0))
    if bool(nan_v.any()):
        out = out.masked_fill(torch.matmul(expand_routing(routing).to(vh.dtype), nan_v.to(vh.dtype)) > 0, math.nan)
    return out.transpose(1, 2).to(q.dtype), torch.logsumexp(scores, dim=-1)


def _backward(grad_out, q, k, v, out, lse, routing, scale):
    r"""
    The gradients by their definition, from the saved output and log-sum-exp: `P = exp(S - lse)`, `dV = P^T dO`,
    `dS = P * (dO V^T - rowsum(dO * O))`, `dQ = scale dS K`, `dK = scale dS^T Q`. NaN inputs are zeroed here as in
    [`~kernels.nan_guard.sdpa_nan`]: NaN reaches the gradients through the NaN output and log-sum-exp, as through SDPA.
    """
    q, k, v = (torch.nan_to_num(x, nan=0.0, posinf=math.inf, neginf=-math.inf) for x in (q, k, v))
    scores = _scores(q, k, routing, scale)
    work = scores.dtype
    p = torch.exp(scores - lse.to(work)[..., None])
    qh, kh, vh, do, o = (x.transpose(1, 2).to(work) for x in (q, k, v, grad_out, out))
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, vh.transpose(-1, -2)) - (do * o).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kh) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qh) * scale
    return tuple(g.transpose(1, 2).to(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))


REFERENCE = MoCKernel("reference", _forward, _backward)
