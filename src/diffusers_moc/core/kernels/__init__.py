"""Attention backends: each is a [`MoCKernel`], a forward `(q, k, v, routing, scale) -> (out, lse)` and a backward,
with `(B, L, H, D)` tensors (see `kernels/base.py`), registered in `core/backends.py` by `kernels/backends.py`.

- `reference`: explicit mask, by definition (`reference.py`);
- `torch`, `flash`, `flash_attn`: the var-len scheme (`varlen.py`) on the portable executor, PyTorch's flash kernels
  or the flash-attn package (`executors.py`, `flash_attn_executors.py`);
- `flex`, `flex_triton`: FlexAttention with the routing's block mask (`flex.py`, `flex_mask.py`);
- `triton`: fused Triton kernels (`triton_moc.py`, imported on demand).

Every backend runs through one differentiable op, `moc_attention`'s `diffusers_moc::attention`.
"""

from . import backends as _backends  # noqa: F401  (registers the built-in backends)
from .base import MoCKernel

__all__ = ["MoCKernel"]
