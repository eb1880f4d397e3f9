"""One MoC processor for every model whose stock processor calls diffusers' `dispatch_attention_fn`.

Most diffusers transformers written since the attention-dispatch refactor compute their attention in one call,
`dispatch_attention_fn(query, key, value, ...)` with `(B, L, H, D)` tensors, after their own projections, norms and
RoPE. [`MoCDispatchAttnProcessor`] runs the model's stock processor unchanged, except that this one name resolves
to MoC's attention step: the stock `__call__` is rebuilt from its own code object with globals in which
`dispatch_attention_fn` is the processor's MoC step. No diffusers source or module is patched; the stock processor
of the layer keeps running everything but the attention.

What MoC needs beyond the call, the registry entry of the model says in a [`VideoStream`]: how the latent frame grid
follows from the transformer's input, where caption or condition tokens sit in the stream, and which earlier context
(history frames) precedes the video.
"""

from __future__ import annotations

import copy
import dis
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..parallel import sequence_shard, ulysses_config
from ..recording import active_routing_map
from .base import MoCAttnProcessorBase

__all__ = ["MoCDispatchAttnProcessor", "VideoStream", "dispatch_calls"]

_DISPATCH = "dispatch_attention_fn"


@dataclass(frozen=True)
class VideoStream:
    r"""
    How one model's self-attention stream maps onto MoC's chunk layout: what a registry entry declares.

    Args:
        grid (`Callable`): `(transformer, args, kwargs) -> (frames, height, width)`, the post-patchify latent grid of
            a forward call, from input shapes and the model config. Where no shape holds the grid (MiniMax-H3's packed
            rows) it may read an input on the host, once per forward; the model then compiles regionally only.
        text (`"none"`, `"before"` or `"after"`, defaults to `"none"`): where the stream's non-video tokens sit
            (caption, condition or register tokens of a packed joint stream). They form one text chunk, a mandatory
            anchor; their count is whatever the attention call has beyond the video.
        prefix (`Callable`, *optional*): `(transformer, args, kwargs) -> chunk sizes` of earlier context that precedes
            the video in the stream (Helios' compressed history): video chunks of the first shot, routed like frames.
    """

    grid: Callable[[torch.nn.Module, tuple, dict], tuple[int, int, int]]
    text: Literal["none", "before", "after"] = "none"
    prefix: Callable[[torch.nn.Module, tuple, dict], tuple[int, ...]] | None = None

    def __post_init__(self):
        if self.text not in ("none", "before", "after"):
            raise ValueError(f"VideoStream.text must be 'none', 'before' or 'after', got {self.text!r}")


def _own_call(processor_cls: type):
    """The `__call__` function that `processor_cls` defines or inherits (not a bound or builtin one)."""
    return next((vars(c)["__call__"] for c in processor_cls.__mro__ if "__call__" in vars(c)), None)


