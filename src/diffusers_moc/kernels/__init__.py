"""Attention backends: each takes `(q, k, v, routing, scale)` with `(B, L, H, D)` tensors, returns `(B, L, H, D)`."""

from .reference import MAX_REFERENCE_TOKENS, reference_attention
from .torch_chunked import torch_attention

__all__ = ["MAX_REFERENCE_TOKENS", "reference_attention", "torch_attention"]
