"""What every MoC attention backend provides: a forward and a backward as plain functions, without autograd.

A backend is a [`MoCKernel`]: `forward(q, k, v, routing, scale) -> (out, lse)` and
`backward(grad_out, q, k, v, out, lse, routing, scale) -> (dq, dk, dv)`, with `q, k, v, out` shaped `(B, L, H, D)`
(as diffusers passes them) and `lse` the natural-log log-sum-exp of every query row, `(B, H, L)`, in float32 (float64
for float64 inputs). Keeping the two halves apart lets one `torch.library` op (`moc_attention`'s) serve every
backend, and lets the backward run from the saved output and log-sum-exp, FlashAttention style.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..routing import MoCRouting

__all__ = ["MoCKernel"]

ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MoCRouting, float], tuple[torch.Tensor, torch.Tensor]]
BackwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MoCKernel:
    r"""
    One MoC attention backend.

    Attributes:
        name (`str`): the backend name (`MoCConfig.backend`).
        forward: `(q, k, v, routing, scale) -> (out, lse)`; `out` in `q.dtype`, `lse` `(B, H, L)`.
        backward: `(grad_out, q, k, v, out, lse, routing, scale) -> (dq, dk, dv)` in the dtypes of `q, k, v`.
    """

    name: str
    forward: ForwardFn
    backward: BackwardFn
