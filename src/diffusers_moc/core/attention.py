"""`moc_attention`: the one entry point to MoC attention; routes, then runs a backend as one `torch.library` op.

Routing ([`route`]) is traced by `torch.compile` like any torch code. The backend call is the custom op
`diffusers_moc::attention` (and `diffusers_moc::attention_backward` for its gradient), with a fake implementation
and registered autograd: inductor and `torch.export` see one opaque op whose arguments are tensors plus the layout and
settings as lists of ints and bools, a float and a string.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache, wraps

import torch

from .backends import AUTO_SHORT_TOKENS, load_kernel, resolve_backend
from .config import MoCConfig
from .layout import ChunkLayout
from .routing import MoCRouting, route

__all__ = ["moc_attention"]


# ---------------------------------------------------------------------------------------------- the attention op
@lru_cache(maxsize=256)
def _layout(sizes: tuple[int, ...], shots: tuple[int, ...], is_text: tuple[bool, ...]) -> ChunkLayout:
    # One layout object per distinct layout, so its per-device index tensors are built once, not per call.
    return ChunkLayout.from_chunks(sizes, shots, is_text)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_sample(padding_mask: torch.Tensor, layout: ChunkLayout, selected: torch.Tensor, anchors: torch.Tensor):
    """For each sample: its valid token indices and the routing restricted to them (padded tokens dropped; a chunk
    left without tokens is dropped and the chunk ids renumbered). Host reads: the mask, once per sample."""
    is_text = torch.tensor(layout.is_text, device=padding_mask.device)
    tok_chunk = layout.token_chunks(padding_mask.device)
    hidden_video = (~padding_mask & ~is_text[tok_chunk]).any(-1)
    if bool(hidden_video.any()):
        raise ValueError("padding_mask hides video tokens; only caption (text) tokens may be padding")
    for b in range(padding_mask.shape[0]):
        keep = padding_mask[b]
        idx = torch.nonzero(keep).flatten()
        counts = torch.zeros(layout.num_chunks, dtype=torch.long, device=keep.device)
        counts.index_add_(0, tok_chunk, keep.long())
        counts_list = counts.tolist()
        kept = [c for c, n in enumerate(counts_list) if n > 0]
        sub = _layout(
            tuple(counts_list[c] for c in kept),
            tuple(layout.shots[c] for c in kept),
            tuple(layout.is_text[c] for c in kept),
        )
        renumber = torch.full((layout.num_chunks + 1,), -1, dtype=torch.long, device=keep.device)
        kept_t = torch.tensor(kept, dtype=torch.long, device=keep.device)
        renumber[kept_t] = torch.arange(len(kept), device=keep.device)
        sel = selected[b : b + 1].index_select(2, idx)
        sel = renumber[sel]  # -1 (an empty slot) indexes the extra entry, which stays -1
        yield b, idx, MoCRouting(sub, sel, anchors[kept_t][:, kept_t])


def _forward_impl(q, k, v, selected, anchors, padding_mask, sizes, shots, is_text, scale, backend):
    r"""
    The op's forward. Every host read MoC makes happens in this op (a backend's kernel launch needs them), per call:

    - `backend="torch"`, `"flash"`, `"flash_attn"` (the var-len scheme, `kernels/varlen.py`): the plan's `(C, C)`
      anchor matrix and its routed counts per (key chunk, batch x head), a fixed number of reads per call whatever
      the number of chunks, plus the NaN check; the portable executor also reads `cu_seqlens` (on CUDA, one copy per
      call);
    - `backend="triton"`: its tile plan's compacted chunk lists (`nonzero`, in the forward and the backward), plus
      the NaN check;
    - `backend="flex"`: the NaN check only on CUDA (the block mask is built on the device); off CUDA, the block
      lists per query block;
    - `backend="reference"`: the NaN check only (one `bool`);
    - every backend: the NaN check is one float32 sum per input and one `bool` (`kernels/nan_guard.py`);
    - with a `padding_mask`: whether it pads at all (one `bool`); if it does, whether it hides video tokens (one
      `bool`) and per sample its valid tokens (`nonzero`) and chunk sizes (`tolist`), each sample then running as its
      own kernel call.

    `benchmarks/bench_routing.py` counts them.
    """
    layout = _layout(tuple(sizes), tuple(shots), tuple(is_text))
    kernel = load_kernel(backend)
    if padding_mask is None or bool(padding_mask.all()):
        out, lse = kernel.forward(q, k, v, MoCRouting(layout, selected, anchors), scale)
        return out.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()
    B, L, H, _ = q.shape
    out = q.new_zeros(B, L, H, v.shape[-1])
    lse = torch.full((B, H, L), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    for b, idx, routing in _per_sample(padding_mask, layout, selected, anchors):
        o, s = kernel.forward(*(x[b : b + 1].index_select(1, idx) for x in (q, k, v)), routing, scale)
        out[b].index_copy_(0, idx, o[0].to(out.dtype))
        lse[b].index_copy_(1, idx, s[0].to(lse.dtype))
    return out, lse


def _autograd_dispatch():
    """Inside a custom op the autograd dispatch keys are excluded; a backend whose backward differentiates its forward
    again (`flex`: FlexAttention's backward exists only as autograd) needs them back."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.AutogradCUDA):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _backward_impl(grad_out, q, k, v, out, lse, selected, anchors, padding_mask, sizes, shots, is_text, scale, backend):
    """The op's backward; host reads as in the forward ([`_forward_impl`])."""
    with _autograd_dispatch():
        return _backward_body(
            grad_out, q, k, v, out, lse, selected, anchors, padding_mask, sizes, shots, is_text, scale, backend
        )


def _backward_body(grad_out, q, k, v, out, lse, selected, anchors, padding_mask, sizes, shots, is_text, scale, backend):
    layout = _layout(tuple(sizes), tuple(shots), tuple(is_text))
    kernel = load_kernel(backend)
    if padding_mask is None or bool(padding_mask.all()):
        grads = kernel.backward(grad_out, q, k, v, out, lse, MoCRouting(layout, selected, anchors), scale)
        return tuple(g.contiguous() for g in grads)
    dq, dk, dv = (x.new_zeros(x.shape) for x in (q, k, v))  # contiguous, as the fake implementation says
    for b, idx, routing in _per_sample(padding_mask, layout, selected, anchors):
        rows = [x[b : b + 1].index_select(1, idx) for x in (grad_out, q, k, v, out)]
        g = kernel.backward(*rows, lse[b : b + 1].index_select(2, idx), routing, scale)
        for full, part in zip((dq, dk, dv), g):
            full[b].index_copy_(0, idx, part[0].to(full.dtype))
    return dq, dk, dv


@torch.library.custom_op("diffusers_moc::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    anchors: torch.Tensor,
    padding_mask: torch.Tensor | None,
    sizes: list[int],
    shots: list[int],
    is_text: list[bool],
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, selected, anchors, padding_mask, sizes, shots, is_text, scale, backend)


@_attention_op.register_fake
def _(q, k, v, selected, anchors, padding_mask, sizes, shots, is_text, scale, backend):
    B, L, H, _ = q.shape
    return q.new_empty(B, L, H, v.shape[-1]), q.new_empty(B, H, L, dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("diffusers_moc::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    selected: torch.Tensor,
    anchors: torch.Tensor,
    padding_mask: torch.Tensor | None,
    sizes: list[int],
    shots: list[int],
    is_text: list[bool],
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(
        grad_out, q, k, v, out, lse, selected, anchors, padding_mask, sizes, shots, is_text, scale, backend
    )


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, selected, anchors, padding_mask, sizes, shots, is_text, scale, backend):
    # Contiguous, whatever the inputs' strides: the real implementation returns contiguous gradients, and inductor
    # lays out its buffers by what the fake implementation returns.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, selected, anchors, padding_mask, sizes, shots, is_text, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, selected, anchors, padding_mask)
    ctx.static = (sizes, shots, is_text, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, selected, anchors, padding_mask = ctx.saved_tensors
    # grad_out as it comes (e.g. an expanded tensor of ones after `.sum()`): the kernels take any strides, and a
    # contiguous copy would cost a whole output's memory at the backward's peak.
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, selected, anchors, padding_mask, *ctx.static)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- entry point
def _check_inputs(query, key, value, layout, scale, padding_mask) -> None:
    if isinstance(layout, (list, tuple)):
        raise TypeError(
            f"moc_attention takes one ChunkLayout for the whole batch, got a {type(layout).__name__} of "
            f"{len(layout)}; for captions of different lengths per sample pass the longest layout and mark the "
            "padded tokens with `padding_mask`"
        )
    if not isinstance(layout, ChunkLayout):
        raise TypeError(f"layout must be a ChunkLayout, got {type(layout).__name__}")
    if not all(isinstance(x, torch.Tensor) for x in (query, key, value)):
        raise TypeError("query, key and value must be tensors")
    if query.ndim != 4 or key.shape != query.shape or value.ndim != 4 or value.shape[:3] != query.shape[:3]:
        raise ValueError(
            "query, key and value must be shaped (B, L, H, D) with equal B, L, H; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"query, key and value must have one dtype, got {query.dtype}, {key.dtype} and {value.dtype}; cast them "
            "to one dtype first"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value live on different devices: {query.device}, {key.device}, {value.device}"
        )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        # A tensor scale would be read to the host and is not what SDPA takes either.
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if padding_mask is not None and (
        not isinstance(padding_mask, torch.Tensor)
        or padding_mask.dtype != torch.bool
        or tuple(padding_mask.shape) != tuple(query.shape[:2])
    ):
        raise ValueError(
            f"padding_mask must be a bool tensor shaped (B, L) = {tuple(query.shape[:2])} (True: a real token)"
        )


@torch.compiler.assume_constant_result
def _concrete_backend(name: str, device: torch.device, dtype: torch.dtype, short: bool, head_dim: int) -> str:
    """[`resolve_backend`] for one call. A constant of a traced graph: `torch.compile` runs it while tracing (its
    usability checks import packages and query the device) rather than trace through it."""
    return resolve_backend(name, device, dtype, AUTO_SHORT_TOKENS if short else AUTO_SHORT_TOKENS + 1, head_dim)


def _autocast_like_sdpa(fn: Callable) -> Callable:
    """Under `torch.autocast`, MoC attention is what SDPA is there, an op of autocast's lower-precision list: floating
    query, key and value (float64 aside) are cast to the autocast dtype, and it runs (routing and kernel) with autocast
    off, so its float32 routing scores and the kernels' accumulations stay as without autocast."""

    @wraps(fn)
    def wrapper(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        device_type = query.device.type if isinstance(query, torch.Tensor) else "cpu"
        if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
            return fn(query, key, value, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (
            x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64 else x
            for x in (query, key, value)
        )
        with torch.autocast(device_type, enabled=False):
            return fn(query, key, value, *args, **kwargs)

    return wrapper


@_autocast_like_sdpa
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
    padding_mask: torch.Tensor | None = None,
    head_shard: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, MoCRouting]:
    r"""
    Mixture-of-Contexts attention (`docs/semantics.md`): each query attends to its mandatory anchors plus the `top_k`
    chunks whose mean-pooled keys score highest.

    Traceable: `torch.compile(fullgraph=True)` and `torch.export` capture the routing as torch ops and the backend as
    the one op `diffusers_moc::attention`; nothing here reads a device tensor back to the host (the host reads a
    backend's launch needs happen inside the op, see `_forward_impl`).

    Args:
        query, key, value (`torch.Tensor` of shape `(B, L, H, D)`):
            As diffusers' `dispatch_attention_fn` takes them (after QK-norm and RoPE), all of one dtype; `value` may
            have another head size.
        layout (`ChunkLayout`): the chunks of the sequence, one layout for the whole batch; must cover exactly `L`
            tokens.
        config (`MoCConfig`, *optional*): routing settings and backend (defaults to `MoCConfig()`).
        scale (`float`, *optional*): softmax scale, `1 / sqrt(D)` by default; must be finite.
        training (`bool`, defaults to `False`): apply context drop-off / drop-in (explicit: a function has no
            training mode; MoC processors decide per forward, see [`moc_context`]).
        generator (`torch.Generator`, *optional*): random source for drop-off / drop-in.
        routing (`MoCRouting`, *optional*): a routing computed before (skips routing).
        return_routing (`bool`, defaults to `False`): also return the [`MoCRouting`].
        padding_mask (`torch.BoolTensor` of shape `(B, L)`, *optional*): False marks padded caption tokens (text
            chunks only), which differ per sample. They are dropped: neither keys nor part of a chunk mean, and
            their outputs are zero.
        head_shard (`tuple[int, int]`, *optional*): `(first, total)` when the heads given are heads
            `first : first + H` of `total` (Ulysses context parallelism): drop-off and drop-in draw as on one device
            (see [`route`]).

    Returns:
        `torch.Tensor` of shape `(B, L, H, Dv)` in the dtype of `query` (and the routing if asked).
    """
    config = MoCConfig() if config is None else config
    _check_inputs(query, key, value, layout, scale, padding_mask)
    if routing is None:
        routing = route(
            query,
            key,
            layout,
            config,
            training=training,
            generator=generator,
            padding_mask=padding_mask,
            head_shard=head_shard,
        )
    elif routing.layout != layout:
        raise ValueError("the routing passed was computed for another layout")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    # Resolved once per call: the op and its backward run the concrete backend.
    short = query.shape[1] <= AUTO_SHORT_TOKENS
    backend = _concrete_backend(config.backend, query.device, query.dtype, short, query.shape[-1])
    out, _ = _attention_op(
        query,
        key,
        value,
        routing.selected,
        routing.anchors,
        padding_mask,
        list(layout.sizes),
        list(layout.shots),
        list(layout.is_text),
        scale,
        backend,
    )
    return (out, routing) if return_routing else out
