"""The reference backend: explicit `(B, H, L, L)` mask and plain softmax attention. Exact, slow, short inputs only."""

from __future__ import annotations

import math

import torch

from ..routing import MoCRouting, expand_routing

#: Longest sequence the reference backend accepts; its mask and scores are L x L.
MAX_REFERENCE_TOKENS = 8192


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: MoCRouting, scale: float | None = None
) -> torch.Tensor:
    r"""
    MoC attention by definition: softmax over exactly the attended tokens. `q, k, v` are `(B, L, H, D)`.

    Computes in float32 (float64 inputs stay float64) and returns the input dtype.
    """
    L = q.shape[1]
    if L > MAX_REFERENCE_TOKENS:
        raise ValueError(
            f"the reference backend materialises an L x L mask and refuses L={L} > {MAX_REFERENCE_TOKENS} tokens; "
            "use backend='torch' (or 'auto') for long sequences"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh = (t.transpose(1, 2).to(work) for t in (q, k, v))
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~expand_routing(routing), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vh)
    return out.transpose(1, 2).to(q.dtype)