def dispatch_calls(processor_cls: type) -> int:
    """How many times the code of `processor_cls.__call__` names `dispatch_attention_fn` (0: it cannot be swapped)."""
    code = getattr(_own_call(processor_cls), "__code__", None)
    if code is None:
        return 0
    return sum(1 for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL" and ins.argval == _DISPATCH)


def _moc_dispatch(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    attention_kwargs=None,
    *,
    backend=None,
    parallel_config=None,
):
    """`dispatch_attention_fn` as the stock processors run by MoC see it: their `backend` is the MoC processor."""
    if not isinstance(backend, MoCDispatchAttnProcessor):
        raise TypeError(
            "a processor run by MoCDispatchAttnProcessor called dispatch_attention_fn without its `backend`; MoC needs "
            "a processor of its own for this model"
        )
    return backend.attend(query, key, value, attn_mask, dropout_p, is_causal, scale, attention_kwargs, parallel_config)


def _key_padding(attn_mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """A boolean mask that only hides keys (shaped `(B, 1, 1, L)`, as models with padded captions pass it) as MoC's
    `(B, L)` padding mask; `None` for no mask or any other mask."""
    if attn_mask is None or attn_mask.dtype != torch.bool or attn_mask.ndim != 4:
        return None
    batch, length = key.shape[0], key.shape[1]
    if tuple(attn_mask.shape) != (batch, 1, 1, length):
        return None
    return attn_mask.reshape(batch, length)


# Stock processor class -> its `__call__` with `dispatch_attention_fn` resolving to `_moc_dispatch`.
_REBOUND: dict[type, types.FunctionType] = {}


def _rebound_call(stock_cls: type) -> types.FunctionType:
    r"""
    `stock_cls.__call__` run with `dispatch_attention_fn` resolving to MoC's step. Its globals are a module of their
    own (a copy of the stock module's namespace with that one name changed, registered in `sys.modules` so that
    `torch.compile` finds it by name as it finds any module); the diffusers module itself is left untouched.
    """
    call = _REBOUND.get(stock_cls)
    if call is not None:
        return call
    if dispatch_calls(stock_cls) == 0:
        raise TypeError(
            f"{stock_cls.__name__} does not compute its attention with `dispatch_attention_fn`; MoC needs a processor "
            "of its own for this model"
        )
    function = _own_call(stock_cls)
    name = f"{__name__}.moc_{function.__module__.replace('.', '_')}"
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        module.__dict__.update(function.__globals__)
        module.__dict__.update(__name__=name, **{_DISPATCH: _moc_dispatch})
        sys.modules[name] = module
    call = types.FunctionType(
        function.__code__, module.__dict__, function.__name__, function.__defaults__, function.__closure__
    )
    call.__kwdefaults__ = function.__kwdefaults__
    call.__qualname__ = function.__qualname__
    _REBOUND[stock_cls] = call
    return call


# Stock processor class -> the MoC processor class that shows its call's parameters.
_SIGNED: dict[type, type] = {}


def _signed_class(stock_cls: type) -> type:
    r"""
    [`MoCDispatchAttnProcessor`] with the signature of `stock_cls.__call__` (same name and behaviour). Several
    diffusers attention modules pass on only the keyword arguments that `inspect.signature(processor.__call__)` names
    (LTX-2's STG `perturbation_mask`); a processor running `stock_cls` is of this class, so those arguments keep
    coming. A class, not an attribute of the instance: torch.compile calls processors through their class.
    """
    cls = _SIGNED.get(stock_cls)
    if cls is None:

        def __call__(self, attn, *args, **kwargs):
            return MoCDispatchAttnProcessor.__call__(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(_own_call(stock_cls))
        name = MoCDispatchAttnProcessor.__name__
        cls = type(name, (MoCDispatchAttnProcessor,), {"__call__": __call__, "__module__": __name__})
        _SIGNED[stock_cls] = cls
    return cls


def _new_processor() -> MoCDispatchAttnProcessor:
    return MoCDispatchAttnProcessor.__new__(MoCDispatchAttnProcessor)


class MoCDispatchAttnProcessor(MoCAttnProcessorBase):
    r"""
    The MoC processor of every model whose stock processor makes one `dispatch_attention_fn` call per
    self-attention: the stock processor runs as it is, with MoC in place of that call.

    Each layer call may make at most one `dispatch_attention_fn` call (a stock processor may have others on paths
    the layer does not take, such as Wan's image branch of cross-attention); otherwise it raises `TypeError`.

    [`apply_moc`] sets it on the layers its registry names, with the model's [`VideoStream`]; a copy of the processor
    it replaced is the one that runs (so a user's own subclass of the stock processor keeps its behaviour). Set with
    `set_attn_processor` alone it runs the model's default processor and, having no stream, refuses to guess the
    frame grid.

    The attention call must be plain self-attention: no dropout, not causal, as many key as query heads, and no mask
    but a boolean key padding mask shaped `(B, 1, 1, L)` (padded caption tokens: MoC's `padding_mask`, their outputs
    zero). Anything else raises `NotImplementedError` naming the argument, never a silently different attention.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
        stream (`VideoStream`, *optional*): how the model's stream maps onto MoC's layout.
    """

    def __init__(self, config=None, stream: VideoStream | None = None):
        super().__init__(config)
        self.stream = stream
        # The stock processor this one runs, and the layer it runs for (set at each call).
        self.stock = None
        self._layer: torch.nn.Module | None = None
        self._attended = False

    def input_grid(self, transformer, args, kwargs) -> tuple[int, int, int]:
        if self.stream is None:
            raise ValueError(
                f"{type(self).__name__} has no video stream description for {type(transformer).__name__}; install MoC "
                "with `apply_moc(transformer, config)`"
            )
        if getattr(transformer, "_cp_plan", None) is None and ulysses_config(self._parallel_config) is not None:
            # A plan of the user's own (diffusers has none for this model): where it splits the stream is unknown.
            self.refuse_context_parallel(type(transformer).__name__)
        return self.stream.grid(transformer, args, kwargs)

    def input_prefix(self, transformer, args, kwargs) -> tuple[int, ...]:
        if self.stream is None or self.stream.prefix is None:
            return ()
        return self.stream.prefix(transformer, args, kwargs)

    def use_stock(self, original) -> None:
        """Run a copy of `original` (the processor `apply_moc` replaced), its attention call leading back here."""
        self.stock = copy.copy(original)
        self.stock._attention_backend = self
        self.__class__ = _signed_class(type(self.stock))

    def __reduce_ex__(self, protocol):
        # The class `use_stock` gives is made at run time: pickled (and copied) as the public class, given again.
        return _new_processor, (), dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.stock is not None:
            self.__class__ = _signed_class(type(self.stock))

    def __call__(self, attn: torch.nn.Module, *args, **kwargs):
        if self.stock is None:  # set with `set_attn_processor` alone: the model's own processor
            self.use_stock(attn._default_processor_cls())
        self.stock._parallel_config = self._parallel_config
        # A call without attention is the stock processor's choice (LTX-2's perturbed blocks pass the values through).
        self._layer, self._attended = attn, False
        return _rebound_call(type(self.stock))(self.stock, attn, *args, **kwargs)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        attention_kwargs: dict | None,
        parallel_config,
    ) -> torch.Tensor:
        """The attention call of the running layer's stock processor (`dispatch_attention_fn`'s arguments), with
        MoC."""
        attn = self._layer
        if self._attended:
            # A second attention call in one layer call (an image branch, a causal text part): MoC cannot tell which
            # stream it is, so it does not guess.
            raise TypeError(
                f"{type(self.stock).__name__} makes more than one `dispatch_attention_fn` call on "
                f"{type(attn).__name__}; MoC needs a processor of its own for this model"
            )
        self._attended = True
        padding = _key_padding(attn_mask, key)
        refused = {
            "attn_mask": attn_mask is not None and padding is None,
            "dropout_p": dropout_p != 0.0,
            "is_causal": bool(is_causal),
            "attention_kwargs": bool(attention_kwargs),
            "grouped-query attention": key.shape[2] != query.shape[2],
        }
        for argument, present in refused.items():
            if present:
                raise NotImplementedError(
                    f"MoC runs plain self-attention, but {type(attn).__name__}'s processor passed {argument}; this "
                    "model needs a MoC processor of its own"
                )
        text_tokens, text_first = self._text_tokens(attn, query, parallel_config)
        if self._dense_here(attn, text_tokens):
            # MoC is dense attention here: diffusers' own call is the same function, faster, and bit-identical.
            return dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attn_mask,
                scale=scale,
                backend=self._attention_backend,
                parallel_config=parallel_config,
            )
        return self.moc_attend(
            attn,
            query,
            key,
            value,
            text_tokens=text_tokens,
            text_first=text_first,
            padding_mask=padding,
            scale=scale,
            parallel_config=parallel_config,
        )

    def _dense_here(self, attn: torch.nn.Module, text_tokens: int) -> bool:
        """Whether every query attends every key in this call: not causal, `top_k` covers every other chunk, no
        drop-off, and no routing map recording."""
        config, facts = self.config, self.forward_facts(attn)
        chunks = facts.layout.num_chunks + (1 if text_tokens else 0)
        dropping = facts.regularise and config.drop_off > 0
        return not config.causal and config.top_k >= chunks - 1 and not dropping and active_routing_map() is None

    def _text_tokens(self, attn: torch.nn.Module, query: torch.Tensor, parallel_config) -> tuple[int, bool]:
        """The stream's non-video tokens (the call's tokens beyond the facts' layout), and whether they lead."""
        placement = "none" if self.stream is None else self.stream.text
        if placement == "none":
            return 0, False
        _, world = sequence_shard(parallel_config)
        layout = self.forward_facts(attn).layout
        text = query.shape[1] * world - layout.num_tokens
        if text < 0:
            raise ValueError(
                f"the attention call has {query.shape[1] * world} tokens, fewer than the {layout.num_tokens} video "
                "tokens of this forward"
            )
        return text, placement == "before"
