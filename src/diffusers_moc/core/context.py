"""Per-call information that MoC reads but the transformer's forward does not carry: the shots, caption spans and
whether the training regularisers run.

A pipeline (or the user) sets it around the denoising loop; the hook that `apply_moc` installs reads it
once per transformer forward::

    with moc_context(shot_frames=[6, 5, 5]):   # latent frames per shot
        video = pipe(prompt, num_frames=61).frames

The context lives in a context variable (each thread and asyncio task sees its own). `torch.compile` cannot read
context variables, so a compiled transformer forward reads [`PROCESS_STATE`] instead (and recompiles when it changes):
do not run one compiled model under different contexts in several threads at once.
"""

from __future__ import annotations

import contextvars
import operator
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["MoCContext", "moc_context", "current_moc_context"]


@dataclass(frozen=True)
class MoCContext:
    r"""
    Args:
        shot_frames (`tuple[int]`, *optional*): latent frames of each shot, in order (must sum to the latent frames of
            the transformer input). `None` means the whole video is one shot.
        caption_spans (`tuple[tuple[int, int]]`, *optional*): per-shot caption anchors for cross-attention: the
            half-open token range `(start, end)` of each shot's caption in `encoder_hidden_states`, one per shot.
            Video tokens of shot `s` then attend only to `caption_spans[s]` (plus `global_caption_span`). Shots may
            share a span. `None` (default) keeps cross-attention stock: every token attends to every text token.
        global_caption_span (`tuple[int, int]`, *optional*): token range of the global caption, attended by every
            shot. Only used with `caption_spans`.
        regularise (`bool`, *optional*): whether context drop-off and drop-in run (`docs/semantics.md` section 3).
            `None` (default): only while the transformer is in training mode *and* gradients are enabled, so a model
            left in train mode but run under `torch.no_grad()` is deterministic. `True` / `False` force them on / off.
        image_tokens (`int`, *optional*): image-to-video models with image keys in cross-attention (Wan 2.1 I2V):
            how many image-embedding tokens lead `encoder_hidden_states`. The MoC processor then splits image and text
            there (diffusers' own processor assumes 512 text tokens), every video token attends all image tokens, and
            `caption_spans` count text tokens after them.
        caption_shots (`tuple[int]`, *optional*): per-shot captions of joint-attention models (text and video tokens
            in one self-attention stream, e.g. HunyuanVideo 1.5), the joint-stream counterpart of `caption_spans`:
            the shot of each caption segment, in the order the segments are concatenated in the transformer's text
            inputs; `-1` (`GLOBAL_SHOT`) marks the global caption. Each segment becomes a text chunk of its shot, so
            with `MoCConfig(text_anchors="shot")` a video token anchors its own shot's caption plus the global one. A
            shot appears at most once (a shot without a segment anchors the global caption only).
        caption_tokens (`tuple[tuple[int]]`, *optional*): with `caption_shots`, one tuple per text input of the
            transformer, in the order of its forward arguments (HunyuanVideo 1.5: `encoder_hidden_states`, the
            Qwen caption, then `encoder_hidden_states_2`, the ByT5 glyph text), each holding the token count of every
            segment in that input (`0`: the segment has no tokens there). Each input holds its segments' tokens
            concatenated in `caption_shots` order, every one of them a real token, then only padding.
    """

    shot_frames: tuple[int, ...] | None = None
    caption_spans: tuple[tuple[int, int], ...] | None = None
    global_caption_span: tuple[int, int] | None = None
    regularise: bool | None = None
    image_tokens: int | None = None
    caption_shots: tuple[int, ...] | None = None
    caption_tokens: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if self.shot_frames is not None:
            frames = _integers(self.shot_frames)
            if not frames or any(n <= 0 for n in frames):
                raise ValueError(f"shot_frames must be positive latent-frame counts, got {self.shot_frames!r}")
            object.__setattr__(self, "shot_frames", frames)
        if self.caption_spans is not None:
            if self.shot_frames is None:
                raise ValueError("caption_spans needs shot_frames: each span belongs to one shot")
            if isinstance(self.caption_spans, (str, bytes)) or not isinstance(self.caption_spans, Iterable):
                raise ValueError(f"caption_spans must be one (start, end) pair per shot, got {self.caption_spans!r}")
            spans = tuple(_span(f"caption_spans[{i}]", s) for i, s in enumerate(self.caption_spans))
            if len(spans) != len(self.shot_frames):
                raise ValueError(
                    f"caption_spans has {len(spans)} spans but there are {len(self.shot_frames)} shots; give one "
                    "span per shot"
                )
            object.__setattr__(self, "caption_spans", spans)
        if self.global_caption_span is not None:
            if self.caption_spans is None:
                raise ValueError("global_caption_span is only used together with caption_spans")
            object.__setattr__(self, "global_caption_span", _span("global_caption_span", self.global_caption_span))
        if self.regularise is not None and not isinstance(self.regularise, bool):
            raise ValueError(f"regularise must be True, False or None, got {self.regularise!r}")
        if self.image_tokens is not None and (
            isinstance(self.image_tokens, bool) or not isinstance(self.image_tokens, int) or self.image_tokens < 1
        ):
            raise ValueError(f"image_tokens must be a positive integer or None, got {self.image_tokens!r}")
        self._check_caption_segments()

    def _check_caption_segments(self) -> None:
        if self.caption_shots is None:
            if self.caption_tokens is not None:
                raise ValueError("caption_tokens is only used together with caption_shots")
            return
        if self.caption_spans is not None:
            raise ValueError(
                "caption_spans (captions in cross-attention) and caption_shots (captions in a joint stream) describe "
                "different models; give one of them"
            )
        shots = _integers(self.caption_shots)
        num_shots = 1 if self.shot_frames is None else len(self.shot_frames)
        if not shots or any(s < -1 or s >= num_shots for s in shots):
            raise ValueError(
                f"caption_shots must be shot ids in [-1, {num_shots}) (-1: the global caption), got "
                f"{self.caption_shots!r}"
            )
        if len(set(shots)) != len(shots):
            raise ValueError(f"caption_shots names a shot twice: {list(shots)}; give each shot one caption segment")
        object.__setattr__(self, "caption_shots", shots)
        if self.caption_tokens is None:
            raise ValueError("caption_shots needs caption_tokens: the token count of each segment in each text input")
        inputs = None if isinstance(self.caption_tokens, (str, bytes)) else _integer_rows(self.caption_tokens)
        if not inputs or any(len(row) != len(shots) or any(n < 0 for n in row) for row in inputs):
            raise ValueError(
                f"caption_tokens must hold, per text input, {len(shots)} non-negative token counts (one per caption "
                f"segment), got {self.caption_tokens!r}"
            )
        empty = [i for i in range(len(shots)) if not any(row[i] for row in inputs)]
        if empty:
            raise ValueError(f"caption segment {empty[0]} has no tokens in any text input")
        object.__setattr__(self, "caption_tokens", inputs)

    def caption_spans_of(self, text_input: int) -> tuple[tuple[int, int, int], ...]:
        """`(start, end, shot)` of each caption segment with tokens in text input `text_input` (with
        `caption_shots`), in order: the spans a joint model refines its captions over, one at a time."""
        if self.caption_shots is None:
            return ()
        spans, start = [], 0
        for shot, n in zip(self.caption_shots, self.caption_tokens[text_input]):
            if n:
                spans.append((start, start + n, shot))
            start += n
        return tuple(spans)


