r"""The `flash` and `flash_attn` backends: the var-len scheme of `kernels/varlen.py` on fused flash kernels.

- `"flash"`: PyTorch's own CUDA flash-attention var-len kernels ([`~kernels.executors.TorchFlashExecutor`]); no
  dependency beyond PyTorch.
- `"flash_attn"`: the `flash-attn` package, 2.x or 4 ([`~kernels.flash_attn_executors.FlashAttnExecutor`]); falls
  back to PyTorch's flash kernels when it cannot run the inputs.

Where no flash kernel can run the inputs (CPU tensors, float32, different query and value head sizes, a PyTorch
without the ops, a GPU older than compute capability 8.0), both run the same scheme on the portable executor and warn
once, naming the reason, so the results are the same, only slower.

Exactness: flash kernels compute each query row independently of the other rows of a call (split-KV, which would not,
is turned off where the op exposes it), and the merge is elementwise, so a query's output does not depend on other
queries' routing (bit for bit, checked on an H200 by `benchmarks/gpu_check.py`).

Host reads: see `kernels/varlen.py` (plan), plus one for the NaN check.
"""

from __future__ import annotations

from .base import MoCKernel
from .executors import TorchFlashExecutor, choose_executor
from .flash_attn_executors import FlashAttnExecutor
from .nan_guard import sdpa_nan
from .varlen import varlen_kernel_functions

__all__ = ["FLASH", "FLASH_ATTN"]

_CANDIDATES = {"flash": (TorchFlashExecutor,), "flash_attn": (FlashAttnExecutor, TorchFlashExecutor)}


def _kernel(name: str) -> MoCKernel:
    choose = lambda q, v: choose_executor(name, _CANDIDATES[name], q, v)  # noqa: E731
    return sdpa_nan(MoCKernel(name, *varlen_kernel_functions(choose)))


FLASH = _kernel("flash")
FLASH_ATTN = _kernel("flash_attn")
