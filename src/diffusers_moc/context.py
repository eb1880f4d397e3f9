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
    """

    shot_frames: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.shot_frames is not None:
            frames = tuple(int(n) for n in self.shot_frames)
            if not frames or any(n <= 0 for n in frames):
                raise ValueError(f"shot_frames must be positive latent-frame counts, got {self.shot_frames!r}")
            object.__setattr__(self, "shot_frames", frames)


_DEFAULT = MoCContext()
_CURRENT: contextvars.ContextVar[MoCContext | None] = contextvars.ContextVar("diffusers_moc_context", default=None)


def current_moc_context() -> MoCContext:
    """The context MoC processors see now (default: one shot)."""
    return _CURRENT.get() or _DEFAULT


@contextmanager
def moc_context(shot_frames: Sequence[int] | None = None) -> Iterator[MoCContext]:
    r"""
    Set the shots seen by MoC processors inside the `with` block.

    Args:
        shot_frames (`Sequence[int]`, *optional*): latent frames of each shot, in order.
    """
    ctx = MoCContext(shot_frames=None if shot_frames is None else tuple(shot_frames))
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
