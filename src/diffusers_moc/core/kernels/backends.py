r"""The built-in backends, registered in [`~core.backends`]: one decorated loader each.

`auto_rank` is `"auto"`'s order on CUDA for float16 and bfloat16 (sequences of up to 128k tokens, longer ones): the
backends' times on one H200 (`benchmarks/gpu_check.py` at 32k, 90k and 180k tokens, and the Triton kernels' launch
settings as `benchmarks/tune_triton.py` measured them; results in `benchmarks/results/`), among backends that passed
the check's correctness stage in both dtypes. The Triton kernels led the forward at every length and, with the tuned
backward, forward+backward too; next come FlexAttention on FlashAttention-4 kernels up to 90k tokens and the var-len
scheme on FlashAttention-4 (`flash_attn`) at 180k. `flex` counts for `"auto"` only where it runs FlashAttention-4: on
FlexAttention's Triton kernels it measured slower than dense attention.
"""

from __future__ import annotations

import torch

from ..backends import load_kernel, register_backend
from .executors import torch_flash_unavailable
from .flash_attn_executors import flash_attn_unavailable, flash_attn_version


def _cuda_only(reason_on_cuda):
    def unavailable(device: torch.device) -> str | None:
        return reason_on_cuda(device) if device.type == "cuda" else f"needs a CUDA device, not {device.type}"

    return unavailable


def _flex_unavailable(device: torch.device) -> str | None:
    from .flex import flex_unavailable  # noqa: PLC0415  (FlexAttention is imported on first use)

    return flex_unavailable()


def _flex_runs_flash_kernels(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    from .flex import flash_kernels_unsupported_for  # noqa: PLC0415

    return flash_kernels_unsupported_for(device, dtype, head_dim, head_dim) is None


def _triton_unavailable(device: torch.device) -> str | None:
    try:
        load_kernel("triton")  # the registry's cached loader: `auto` asks on every call
    except RuntimeError as e:
        return str(e)
    return None


@register_backend("flash", unavailable=_cuda_only(torch_flash_unavailable), auto_rank=(3, 3))
def _flash():
    from .flash import FLASH  # noqa: PLC0415

    return FLASH


@register_backend("flash_attn", unavailable=_cuda_only(flash_attn_unavailable), auto_rank=(2, 1))
def _flash_attn():
    if flash_attn_version() is None:  # not installed (or too old): name why
        raise RuntimeError(f"backend='flash_attn' is not available: {flash_attn_unavailable('cpu')}")
    from .flash import FLASH_ATTN  # noqa: PLC0415

    return FLASH_ATTN


@register_backend(
    "flex", unavailable=_cuda_only(_flex_unavailable), auto_rank=(1, 2), auto_check=_flex_runs_flash_kernels
)
def _flex():
    from .flex import FLEX, flex_unavailable  # noqa: PLC0415

    reason = flex_unavailable()
    if reason is not None:
        raise RuntimeError(f"backend='flex' is not available: {reason}")
    return FLEX


# The flex backend held to FlexAttention's own Triton kernels (never FlashAttention-4): for comparisons.
@register_backend("flex_triton", unavailable=_cuda_only(_flex_unavailable))
def _flex_triton():
    from .flex import make_flex_kernel  # noqa: PLC0415

    _flex()
    return make_flex_kernel("TRITON")


@register_backend(
    "triton",
    unavailable=_cuda_only(_triton_unavailable),
    auto_rank=(0, 0),
    auto_check=lambda device, dtype, head_dim: head_dim <= 256,  # its kernels' limit
)
def _triton():
    try:
        from .triton_moc import TRITON  # noqa: PLC0415  (optional extra, imported lazily)
    except ImportError as e:
        raise RuntimeError(f"backend='triton' is not available: {e}") from e
    return TRITON


@register_backend("torch", auto_rank=(9, 9))
def _torch():
    from .torch_chunked import TORCH  # noqa: PLC0415

    return TORCH


@register_backend("reference")
def _reference():
    from .reference import REFERENCE  # noqa: PLC0415

    return REFERENCE
