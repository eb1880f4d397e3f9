r"""The `flex` backend: PyTorch's FlexAttention (`torch.nn.attention.flex_attention`) with the `BlockMask` of the
routing (`kernels/flex_mask.py`).

Kernels, chosen per call ([`flex_kernel_choice`]):

- FlashAttention-4 (`kernel_options={"BACKEND": "FLASH"}`) where the `flash-attn-4` package is installed, on a Hopper or
  Blackwell GPU, for float16 / bfloat16 and head sizes 64, 96, 128;
- otherwise FlexAttention's Triton kernels on CUDA;
- elsewhere the block mask runs as torch operations (`kernels/flex_torch.py`): FlexAttention's CPU kernels run
  inference only and return no log-sum-exp.

Each fallback warns once, naming the reason. FlexAttention is compiled (inductor) on first use per length, dtype and
head size; if the FlashAttention-4 lowering refuses inputs, those inputs take the Triton kernels from then on, with a
warning naming the error.

The backward recomputes the forward under autograd and differentiates it (FlexAttention's backward kernels), since
FlexAttention's public API has no backward that starts from another call's output and log-sum-exp: one more forward
than the var-len backends' backward.

Host reads: the NaN check only (on CUDA).
"""

from __future__ import annotations

import functools
import importlib.util
import typing
import warnings

import torch

from .base import MoCKernel
from .flex_mask import flex_block_mask
from .flex_torch import blockwise_backward, blockwise_forward
from .nan_guard import sdpa_nan

__all__ = ["FLEX", "flex_kernel_choice", "flex_unavailable", "make_flex_kernel"]

# Specialisations (length, dtype, head size, kernels) the one compiled FlexAttention may hold: past dynamo's default
# (8) it would run FlexAttention unfused, materialising L x L scores.
_RECOMPILE_LIMIT = 64
# Head sizes FlashAttention-4's block-sparse kernels take.
_FLASH_HEAD_DIMS = (64, 96, 128)


@functools.cache
def flex_unavailable() -> str | None:
    """Why this PyTorch cannot run the `flex` backend at all, or `None`."""
    try:
        from torch.nn.attention import flex_attention as fa  # noqa: PLC0415
    except ImportError:
        return f"PyTorch {torch.__version__} has no torch.nn.attention.flex_attention"
    if not hasattr(fa, "AuxRequest") or "compute_q_blocks" not in fa.BlockMask.from_kv_blocks.__code__.co_varnames:
        return f"PyTorch {torch.__version__}'s FlexAttention is older than the flex backend needs (2.9)"
    return None


@functools.cache
def _flash_package_missing() -> str | None:
    from torch.nn.attention import flex_attention as fa  # noqa: PLC0415

    if "FLASH" not in typing.get_args(getattr(fa, "_Backend", None)):
        return f"PyTorch {torch.__version__}'s FlexAttention has no FLASH backend"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:
        found = False
    return None if found else "the flash-attn-4 package (flash_attn.cute) is not installed"


def flash_kernels_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why FlexAttention's FLASH (FlashAttention-4) kernels cannot run these inputs, or `None`."""
    return flash_kernels_unsupported_for(q.device, q.dtype, q.shape[-1], v.shape[-1])


def flash_kernels_unsupported_for(device: torch.device, dtype: torch.dtype, head_dim: int, v_head_dim: int):
    """[`flash_kernels_unsupported`] from the facts alone: why FlashAttention-4 cannot run, or `None`."""
    if device.type != "cuda":
        return f"FlashAttention-4 kernels need CUDA tensors, got {device.type}"
    missing = _flash_package_missing()
    if missing is not None:
        return missing
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"FlashAttention-4's block-sparse kernels need a Hopper or Blackwell GPU, got capability {major}.{minor}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-4 kernels take float16 or bfloat16, got {str(dtype).replace('torch.', '')}"
    if head_dim != v_head_dim or head_dim not in _FLASH_HEAD_DIMS:
        return (
            f"FlashAttention-4's block-sparse kernels take head sizes {_FLASH_HEAD_DIMS}, got {head_dim}/{v_head_dim}"
        )
    return None


# Inputs (device, dtype, head sizes, direction) whose FLASH lowering failed, with the reason; and those it built.
_FAILED: dict[tuple, str] = {}
_BUILT: set[tuple] = set()
_WARNED: set[str] = set()


