"""Per-call information that MoC processors read but the transformer's forward does not carry: the shots.

A pipeline (or the user) sets it around the denoising loop; processors read it when they build their layout::

    with moc_context(shot_frames=[6, 5, 5]):   # latent frames per shot
        video = pipe(prompt, num_frames=61).frames
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
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
    """

    shot_frames: tuple[int, ...] | None = None
    caption_spans: tuple[tuple[int, int], ...] | None = None
    global_caption_span: tuple[int, int] | None = None

    def __post_init__(self):
        if self.shot_frames is not None:
            frames = tuple(int(n) for n in self.shot_frames)
            if not frames or any(n <= 0 for n in frames):
                raise ValueError(f"shot_frames must be positive latent-frame counts, got {self.shot_frames!r}")
            object.__setattr__(self, "shot_frames", frames)
        if self.caption_spans is not None:
            if self.shot_frames is None:
                raise ValueError("caption_spans needs shot_frames: each span belongs to one shot")
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


def _span(name: str, span: Sequence[int]) -> tuple[int, int]:
    try:
        start, end = (int(v) for v in span)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (start, end) pair of token indices, got {span!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"{name} must satisfy 0 <= start < end, got {span!r}")
    return start, end


_DEFAULT = MoCContext()
_CURRENT: contextvars.ContextVar[MoCContext | None] = contextvars.ContextVar("diffusers_moc_context", default=None)


def current_moc_context() -> MoCContext:
    """The context MoC processors see now (default: one shot)."""
    return _CURRENT.get() or _DEFAULT


@contextmanager
def moc_context(
    shot_frames: Sequence[int] | None = None,
    caption_spans: Sequence[tuple[int, int]] | None = None,
    global_caption_span: tuple[int, int] | None = None,
) -> Iterator[MoCContext]:
    r"""
    Set the shots seen by MoC processors inside the `with` block.

    Args:
        shot_frames (`Sequence[int]`, *optional*): latent frames of each shot, in order.
        caption_spans (`Sequence[tuple[int, int]]`, *optional*): token range of each shot's caption in the
            cross-attention `encoder_hidden_states` (per-shot caption anchors); see [`MoCContext`].
        global_caption_span (`tuple[int, int]`, *optional*): token range of the global caption.
    """
    ctx = MoCContext(
        shot_frames=None if shot_frames is None else tuple(shot_frames),
        caption_spans=None if caption_spans is None else tuple(caption_spans),
        global_caption_span=global_caption_span,
    )
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
