"""The portable `torch` backend: exact MoC attention with memory linear in L, on CPU and CUDA, with autograd.

It is the var-len scheme of `kernels/varlen.py` (packed per-chunk segments, log-sum-exp merge in chunk order, MoBA-
style backward from the merged output) run by the portable [`~kernels.executors.TorchExecutor`]: PyTorch's fused CPU
flash-attention kernel per segment on the CPU, float32 matmuls elsewhere. On CUDA with float16 or bfloat16, the
`flash` backend runs the same scheme on PyTorch's flash kernels and is much faster.

Exactness: on the CPU a query's output is bit-for-bit independent of other queries' routing (every segment is padded
to whole 32-row blocks of the fused kernel; the merge is elementwise), so with causal routing earlier shots are
unchanged when later shots change; tested over many seeds. With the matmul path on CUDA this rests on cuBLAS computing
a row of a product independently of the number of rows, which is not guaranteed.

Host reads: see `kernels/varlen.py` (plan) and `kernels/executors.py` (`cu_seqlens`), plus one for the NaN check.
"""

from __future__ import annotations

from .base import MoCKernel
from .executors import TorchExecutor
from .nan_guard import sdpa_nan
from .varlen import varlen_kernel_functions

__all__ = ["TORCH"]

TORCH = sdpa_nan(MoCKernel("torch", *varlen_kernel_functions(lambda q, v: TorchExecutor())))
