"""The core every MoC attention processor shares: per-forward facts, the hook `apply_moc` installs, one MoC attention
step.

Per transformer forward, the [`MoCHook`] that [`apply_moc`] installs computes the facts MoC needs once, from the
input's shape and the model config, never from tensor values: the latent frame grid, the video [`ChunkLayout`], the
shots and caption spans of [`moc_context`] and whether the training regularisers run. The model's processors hold the
hook and read the facts from it. A model's processor is diffusers' own processor of that model
(same projections, norms, RoPE) with its dense attention call replaced by [`MoCAttnProcessorBase.moc_attend`], which
takes the layout of this forward, does the Ulysses exchange under context parallelism and calls `moc_attention`.

Adding a model: see `generic.py` first (one registry entry when the stock processor makes one
`dispatch_attention_fn` call); otherwise subclass [`MoCAttnProcessorBase`], copy the stock processor's `__call__` with
`moc_attend` where it calls `dispatch_attention_fn`, implement `input_grid` (post-patchify `(frames, height, width)` of
a forward call), and add a registry entry in `apply.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from diffusers.hooks import ModelHook

from ..attention import moc_attention
from ..config import MoCConfig
from ..context import MoCContext, current_moc_context
from ..layout import GLOBAL_SHOT, ChunkLayout
from ..model_hooks import find_hook, register_hook, remove_hook
from ..parallel import head_shard, heads_to_sequence, sequence_to_heads, ulysses_config
from ..recording import active_routing_map

__all__ = [
    "CheckpointWithFacts",
    "MoCAttnProcessorBase",
    "MoCForwardFacts",
    "MOC_HOOK",
    "MoCHook",
    "frames_from_rotary",
    "forward_facts",
    "grid_5d",
    "patch_sizes",
    "qkv_heads",
    "video_padding_mask",
]


# ---------------------------------------------------------------------------------------------- per-forward facts
@dataclass(frozen=True)
class MoCForwardFacts:
    r"""
    What MoC needs to know about one transformer forward, computed once before it runs.

    Attributes:
        grid (`tuple[int, int, int]`): latent `(frames, height, width)` after patchify.
        layout (`ChunkLayout`): the chunks of the video tokens (shots and `chunk_tokens` applied), after
            `prefix_tokens` tokens of earlier context when the model puts some before the video (Helios' history).
        context (`MoCContext`): the [`moc_context`] of this forward (shots, caption spans).
        regularise (`bool`): whether context drop-off and drop-in run in this forward.
    """

    grid: tuple[int, int, int]
    layout: ChunkLayout
    context: MoCContext
    regularise: bool
    prefix_tokens: int = 0

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    def stream_layout(self, text_tokens: int = 0, text_first: bool = False) -> ChunkLayout:
        """The layout of a joint stream: the video and, with `text_tokens > 0`, one global caption chunk."""
        return _with_caption(self.layout, text_tokens, text_first)


def _with_caption(video: ChunkLayout, text_tokens: int, text_first: bool) -> ChunkLayout:
    if text_tokens <= 0:
        return video
    if torch.compiler.is_compiling():
        return _build_with_caption(video, text_tokens, text_first)
    return _cached_with_caption(video, text_tokens, text_first)


def _build_with_caption(video: ChunkLayout, text_tokens: int, text_first: bool) -> ChunkLayout:
    text = ChunkLayout.for_captions([text_tokens], [GLOBAL_SHOT])
    return ChunkLayout.concat(text, video) if text_first else ChunkLayout.concat(video, text)


_cached_with_caption = lru_cache(maxsize=128)(_build_with_caption)


def _video_layout(
    frames: int,
    tokens_per_frame: int,
    shot_frames: tuple[int, ...] | None,
    chunk_tokens: int | None,
    prefix: tuple[int, ...] = (),
) -> ChunkLayout:
    if shot_frames is not None and sum(shot_frames) != frames:
        raise ValueError(
            f"the MoC context says the shots have {list(shot_frames)} latent frames (sum {sum(shot_frames)}), but the "
            f"transformer input has {frames} latent frames; set `moc_context(shot_frames=...)` to match"
        )
    video = ChunkLayout.for_video(frames, tokens_per_frame, shot_frames, chunk_tokens)
    if not prefix:
        return video
    # Earlier context of the same video (Helios' history) belongs to the first shot, before its frames.
    return ChunkLayout.concat(ChunkLayout.from_chunks(prefix), video)


_cached_video_layout = lru_cache(maxsize=128)(_video_layout)


def forward_facts(
    grid: tuple[int, int, int],
    context: MoCContext,
    chunk_tokens: int | None,
    training: bool,
    prefix: tuple[int, ...] = (),
) -> MoCForwardFacts:
    r"""
    The facts of one forward: `grid` is the post-patchify `(frames, height, width)`, `training` whether the module is
    in training mode, `prefix` the sizes of the chunks of earlier context that precede the video in the stream (none
    by default). Regularisers run when the context forces them, else in training with gradients enabled.
    """
    frames, height, width = (int(n) for n in grid)
    prefix = tuple(int(n) for n in prefix)
    build = _video_layout if torch.compiler.is_compiling() else _cached_video_layout
    layout = build(frames, height * width, context.shot_frames, chunk_tokens, prefix)
    regularise = context.regularise
    if regularise is None:
        regularise = bool(training) and torch.is_grad_enabled()
    return MoCForwardFacts((frames, height, width), layout, context, regularise, sum(prefix))


#: The name of MoC's hook in a transformer's diffusers `HookRegistry`.
MOC_HOOK = "moc"


class MoCHook(ModelHook):
    r"""
    What [`apply_moc`] installs on one transformer, and all it keeps there:

    - `processor`: the one MoC processor its attention layers share, and `layers`, their names (how routing maps
      name them) with `originals`, the processors `apply_moc` replaced (what [`remove_moc`] puts back);
    - a diffusers `ModelHook`, registered as `"moc"` in the transformer's `HookRegistry`, whose `pre_forward`
      computes the forward's [`MoCForwardFacts`] once, from the input shape (via the processor's `input_grid` and
      `input_prefix`), the current [`moc_context`] and the processor's `chunk_tokens`, into `facts`, which the
      processors read (`compute_facts`, which a model whose facts hold more overrides); `post_forward` moves them
      to `last_facts`, so that a layer run after the forward returned raises instead of reusing them;
    - under gradient checkpointing, the [`CheckpointWithFacts`] that gives a block recomputed in backward the facts
      of its own forward.

    The forward the registry installs is made copy-safe (`diffusers_moc.core.model_hooks`): a model with MoC
    pickles, and `copy.deepcopy` gives the copy its own hook, as long as no other diffusers hook sits on the
    transformer itself (diffusers' own hook forwards neither pickle nor copy).

    Args:
        processor (`MoCAttnProcessorBase`): the processor `apply_moc` sets on the layers.
        label (`str`, *optional*): the pipeline component the transformer is (`"transformer_2"`), when MoC was
            applied to a pipeline; routing maps prefix its layer names with it.
    """

    def __init__(self, processor: MoCAttnProcessorBase, label: str | None = None):
        super().__init__()
        self.processor = processor
        self.label = label
        self.facts: MoCForwardFacts | None = None
        self.last_facts: MoCForwardFacts | None = None
        self.layers: dict[torch.nn.Module, str] = {}
        self.originals: dict[torch.nn.Module, object] = {}

    def __repr__(self) -> str:
        return f"MoCHook({self.processor}, facts={self.facts})"

    def attach(self, transformer: torch.nn.Module) -> None:
        """Register this hook in `transformer`'s `HookRegistry`."""
        register_hook(transformer, self, MOC_HOOK)

    @staticmethod
    def attached_to(transformer: torch.nn.Module) -> MoCHook | None:
        """The hook [`attach`] registered on `transformer`, also when its processors were since replaced by hand or
        by the model's own methods (which the processors can no longer lead to)."""
        hook = find_hook(transformer, MOC_HOOK)
        return hook if isinstance(hook, MoCHook) else None

    def detach(self, transformer: torch.nn.Module) -> None:
        """Remove this hook from `transformer`, and the checkpointing wrapper if it is this hook's."""
        remove_hook(transformer, self, MOC_HOOK)
        CheckpointWithFacts.unwrap(transformer, self)

    def layer_name(self, attn: torch.nn.Module) -> str | None:
        """The name routing maps give the attention module `attn` (`"transformer_2/blocks.0.attn1"`)."""
        name = self.layers.get(attn)
        if name is None or self.label in (None, "transformer"):
            return name
        return f"{self.label}/{name}"

    def _in_use(self) -> bool:
        """False once MoC was replaced by hand (`set_attn_processor`) rather than removed: nothing reads the facts
        then, and this hook must not wrap checkpointing. Assumed under `torch.compile`, whose guards on the layers'
        processors retrace when they change (and which was seen to get this identity test wrong)."""
        if torch.compiler.is_compiling():
            return True
        return any(attn.processor is self.processor for attn in self.layers)

    def compute_facts(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> MoCForwardFacts | None:
        """The facts of the forward `module(*args, **kwargs)`; models whose facts hold more override this."""
        processor = self.processor
        grid = processor.input_grid(module, args, kwargs)
        prefix = processor.input_prefix(module, args, kwargs)
        return forward_facts(grid, current_moc_context(), processor.config.chunk_tokens, module.training, prefix)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        if not self._in_use():
            type(self.processor).check_replaced(module)
            return args, kwargs
        self.facts = self.compute_facts(module, args, kwargs)
        # Wrapped at a forward, since `enable_gradient_checkpointing` may come before or after `apply_moc`.
        CheckpointWithFacts.wrap(module, self)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        if self.facts is not None:
            self.facts, self.last_facts = None, self.facts
        return output


class CheckpointWithFacts:
    r"""
    Wraps a diffusers model's gradient checkpointing function so that a block recomputed during backward sees the
    facts of the forward it was first run in, not those of a later forward (two forwards with different
    [`moc_context`] shots, then one backward). Under `torch.compile` the facts are constants of the traced graph and
    the wrapper steps aside.

    diffusers calls every checkpointed block through the model's private `_gradient_checkpointing_func` (set by
    `enable_gradient_checkpointing`) and offers no other way in that sees both the original forward and its
    recomputation (`torch.utils.checkpoint`'s `context_fn` would, but diffusers does not pass one), so this class is
    the one place MoC writes that attribute: `wrap` at a forward, `unwrap` at [`remove_moc`].
    """

    _ATTRIBUTE = "_gradient_checkpointing_func"

    def __init__(self, inner, hook: MoCHook):
        self.inner = inner
        self.hook = hook

    @classmethod
    def wrap(cls, module: torch.nn.Module, hook: MoCHook) -> None:
        checkpoint = getattr(module, cls._ATTRIBUTE, None)
        if checkpoint is None or (isinstance(checkpoint, cls) and checkpoint.hook is hook):
            return
        if isinstance(checkpoint, cls):  # another hook's, left by a MoC whose processors were replaced by hand
            checkpoint = checkpoint.inner
        setattr(module, cls._ATTRIBUTE, cls(checkpoint, hook))

    @classmethod
    def unwrap(cls, module: torch.nn.Module, hook: MoCHook) -> None:
        checkpoint = getattr(module, cls._ATTRIBUTE, None)
        if isinstance(checkpoint, cls) and checkpoint.hook is hook:
            setattr(module, cls._ATTRIBUTE, checkpoint.inner)

    def __call__(self, function, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.inner(function, *args, **kwargs)
        return self.inner(_WithFacts(function, self.hook, self.hook.facts), *args, **kwargs)


class _WithFacts:
    def __init__(self, function, hook: MoCHook, facts: MoCForwardFacts | None):
        self.function, self.hook, self.facts = function, hook, facts

    def __call__(self, *args, **kwargs):
        before, self.hook.facts = self.hook.facts, self.facts
        try:
            return self.function(*args, **kwargs)
        finally:
            self.hook.facts = before


# ---------------------------------------------------------------------------------------------- RoPE fallback
def first_change(x: torch.Tensor) -> int:
    """Index of the first row of `x` (L, d) that differs from row 0, or L when none does. Reads to the host."""
    diff = (x != x[:1]).any(-1)
    return int(torch.argmax(diff.to(torch.uint8)).item()) if bool(diff.any()) else x.shape[0]


def frames_from_rotary(rotary_emb: tuple[torch.Tensor, torch.Tensor], time_column: int = 0) -> tuple[int, int]:
    r"""
    `(frames, tokens_per_frame)` of a video token stream in `(frame, row, column)` order, read off its 3D RoPE.

    Only the fallback of a processor set with `set_attn_processor` alone uses this (eager mode; it reads the table to
    the host); [`apply_moc`] computes the grid from the input shape instead.

    Args:
        rotary_emb (`tuple[torch.Tensor, torch.Tensor]`): rotary cosines and sines of the video tokens, each
            `(L, D)` (one row per token).
        time_column (`int`, defaults to 0): a column whose angle depends on the frame index only (HunyuanVideo and
            CogVideoX put the time axis first; LTX-Video interleaves the axes after `D % 6` padding columns). Cosine
            and sine are read together: a cosine alone cannot tell angles `a` and `-a` apart.

    Raises:
        `ValueError`: when the column is not constant within frames of equal size, i.e. the table is not a 3D RoPE
            of a `(frame, row, column)` grid.
    """
    cos, sin = rotary_emb
    if cos.ndim != 2 or sin.shape != cos.shape:
        raise ValueError(f"expected rotary cosines and sines shaped (L, D), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    col = torch.stack([cos[:, time_column], sin[:, time_column]], dim=-1)
    L = col.shape[0]
    per_frame = first_change(col)
    if L % per_frame:
        raise ValueError(
            f"could not read a frame grid from rotary embeddings of {L} tokens: the time axis first changes after "
            f"{per_frame} tokens, which does not divide {L}"
        )
    frames = col.view(L // per_frame, per_frame, 2)
    if not bool((frames == frames[:, :1]).all()):
        raise ValueError("rotary embeddings are not laid out as a (frame, row, column) grid with time first")
    return L // per_frame, per_frame


# ---------------------------------------------------------------------------------------------- processors
def qkv_heads(
    attn: torch.nn.Module,
    x: torch.Tensor,
    projections: tuple[str, str, str] = ("to_q", "to_k", "to_v"),
    norms: tuple[str, str] = ("norm_q", "norm_k"),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value of `x` through the named projections of `attn`, as `(B, L, H, D)`, with the per-head
    QK-norms the module has (as diffusers' HunyuanVideo, CogVideoX and Mochi processors apply them)."""
    q, k, v = (getattr(attn, name)(x).unflatten(2, (attn.heads, -1)) for name in projections)
    norm_q, norm_k = (getattr(attn, name, None) for name in norms)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


def patch_sizes(transformer: torch.nn.Module) -> tuple[int, int, int]:
    """`(time, height, width)` patch of a transformer: `config.patch_size` as a triple, or an int with the time patch
    in `config.patch_size_t` (1 when the model has none)."""
    config = transformer.config
    patch = config.patch_size
    if isinstance(patch, int):
        return getattr(config, "patch_size_t", 1) or 1, patch, patch
    return tuple(patch)


def grid_5d(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """Post-patchify `(frames, height, width)` of a forward call whose `hidden_states` is `(B, C, F, H, W)`."""
    _, _, frames, height, width = MoCAttnProcessorBase._call_arg(args, kwargs, "hidden_states").shape
    p_t, p_h, p_w = patch_sizes(transformer)
    return frames // p_t, height // p_h, width // p_w


def video_padding_mask(text_mask: torch.Tensor, video_len: int) -> torch.Tensor:
    """`(B, T)` caption mask (nonzero: a real token) -> `(B, video_len + T)` bool padding mask of `[video, caption]`."""
    video = torch.ones(text_mask.shape[0], video_len, dtype=torch.bool, device=text_mask.device)
    return torch.cat([video, text_mask.bool()], dim=1)


# `moc_attend`'s default: the processor's own context-parallel config.
_OWN = object()


class MoCAttnProcessorBase:
    r"""
    Base of every MoC attention processor: the per-forward facts, and [`~MoCAttnProcessorBase.moc_attend`], the one
    MoC attention step a model's processor calls where its stock processor calls `dispatch_attention_fn`.

    Subclasses implement `__call__` with the signature of the model's stock processor and the static method
    `input_grid(transformer, args, kwargs) -> (frames, height, width)`; optionally `grid_from_rotary`, the eager
    fallback for processors set with `set_attn_processor` alone.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    # Set by diffusers (`set_attention_backend`, `enable_parallelism`) as on its own processors.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, config: MoCConfig | None = None):
        config = MoCConfig() if config is None else config
        if not isinstance(config, MoCConfig):
            raise TypeError(f"config must be a MoCConfig, got {type(config).__name__}")
        self.config = config
        # Bound by `apply_moc`; `None` for a processor set with `set_attn_processor` alone.
        self.hook: MoCHook | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @staticmethod
    def check_replaced(transformer: torch.nn.Module) -> None:
        """Called instead of [`input_grid`] at each forward once MoC's processors were replaced without
        [`remove_moc`]: a model whose own methods swap processors (CogVideoX's QKV fusion) raises here rather than run
        dense attention unnoticed. Nothing by default."""

    @staticmethod
    def input_grid(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """Post-patchify `(frames, height, width)` of a forward call of the transformer (from shapes and config)."""
        raise NotImplementedError

    @staticmethod
    def input_prefix(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, ...]:
        """Sizes of the chunks of earlier context that precede the video tokens in the stream (none by default)."""
        return ()

    def grid_from_rotary(self, rotary_emb) -> tuple[int, int] | None:
        """`(frames, tokens_per_frame)` read off a rotary table (eager fallback); `None` when the table cannot tell."""
        return None

    @staticmethod
    def _call_arg(args: tuple, kwargs: dict, name: str, index: int = 0):
        return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)

    def refuse_context_parallel(self, model: str) -> None:
        """Raise when diffusers' context parallelism is on: `model` has no context-parallel plan in diffusers."""
        if ulysses_config(self._parallel_config) is not None:
            raise NotImplementedError(
                f"{model} has no context-parallel plan in diffusers; MoC context parallelism runs on the models "
                "marked Ulysses in `diffusers_moc.supported_models_table()`"
            )

    def forward_facts(self, attn: torch.nn.Module, rotary_emb=None) -> MoCForwardFacts:
        r"""
        The facts of the running forward: from the [`MoCHook`] that [`apply_moc`] binds, or (processor set with
        `set_attn_processor` alone, eager only) read off the rotary table `rotary_emb`.
        """
        if self.hook is not None:
            facts = self.hook.facts
            if facts is None:
                raise RuntimeError(
                    f"{type(self).__name__} has no facts for this forward: MoC's hook on the transformer did not run. "
                    "Call the transformer itself (not a block); if another library replaced the transformer's forward "
                    "after `apply_moc`, re-install MoC with `apply_moc(transformer, config)`"
                )
            return facts
        name = type(self).__name__
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"{name} was set with `set_attn_processor` alone, which reads the frame grid off the rotary "
                "embeddings on the host; torch.compile and torch.export need the grid from the input shape: install "
                "MoC with `apply_moc(transformer, config)`"
            )
        if ulysses_config(self._parallel_config) is not None:
            raise NotImplementedError(
                f"{name} was set with `set_attn_processor` alone; under context parallelism install MoC with "
                "`apply_moc(transformer, config)`, which computes the global frame grid from the input shape"
            )
        grid = None if rotary_emb is None else self.grid_from_rotary(rotary_emb)
        if grid is None:
            raise ValueError(
                f"{name} cannot find the video frame grid of this call (its rotary embeddings do not reveal it); "
                "install it with `apply_moc(transformer, config)`, whose hook computes the grid from the "
                "input shape"
            )
        frames, per_frame = grid
        return forward_facts((frames, 1, per_frame), current_moc_context(), self.config.chunk_tokens, attn.training)

    def moc_attend(
        self,
        attn: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        rotary_emb=None,
        text_tokens: int = 0,
        text_first: bool = False,
        padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
        parallel_config=_OWN,
        layout: ChunkLayout | None = None,
        text_rows: tuple[str | None, ...] | None = None,
    ) -> torch.Tensor:
        r"""
        The MoC attention step: `(B, L, H, D)` query, key and value of a `[video]`, `[video, caption]` or
        `[caption, video]` stream -> `(B, L, H, Dv)`.

        Takes this forward's layout (one global caption chunk of `text_tokens` tokens, a mandatory anchor), exchanges
        sequence shards for head shards under Ulysses context parallelism and calls `moc_attention`, with drop-off
        and drop-in when this forward regularises.

        Args:
            rotary_emb: the rotary table of the call, only read by the `set_attn_processor` fallback.
            padding_mask (`torch.BoolTensor` of shape `(B, L)`, *optional*): False marks padded caption tokens.
            scale (`float`, *optional*): the softmax scale (default `1 / sqrt(D)`).
            parallel_config (*optional*): the context-parallel config of this call (default: the processor's).
            layout (`ChunkLayout`, *optional*): the stream's layout when the processor builds it (per-shot caption
                chunks of a joint stream, `diffusers_moc.core.joint_stream`); replaces the one built from
                `text_tokens`.
            text_rows (`tuple[str | None, ...]`, *optional*): with `layout`, while a routing map records: per chunk,
                the label of a text chunk the map shows as its own row and column (`None`: a video chunk, or
                padding left out). A custom layout records only with it.
        """
        facts = self.forward_facts(attn, rotary_emb)
        if layout is None and facts.context.caption_shots is not None:
            raise ValueError(
                f"the MoC context has per-shot caption segments (caption_shots), which {type(self).__name__} does not "
                "place in its stream; per-shot captions are supported on HunyuanVideo 1.5 (joint attention) and, as "
                "caption_spans, on Wan (cross-attention)"
            )
        cp = ulysses_config(self._parallel_config if parallel_config is _OWN else parallel_config)
        if cp is not None:
            if padding_mask is not None:
                raise NotImplementedError("MoC context parallelism does not support padded caption tokens")
            # Each rank holds L/P tokens of all heads; route over all tokens (text chunk included, `text_tokens`
            # counts the whole sequence's) for H/P heads, then exchange back.
            query, key, value = (sequence_to_heads(x, cp) for x in (query, key, value))
        custom = layout is not None
        layout = facts.stream_layout(text_tokens, text_first) if layout is None else layout
        if layout.num_tokens != query.shape[1]:
            f, h, w = facts.grid
            prefix = f"{facts.prefix_tokens} context + " if facts.prefix_tokens else ""
            raise ValueError(
                f"the MoC layout covers {layout.num_tokens} tokens ({prefix}{f}x{h}x{w} video + {text_tokens} text) "
                f"but the attention call has {query.shape[1]} tokens"
            )
        recorder = active_routing_map()  # the only cost of routing maps while none records
        # Drop-off / drop-in draw for every head of the model and keep this rank's: the same draws as one device.
        shard = head_shard(cp, query.shape[2]) if cp is not None and facts.regularise else None
        if recorder is None:
            out = moc_attention(
                query,
                key,
                value,
                layout,
                self.config,
                scale=scale,
                training=facts.regularise,
                padding_mask=padding_mask,
                head_shard=shard,
            )
        elif custom and text_rows is None:
            raise NotImplementedError(
                f"{type(self).__name__} builds its own stream layout and does not label its text chunks for a "
                "routing map (moc_routing_map); record without it"
            )
        else:
            video_start = (text_tokens if text_first else 0) + facts.prefix_tokens
            out = self._attend_recording(
                recorder, attn, query, key, value, layout, facts, video_start, text_rows,
                padding_mask=padding_mask, scale=scale, head_shard=shard,
            )  # fmt: skip
        return heads_to_sequence(out, cp) if cp is not None else out

    def _attend_recording(self, recorder, attn, query, key, value, layout, facts, video_start, text_rows, **kw):
        out, routing = moc_attention(
            query, key, value, layout, self.config, training=facts.regularise, return_routing=True, **kw
        )
        self.record_routing(recorder, attn, facts, routing, video_start, text_rows)
        return out

    def record_routing(self, recorder, attn, facts, routing, video_start: int = 0, text_rows=None) -> None:
        """Add one layer call's `routing` (its video from token `video_start` on) to the routing map `recorder`."""
        _refuse_recording_compiled()
        frames, height, width = facts.grid
        layer = None if self.hook is None else self.hook.layer_name(attn)
        recorder.record(layer, routing, video_start, frames, height * width, owner=self.hook, text_rows=text_rows)


def _refuse_recording_compiled() -> None:
    # Under torch.compile this raises while tracing, before anything runs.
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "a routing map (moc_routing_map) cannot record a torch.compile'd model: counting what each frame "
            "attends reads the routing back to the host. Record with the uncompiled model (e.g. a second copy, "
            "or before compiling); the compiled model runs as before once the routing map is closed"
        )
