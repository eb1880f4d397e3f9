"""Attention backends: each is a [`MoCKernel`], a forward `(q, k, v, routing, scale) -> (out, lse)` and a backward,
with `(B, L, H, D)` tensors (see `kernels/base.py`).

- `reference`: explicit mask, by definition (`reference.py`);
- `torch`, `flash`, `flash_attn`: the var-len scheme (`varlen.py`) on the portable executor, PyTorch's flash kernels
  or the flash-attn package (`executors.py`, `flash_attn_executors.py`);
- `triton`: fused Triton kernels (`triton_moc.py`, imported on demand).
"""

from .base import MoCKernel, kernel_attention
from .flash import FLASH, FLASH_ATTN, flash_attention
from .reference import MAX_REFERENCE_TOKENS, REFERENCE, reference_attention
from .torch_chunked import TORCH, torch_attention

__all__ = [
    "FLASH",
    "FLASH_ATTN",
    "MAX_REFERENCE_TOKENS",
    "MoCKernel",
    "REFERENCE",
    "TORCH",
    "flash_attention",
    "kernel_attention",
    "reference_attention",
    "torch_attention",
]
