"""`moc_attention`: the one entry point to MoC attention; routes, then dispatches to a backend."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import BACKENDS, MoCConfig
from .kernels import FLASH, FLASH_ATTN, REFERENCE, TORCH, MoCKernel, kernel_attention
from .kernels.executors import torch_flash_unavailable
from .kernels.flash_attn_executors import flash_attn_unavailable, flash_attn_version
from .layout import ChunkLayout
from .routing import MoCRouting, route

__all__ = ["moc_attention", "available_backends", "resolve_backend", "load_kernel"]


def _load_triton() -> MoCKernel:
    try:
        from .kernels.triton_moc import TRITON  # noqa: PLC0415  (optional extra, imported lazily)
    except ImportError as e:
        raise RuntimeError(f"backend='triton' is not available: {e}") from e
    return TRITON


def _load_flash_attn() -> MoCKernel:
    if flash_attn_version() is None:  # not installed (or too old): name why
        raise RuntimeError(f"backend='flash_attn' is not available: {flash_attn_unavailable('cpu')}")
    return FLASH_ATTN


# Backend name -> loader of its kernel (optional extras are imported on first use).
_LOADERS: dict[str, Callable[[], MoCKernel]] = {
    "reference": lambda: REFERENCE,
    "torch": lambda: TORCH,
    "flash": lambda: FLASH,
    "flash_attn": _load_flash_attn,
    "triton": _load_triton,
}


def load_kernel(name: str) -> MoCKernel:
    """The [`~kernels.MoCKernel`] of a concrete backend name (not `"auto"`; see [`resolve_backend`])."""
    return _LOADERS[name]()


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        _load_triton()
    except RuntimeError:
        return False
    return True


def _flash_usable(device: torch.device) -> bool:
    """PyTorch's flash var-len kernels run on `device` (for float16 / bfloat16 inputs)."""
    return device.type == "cuda" and torch_flash_unavailable(device) is None


def _flash_attn_usable(device: torch.device) -> bool:
    return device.type == "cuda" and flash_attn_unavailable(device) is None


# "auto" picks, in this order, the backends that have been verified on real hardware. On CUDA that is PyTorch's
# flash var-len kernels (`flash`: the paper's scheme on kernels millions of users run), then the portable `torch`
# backend. The Triton kernels pass their tests in the Triton interpreter but have not run on a GPU, so until
# `benchmarks/gpu_check.py` has measured them, Triton is opt-in with backend="triton".
_AUTO_ORDER = ("flash", "torch")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device`, fastest first (`flash` and `flash_attn` for float16 / bfloat16)."""
    device = torch.device(device)
    names = [name for name, usable in (("flash", _flash_usable), ("flash_attn", _flash_attn_usable),
                                       ("triton", _triton_usable)) if usable(device)]  # fmt: skip
    return names + ["torch", "reference"]


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend `name` stands for on `device` (`"auto"`: the first verified backend that can run)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown MoC backend {name!r}; choose one of {list(BACKENDS)}")
    if name != "auto":
        return name
    usable = available_backends(device)
    return next(n for n in _AUTO_ORDER if n in usable)


def moc_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: ChunkLayout,
    config: MoCConfig | None = None,
    *,
    scale: float | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    routing: MoCRouting | None = None,
    return_routing: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, MoCRouting]:
    r"""
    Mixture-of-Contexts attention (`docs/semantics.md`): each query attends to its mandatory anchors plus the `top_k`
    chunks whose mean-pooled keys score highest.

    Args:
        query, key, value (`torch.Tensor` of shape `(B, L, H, D)`):
            As diffusers' `dispatch_attention_fn` takes them (after QK-norm and RoPE).
        layout (`ChunkLayout`): the chunks of the sequence; must cover exactly `L` tokens.
        config (`MoCConfig`, *optional*): routing settings and backend (defaults to `MoCConfig()`).
        scale (`float`, *optional*): softmax scale, `1 / sqrt(D)` by default.
        training (`bool`, defaults to `False`): apply context drop-off / drop-in.
        generator (`torch.Generator`, *optional*): random source for drop-off / drop-in.
        routing (`MoCRouting`, *optional*): a routing computed before (skips routing).
        return_routing (`bool`, defaults to `False`): also return the [`MoCRouting`].

    Returns:
        `torch.Tensor` of shape `(B, L, H, D)` in the dtype of `query` (and the routing if asked).
    """
    config = MoCConfig() if config is None else config
    if query.ndim != 4 or key.shape != query.shape or value.shape[:3] != query.shape[:3]:
        raise ValueError(
            "query, key and value must be shaped (B, L, H, D) with equal B, L, H; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if routing is None:
        routing = route(query, key, layout, config, training=training, generator=generator)
    elif routing.layout != layout:
        raise ValueError("the routing passed was computed for another layout")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    kernel = load_kernel(resolve_backend(config.backend, query.device))
    out, _ = kernel_attention(kernel, query, key, value, routing, scale)
    return (out, routing) if return_routing else out
