"""The reference backend: explicit `(B, H, L, L)` mask and plain softmax attention. Exact, slow, short inputs only.

NaN as in SDPA (`docs/semantics.md` section 4): a NaN query or key spreads through the masked softmax by itself; a
NaN value would also reach rows that do not attend it (their zero probabilities times NaN), so values are multiplied
with their NaN set to 0 and the attended NaN value columns are set back to NaN.
"""

from __future__ import annotations

import math

import torch

from ..routing import MoCRouting, expand_routing
from .base import MoCKernel, kernel_attention
from .nan_guard import check_scale

__all__ = ["MAX_REFERENCE_TOKENS", "REFERENCE", "reference_attention"]

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
    # By definition: differentiate the forward again (the reference is about being obviously right, not fast).
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        recomputed, _ = _forward(*leaves, routing, scale)
        return torch.autograd.grad(recomputed, leaves, grad_out)


REFERENCE = MoCKernel("reference", _forward, _backward)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: MoCRouting, scale: float | None = None
) -> torch.Tensor:
    r"""
    MoC attention by definition: softmax over exactly the attended tokens. `q, k, v` are `(B, L, H, D)`.

    Computes in float32 (float64 inputs stay float64) and returns the input dtype; differentiable.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return kernel_attention(REFERENCE, q, k, v, routing, scale)[0]
