"""`moc_attention`: the one entry point to MoC attention; routes, then dispatches to a backend."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import BACKENDS, MoCConfig
from .kernels import REFERENCE, TORCH, MoCKernel, kernel_attention
from .layout import ChunkLayout
from .routing import MoCRouting, route

__all__ = ["moc_attention", "available_backends", "resolve_backend", "load_kernel"]


def _load_triton() -> MoCKernel:
    try:
        from .kernels.triton_moc import TRITON  # noqa: PLC0415  (optional extra, imported lazily)
    except ImportError as e:
        raise RuntimeError(f"backend='triton' is not available: {e}") from e
    return TRITON


# Backend name -> loader of its kernel (optional extras are imported on first use).
_LOADERS: dict[str, Callable[[], MoCKernel]] = {
    "reference": lambda: REFERENCE,
    "torch": lambda: TORCH,
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


# "auto" picks, in this order, the backends that have been verified on real hardware. The Triton kernels pass their
# tests in the Triton interpreter but have not yet run on a GPU, so until they have, "auto" stays on "torch" and
# Triton is opt-in with backend="triton".
_AUTO_ORDER = ("torch",)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device`."""
    device = torch.device(device)
    names = ["triton"] if _triton_usable(device) else []
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
