r"""NaN as in `scaled_dot_product_attention`, for any backend (`docs/semantics.md` section 4).

A NaN in a query row makes that output row NaN; a NaN in a key row makes NaN every output row that attends it; a
NaN in value column `d` of a token makes column `d` NaN in every row that attends it. Fused kernels do not all do
this by themselves (PyTorch's CPU flash kernel returns 0 for a NaN query; a tiled kernel multiplies the NaN values of a
key block by the zero probabilities of rows that do not attend it and spreads NaN to them). So [`sdpa_nan`] wraps a
kernel: when an input holds NaN, the kernel runs on inputs with NaN set to 0 and the rows that depend on a NaN are set
to NaN from chunk-level facts (nothing `L x L`). The check is one float32 sum per input and one host read.
"""

from __future__ import annotations

import math

import torch

from ..routing import MoCRouting
from .base import MoCKernel

__all__ = ["sdpa_nan", "nan_masks", "check_scale"]


def check_scale(scale: float) -> None:
    """A non-finite softmax scale is an error (it would turn every score into NaN or infinity)."""
    if not math.isfinite(scale):
        raise ValueError(f"the softmax scale must be a finite number, got {scale!r}")


def _may_hold_nan(*xs: torch.Tensor) -> bool:
    # A NaN (or an infinity, or an overflow) makes the sum non-finite; only then are the inputs examined.
    total = sum(torch.sum(x, dtype=torch.float32) for x in xs)
    return not bool(torch.isfinite(total))  # host read


def nan_masks(q, k, v, routing: MoCRouting) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    `(rows (B, H, L), columns (B, L, H, Dv))` bool: the output rows and elements that depend on a NaN input.
    """
    layout = routing.layout
    B, L, H, _ = q.shape
    C = layout.num_chunks
    tok_chunk = layout.token_chunks(q.device)
    f32 = torch.float32
    k_chunk = torch.zeros(B, C, H, device=q.device, dtype=f32).index_add_(1, tok_chunk, k.isnan().any(-1).to(f32)) > 0
    v_chunk = torch.zeros(B, C, H, v.shape[-1], device=q.device, dtype=f32).index_add_(1, tok_chunk, v.isnan().to(f32))
    v_chunk = v_chunk > 0
    anchors = routing.anchors.to(f32)  # (query chunk, key chunk)
    rows = q.isnan().any(-1) | (torch.einsum("ac,bch->bah", anchors, k_chunk.to(f32)) > 0)[:, tok_chunk]
    cols = (torch.einsum("ac,bchd->bahd", anchors, v_chunk.to(f32)) > 0)[:, tok_chunk]
    selected = routing.selected.permute(0, 2, 1, 3)  # (B, L, H, S)
    for s in range(selected.shape[-1]):
        c = selected[..., s]
        routed = c >= 0
        c = c.clamp(min=0)
        rows |= routed & k_chunk.gather(1, c)
        cols |= routed[..., None] & v_chunk.gather(1, c[..., None].expand(-1, -1, -1, v.shape[-1]))
    return rows.permute(0, 2, 1), cols | rows[..., None]


def sdpa_nan(kernel: MoCKernel) -> MoCKernel:
    """`kernel` with SDPA's NaN semantics and a `ValueError` for a non-finite scale."""

    def forward(q, k, v, routing, scale):
        check_scale(scale)
        if not _may_hold_nan(q, k, v) or not any(bool(x.isnan().any()) for x in (q, k, v)):
            return kernel.forward(q, k, v, routing, scale)
        rows, cols = nan_masks(q, k, v, routing)
        out, lse = kernel.forward(
            *(torch.nan_to_num(x, nan=0.0, posinf=math.inf, neginf=-math.inf) for x in (q, k, v)), routing, scale
        )
        return out.masked_fill(cols, math.nan), lse.masked_fill(rows, math.nan)

    def backward(grad_out, q, k, v, out, lse, routing, scale):
        check_scale(scale)
        if _may_hold_nan(q, k, v):
            # NaN reaches the gradients through the NaN output and log-sum-exp, as it would through SDPA's.
            q, k, v = (torch.nan_to_num(x, nan=0.0, posinf=math.inf, neginf=-math.inf) for x in (q, k, v))
        return kernel.backward(grad_out, q, k, v, out, lse, routing, scale)

    return MoCKernel(kernel.name, forward, backward)
