"""Attention backends: each is a [`MoCKernel`], a forward `(q, k, v, routing, scale) -> (out, lse)` and a backward,
with `(B, L, H, D)` tensors (see `kernels/base.py`)."""

from .base import MoCKernel, kernel_attention
from .reference import MAX_REFERENCE_TOKENS, REFERENCE, reference_attention
from .torch_chunked import TORCH, torch_attention

__all__ = [
    "MAX_REFERENCE_TOKENS",
    "MoCKernel",
    "REFERENCE",
    "TORCH",
    "kernel_attention",
    "reference_attention",
    "torch_attention",
]