def _key(q: torch.Tensor, v: torch.Tensor, direction: str) -> tuple:
    return (str(q.device), q.dtype, q.shape[-1], v.shape[-1], direction)


def flex_kernel_choice(q: torch.Tensor, v: torch.Tensor, direction: str = "forward") -> tuple[str, str | None]:
    r"""
    The kernels the `flex` backend runs for these inputs (`direction`: `"forward"` or `"backward"`): `("FLASH", None)`
    for FlashAttention-4, else `("TRITON", reason)` on CUDA or `("TORCH", reason)` elsewhere, with the reason
    FlashAttention-4 does not run.
    """
    failed = _FAILED.get(_key(q, v, direction))
    reason = flash_kernels_unsupported(q, v) or failed
    if reason is None:
        return "FLASH", None
    if q.device.type == "cuda":
        return "TRITON", reason
    return "TORCH", failed or "FlexAttention's CPU kernels run inference only and return no log-sum-exp"


def _warn_fallback(kernels: str, reason: str) -> None:
    where = "FlexAttention's Triton kernels" if kernels == "TRITON" else "its block mask as torch operations"
    message = f"MoC backend 'flex' runs {where} instead of FlashAttention-4: {reason}"
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=5)


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def _flex(q, k, v, mask, scale: float, kernels: str, lse: bool):
    """Compiled FlexAttention on `(B, L, H, D)` tensors: `(out, lse (B, H, L) or None)`."""
    from torch.nn.attention.flex_attention import AuxRequest  # noqa: PLC0415

    # Past the limit dynamo would run FlexAttention unfused (L x L scores): an error instead.
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        result = _compiled()(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=scale,
            kernel_options={"BACKEND": kernels}, return_aux=AuxRequest(lse=True) if lse else None,
        )  # fmt: skip
    out, aux = result if lse else (result, None)
    return out.transpose(1, 2), (aux.lse if lse else None)


def _on_kernels(run, q, v, direction: str, forced: str | None):
    """`run(kernels)` on the kernels [`flex_kernel_choice`] names (or `forced`). The first FLASH build for some inputs
    is guarded: if the lowering refuses them, they take the Triton kernels from then on."""
    kernels, reason = (forced, None) if forced is not None else flex_kernel_choice(q, v, direction)
    if reason is not None:
        _warn_fallback(kernels, reason)
    key = _key(q, v, direction)
    if kernels != "FLASH" or forced is not None or key in _BUILT:
        return run(kernels)
    try:
        result = run(kernels)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001  (the experimental FLASH lowering refused these inputs: say so, go on)
        _FAILED[key] = f"its FLASH lowering failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
        return _on_kernels(run, q, v, direction, None)
    _BUILT.add(key)
    return result


def _check_available() -> None:
    reason = flex_unavailable()
    if reason is not None:
        raise RuntimeError(f"backend='flex' is not available: {reason}")


def make_flex_kernel(kernels: str | None = None) -> MoCKernel:
    r"""
    The `flex` backend as a [`MoCKernel`]. `kernels`: `None` chooses per call ([`flex_kernel_choice`]); `"FLASH"`,
    `"TRITON"` or `"TORCH"` forces FlashAttention-4, FlexAttention's Triton kernels or the torch operations.
    """

    def forward(q, k, v, routing, scale):
        _check_available()
        mask = flex_block_mask(routing, compute_q_blocks=False)
        # Detached: this forward is not differentiated (the backward is its own function).
        q, k, v = (x.detach() for x in (q, k, v))

        def run(kern):
            if kern == "TORCH":
                return blockwise_forward(q, k, v, mask, scale)
            return _flex(q, k, v, mask, scale, kern, lse=True)

        return _on_kernels(run, q, v, "forward", kernels)

    def backward(grad_out, q, k, v, out, lse, routing, scale):
        _check_available()

        def run(kern):
            mask = flex_block_mask(routing, compute_q_blocks=kern != "TORCH")
            if kern == "TORCH":
                return blockwise_backward(grad_out, q, k, v, out, lse, mask, scale)
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
                recomputed, _ = _flex(*leaves, mask, scale, kern, lse=False)
                return torch.autograd.grad(recomputed, leaves, grad_out)

        return _on_kernels(run, q, v, "backward", kernels)

    return sdpa_nan(MoCKernel("flex", forward, backward))


#: The `flex` backend, choosing its kernels per call.
FLEX = make_flex_kernel()