def _integers(values) -> tuple[int, ...] | None:
    """`values` as a tuple of ints (Python or NumPy integers), or `None` for anything else: a float such as 2.5 or a
    string is refused, not truncated."""
    if isinstance(values, (str, bytes)):
        return None
    try:
        items = list(values)
        if any(isinstance(v, bool) for v in items):
            return None
        return tuple(operator.index(v) for v in items)
    except TypeError:
        return None


def _integer_rows(rows) -> tuple[tuple[int, ...], ...] | None:
    try:
        out = tuple(_integers(row) for row in rows)
    except TypeError:
        return None
    return None if any(row is None for row in out) else out


def _span(name: str, span: Sequence[int]) -> tuple[int, int]:
    pair = _integers(span)
    if pair is None or len(pair) != 2:
        raise ValueError(f"{name} must be a (start, end) pair of token indices, got {span!r}")
    start, end = pair
    if not 0 <= start < end:
        raise ValueError(f"{name} must satisfy 0 <= start < end, got {span!r}")
    return start, end


_DEFAULT = MoCContext()
_CURRENT: contextvars.ContextVar[MoCContext | None] = contextvars.ContextVar("diffusers_moc_context", default=None)


class _ProcessState:
    r"""
    Everything MoC reads from the process rather than from a forward's arguments, in one object: the only state a
    `torch.compile`d forward reads outside the model. Dynamo reads its attributes as constants of the traced graph and
    guards on them, so a change retraces (or, for a recorder, makes the compiled model refuse to record):

    - `context`: the innermost [`moc_context`] entered in this process (the context variable that eager code reads
      cannot be read by dynamo);
    - `recorder`: the [`RoutingMap`] being recorded by [`moc_routing_map`], or `None` while none records (one at a
      time per process).

    Both are set on entering their `with` block and restored on leaving it.
    """

    context: MoCContext = _DEFAULT
    recorder: object | None = None  # a `RoutingMap` (this module sits below the one that defines it)


