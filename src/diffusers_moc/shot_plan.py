"""The shot plan of one multi-shot video: its shots in pixel and latent frames, its text context, and what MoC is told
about both. Shared by `LongVideoPipeline` and `diffusers-moc train` (below both, which import nothing from each other),
so a LoRA is trained on the shots and caption spans it is used with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .captions import CaptionLayout, caption_layout

__all__ = ["ShotPlan", "latent_shot_frames", "plan_shots"]

#: Wan's VAE: `4n + 1` pixel frames -> `n + 1` latent frames.
WAN_TEMPORAL_RATIO = 4


def latent_shot_frames(shot_starts: Sequence[int], num_frames: int, temporal_ratio: int = WAN_TEMPORAL_RATIO):
    r"""
    Latent frames per shot for a causal video VAE that maps `t*n + 1` pixel frames to `n + 1` latent frames.

    Latent frame 0 encodes pixel frame 0; latent frame `j >= 1` encodes pixel frames `t*j - t + 1 ... t*j`. A latent
    frame belongs to the shot holding the larger part of its pixel frames (ties: the earlier shot), so shot starts at
    `t*m + 1` (aligned) map exactly.

    Args:
        shot_starts (`Sequence[int]`): first pixel frame of every shot, relative to the sample start (first is 0).
        num_frames (`int`): pixel frames of the sample (`t*n + 1`).
        temporal_ratio (`int`, defaults to 4): the VAE's temporal compression `t`.

    Returns:
        `tuple[int, ...]`: latent frames per shot (sums to `(num_frames - 1) // t + 1`).
    """
    if (num_frames - 1) % temporal_ratio:
        raise ValueError(f"num_frames must be {temporal_ratio}n + 1, got {num_frames}")
    starts = list(shot_starts)
    if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= num_frames:
        raise ValueError(f"shot starts must begin at 0 and increase within {num_frames} frames, got {starts}")
    latent = (num_frames - 1) // temporal_ratio + 1
    # Latent frame j >= 1 has its centre at pixel t*j - (t - 1)/2; it belongs to the shot its centre falls in.
    bounds = [0] + [
        1 + sum(1 for j in range(1, latent) if temporal_ratio * j - (temporal_ratio - 1) / 2 < s) for s in starts[1:]
    ]
    counts = [b - a for a, b in zip(bounds, bounds[1:] + [latent])]
    if any(c <= 0 for c in counts):
        raise ValueError(
            f"shots starting at pixel frames {starts} leave a shot without a latent frame (each shot needs about "
            f"{temporal_ratio} pixel frames, the VAE's temporal stride)"
        )
    return tuple(counts)


@dataclass(frozen=True)
class ShotPlan:
    r"""
    The shots of one video and its text context, built once by [`plan_shots`].

    Attributes:
        pixel_frames (`tuple[int, ...]`): pixel frames of each shot.
        latent_frames (`tuple[int, ...]`): latent frames of each shot.
        captions ([`CaptionLayout`]): which captions the conditional text context holds, and each shot's span.
    """

    pixel_frames: tuple[int, ...]
    latent_frames: tuple[int, ...]
    captions: CaptionLayout

    @property
    def num_shots(self) -> int:
        return len(self.latent_frames)

    @property
    def shot_starts(self) -> list[int]:
        """Pixel frame where each shot starts."""
        return [sum(self.pixel_frames[:i]) for i in range(self.num_shots)]

    @property
    def latent_starts(self) -> list[int]:
        """Latent frame where each shot starts."""
        return [sum(self.latent_frames[:i]) for i in range(self.num_shots)]

    @property
    def shot_context(self) -> dict[str, Any]:
        r"""
        The [`moc_context`] arguments of a forward whose text context is one caption for every shot (a negative or a
        dropped prompt): the shots alone. One shot is the whole video (`shot_frames=None`).
        """
        return {"shot_frames": self.latent_frames if self.num_shots > 1 else None}

    @property
    def caption_context(self) -> dict[str, Any]:
        r"""
        The [`moc_context`] arguments of a forward on the conditional text context ([`captions`]): the shots and, with
        several captions, each shot's caption span (which belongs to a shot, so a single shot is then named).
        """
        spans = self.captions.context_kwargs()
        if not spans:
            return self.shot_context
        return {"shot_frames": self.latent_frames, **spans}

    def with_captions(self, captions: CaptionLayout) -> ShotPlan:
        """The same shots with another text context (e.g. the empty prompt of a dropped caption)."""
        return ShotPlan(self.pixel_frames, self.latent_frames, captions)


def plan_shots(
    pixel_frames: Sequence[int],
    global_caption: str | None,
    shot_captions: Sequence[str | None],
    max_sequence_length: int,
    temporal_factor: int = WAN_TEMPORAL_RATIO,
    one_clip: bool = False,
) -> ShotPlan:
    r"""
    Plan the shots of one video.

    Args:
        pixel_frames (`Sequence[int]`): pixel frames of each shot, in order.
        global_caption (`str`, *optional*): caption attended by every shot.
        shot_captions (`Sequence[str | None]`): each shot's caption (see [`caption_layout`]).
        max_sequence_length (`int`): text tokens per caption.
        temporal_factor (`int`, defaults to 4): the VAE's temporal compression.
        one_clip (`bool`, defaults to `False`): how the shots reach the VAE. `False`: each shot is a clip of its own,
            `temporal_factor * n + 1` frames (`LongVideoPipeline` draws and decodes shot by shot). `True`: the shots
            are consecutive parts of one clip of `temporal_factor * n + 1` frames that the VAE encodes whole (a
            training sample); a latent frame then belongs to the shot holding most of its pixel frames
            ([`latent_shot_frames`]).

    Returns:
        [`ShotPlan`]
    """
    pixel_frames = tuple(int(f) for f in pixel_frames)
    if one_clip:
        starts = [sum(pixel_frames[:i]) for i in range(len(pixel_frames))]
        latent_frames = latent_shot_frames(starts, sum(pixel_frames), temporal_factor)
    else:
        latent_frames = tuple((f - 1) // temporal_factor + 1 for f in pixel_frames)
    return ShotPlan(pixel_frames, latent_frames, caption_layout(global_caption, shot_captions, max_sequence_length))
