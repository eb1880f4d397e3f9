r"""The one registry of MoC attention backends, in the style of diffusers' attention-backend registry.

A backend is registered once, by decorating the function that loads its kernel (`kernels/backends.py` registers
the built-in ones)::

    @register_backend("triton", unavailable=triton_unavailable, auto_rank=(0, 0), auto_check=head_dim_at_most(256))
    def _triton() -> MoCKernel:
        from .triton_moc import TRITON  # optional packages are imported on first use
        return TRITON

Every list of names derives from the registry: `MoCConfig(backend=...)` validation, [`available_backends`] and the
`"auto"` choice ([`resolve_backend`]). `"auto"` on CUDA, for float16 and bfloat16, takes the first backend in
`auto_rank` order (one rank for sequences of up to `AUTO_SHORT_TOKENS` tokens, one for longer ones) that runs on the
device and passes its `auto_check`; elsewhere it takes `"torch"`. The ranks follow the measured times
(`kernels/backends.py` says which measurement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = [
    "AUTO_SHORT_TOKENS",
    "Backend",
    "available_backends",
    "backend_names",
    "load_kernel",
    "register_backend",
    "resolve_backend",
]

#: Sequence length up to which `"auto"` uses the backends' short-sequence rank.
AUTO_SHORT_TOKENS = 128_000


def _runs_anywhere(device) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    r"""
    One registered backend.

    Attributes:
        name (`str`): the name `MoCConfig.backend` takes.
        load (`Callable[[], MoCKernel]`): returns the backend's kernel (cached); raises `RuntimeError` naming why it
            cannot (a missing package, say).
        unavailable (`Callable[[torch.device], str | None]`): why the backend cannot run on a device, or `None`.
        auto_rank (`tuple[int, int]`, *optional*): its place in `"auto"`'s order on CUDA (short, long sequences;
            lower first); `None`: `"auto"` never takes it.
        auto_check (`Callable[[torch.device, torch.dtype, int], bool]`, *optional*): what else `"auto"` requires of
            the inputs (device, dtype, head size), beyond `unavailable`.
    """

    name: str
    load: Callable[[], Any]
    unavailable: Callable[[Any], str | None] = _runs_anywhere
    auto_rank: tuple[int, int] | None = None
    auto_check: Callable[[Any, Any, int], bool] | None = None


_REGISTRY: dict[str, Backend] = {}


def register_backend(
    name: str,
    *,
    unavailable: Callable[[Any], str | None] = _runs_anywhere,
    auto_rank: tuple[int, int] | None = None,
    auto_check: Callable[[Any, Any, int], bool] | None = None,
):
    """Decorator: register the decorated kernel loader as backend `name` (see the module docstring)."""

    def decorate(load: Callable[[], Any]) -> Callable[[], Any]:
        if name == "auto" or name in _REGISTRY:
            raise ValueError(f"a MoC backend named {name!r} is already registered")
        _REGISTRY[name] = Backend(name, cache(load), unavailable, auto_rank, auto_check)
        return load

    return decorate


def backend_names() -> tuple[str, ...]:
    """Every name `MoCConfig.backend` accepts: `"auto"`, then the registered backends in registration order."""
    return ("auto", *_REGISTRY)


def backend(name: str) -> Backend:
    """The registered [`Backend`] called `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown MoC backend {name!r}; choose one of {list(backend_names())}")
    return _REGISTRY[name]


def load_kernel(name: str):
    """The kernel ([`~kernels.MoCKernel`]) of a registered backend (not `"auto"`: see [`resolve_backend`])."""
    return backend(name).load()


def available_backends(device="cpu") -> list[str]:
    """Registered backends that can run on `device`, in registration order (`"auto"` is not one; see
    [`resolve_backend`] for what it takes)."""
    import torch  # noqa: PLC0415  (imported where used: `MoCConfig` reads this module's names)

    device = torch.device(device)
    return [b.name for b in _REGISTRY.values() if b.unavailable(device) is None]


def resolve_backend(name: str, device, dtype=None, tokens: int | None = None, head_dim: int | None = None) -> str:
    r"""
    The concrete backend `name` stands for: `name` itself, or for `"auto"` the first ranked backend that runs.

    Args:
        name (`str`): a backend name, or `"auto"`.
        device (`torch.device` or `str`): where the attention runs.
        dtype (`torch.dtype`, *optional*): the inputs' dtype (default bfloat16).
        tokens (`int`, *optional*): the sequence length (default: a long sequence).
        head_dim (`int`, *optional*): the head size (default 128).
    """
    import torch  # noqa: PLC0415

    if name != "auto":
        return backend(name).name
    device = torch.device(device)
    dtype = torch.bfloat16 if dtype is None else dtype
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "torch"
    slot = 0 if tokens is not None and tokens <= AUTO_SHORT_TOKENS else 1
    head_dim = 128 if head_dim is None else head_dim
    ranked = sorted((b for b in _REGISTRY.values() if b.auto_rank is not None), key=lambda b: b.auto_rank[slot])
    for b in ranked:
        if b.unavailable(device) is None and (b.auto_check is None or b.auto_check(device, dtype, head_dim)):
            return b.name
    return "torch"