#: The one process-wide instance (see [`_ProcessState`]).
PROCESS_STATE = _ProcessState()


def current_moc_context() -> MoCContext:
    """The context MoC sees now (default: one shot, regularisers in training only)."""
    if _is_dynamo_compiling():
        return PROCESS_STATE.context
    return _CURRENT.get() or _DEFAULT


def _is_dynamo_compiling() -> bool:
    import torch  # noqa: PLC0415  (this module stays importable without loading torch)

    return torch.compiler.is_dynamo_compiling()


@contextmanager
def moc_context(
    shot_frames: Sequence[int] | None = None,
    caption_spans: Sequence[tuple[int, int]] | None = None,
    global_caption_span: tuple[int, int] | None = None,
    regularise: bool | None = None,
    image_tokens: int | None = None,
    caption_shots: Sequence[int] | None = None,
    caption_tokens: Sequence[Sequence[int]] | None = None,
) -> Iterator[MoCContext]:
    r"""
    Set the shots (and caption spans, regularisers) MoC sees inside the `with` block.

    Args:
        shot_frames (`Sequence[int]`, *optional*): latent frames of each shot, in order.
        caption_spans (`Sequence[tuple[int, int]]`, *optional*): token range of each shot's caption in the
            cross-attention `encoder_hidden_states` (per-shot caption anchors); see [`MoCContext`].
        global_caption_span (`tuple[int, int]`, *optional*): token range of the global caption.
        regularise (`bool`, *optional*): force context drop-off / drop-in on (`True`) or off (`False`); `None`
            (default) runs them only while the transformer is training with gradients enabled.
        image_tokens (`int`, *optional*): image-embedding tokens leading the cross-attention context (Wan 2.1 I2V).
        caption_shots (`Sequence[int]`, *optional*), caption_tokens (`Sequence[Sequence[int]]`, *optional*): per-shot
            captions in the stream of a joint-attention model (HunyuanVideo 1.5); see [`MoCContext`].
    """
    ctx = MoCContext(
        shot_frames=shot_frames,  # converted and checked by MoCContext
        caption_spans=caption_spans,
        global_caption_span=global_caption_span,
        regularise=regularise,
        image_tokens=image_tokens,
        caption_shots=caption_shots,
        caption_tokens=caption_tokens,
    )
    token = _CURRENT.set(ctx)
    outer = PROCESS_STATE.context
    PROCESS_STATE.context = ctx
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
        PROCESS_STATE.context = outer
