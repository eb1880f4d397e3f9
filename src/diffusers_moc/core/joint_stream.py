"""Per-shot captions in a joint-attention stream: the chunks MoC routes over and the token order it routes them in.

A joint-attention model (HunyuanVideo 1.5) concatenates its video tokens and its condition tokens (captions, image
tokens, padding) in one self-attention stream, in an order its own code fixes. MoC's causal routing follows stream
order (a chunk only routes to chunks before it), so a shot's caption placed after the whole video could route to the
last shot's frames and carry them into an earlier shot. [`JointStream`] therefore orders the chunks as MoC needs them:

    [global chunks] [captions of shot 0] [frames of shot 0] [captions of shot 1] [frames of shot 1] ... [padding]

and gives the permutation between the model's order and that one. A processor gathers query, key and value into MoC's
order after the model's rotary embedding is applied and scatters the outputs back, so positions, projections and the
stock outputs never see the reordering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .layout import GLOBAL_SHOT, ChunkLayout

__all__ = ["JointStream", "joint_stream"]


@dataclass(frozen=True)
class JointStream:
    r"""
    A joint stream in MoC's order.

    Attributes:
        layout ([`ChunkLayout`]): the chunks in MoC's order: global text, then per shot its captions and its frames,
            then the padding (one text chunk, dropped by the padding mask).
        order (`tuple[int, ...]`): for each position in MoC's order, the position of that token in the model's
            stream (`moc_tokens = model_tokens[:, order]`).
        text_index (`tuple[int | None, ...]`): for each chunk of `layout`, its position in the `text_chunks` the
            stream was built from; `None` for video chunks and the padding (what a routing map labels its rows by).
    """

    layout: ChunkLayout
    order: tuple[int, ...]
    text_index: tuple[int | None, ...] = ()
    _tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def _index(self, key: str, device: torch.device, build) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return build(device)
        k = (key, str(device))
        if k not in self._tensors:
            self._tensors[k] = build(device)
        return self._tensors[k]

    def to_moc(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """`x` (model order along `dim`) in MoC's order."""
        index = self._index("order", x.device, lambda d: torch.tensor(self.order, dtype=torch.long, device=d))
        return x.index_select(dim, index)

    def to_model(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """`x` (MoC's order along `dim`) back in the model's order."""

        def build(device):
            inverse = torch.empty(len(self.order), dtype=torch.long)
            inverse[torch.tensor(self.order)] = torch.arange(len(self.order))
            return inverse.to(device)

        return x.index_select(dim, self._index("inverse", x.device, build))


def _build(
    video: ChunkLayout, text_chunks: tuple[tuple[int, int], ...], padding: int, video_first: bool
) -> JointStream:
    video_start = 0 if video_first else sum(n for n, _ in text_chunks) + padding
    text_start = video.num_tokens if video_first else 0
    # (position in the model's stream, tokens, shot, is_text, index in text_chunks) of every chunk, in the model's
    # order.
    pieces = []
    for offset, size, shot in zip(video.offsets, video.sizes, video.shots):
        pieces.append((video_start + offset, size, shot, False, None))
    start = text_start
    for i, (size, shot) in enumerate(text_chunks):
        pieces.append((start, size, shot, True, i))
        start += size
    # MoC's order: global text first, then per shot its text before its frames (a stable sort keeps each group's
    # model order), so a caption only ever routes back to earlier shots and the global chunks.
    pieces.sort(key=lambda p: (p[2] != GLOBAL_SHOT, p[2], not p[3]))
    if padding:
        pieces.append((start, padding, GLOBAL_SHOT, True, None))
    order = tuple(i for pos, size, *_ in pieces for i in range(pos, pos + size))
    layout = ChunkLayout.from_chunks([p[1] for p in pieces], [p[2] for p in pieces], [p[3] for p in pieces])
    return JointStream(layout, order, tuple(p[4] for p in pieces))


_cached_build = lru_cache(maxsize=64)(_build)


def joint_stream(
    video: ChunkLayout, text_chunks: tuple[tuple[int, int], ...], padding: int = 0, video_first: bool = True
) -> JointStream:
    r"""
    The [`JointStream`] of a `[video, text]` (or `[text, video]`) stream.

    Args:
        video ([`ChunkLayout`]): the video tokens' chunks (latent frames with their shots).
        text_chunks (`tuple[tuple[int, int], ...]`): `(tokens, shot)` of each text chunk in the model's order
            (`-1`: a global chunk, attended by every shot), followed in the stream by `padding` padded tokens.
        padding (`int`, defaults to 0): padded tokens after the text chunks (masked out by the caller).
        video_first (`bool`, defaults to `True`): whether the model puts the video before the text.
    """
    text_chunks = tuple((int(n), int(s)) for n, s in text_chunks)
    if any(n <= 0 for n, _ in text_chunks) or padding < 0:
        raise ValueError(f"text chunks need at least one token each, got {text_chunks} and {padding} padding tokens")
    if torch.compiler.is_compiling():
        return _build(video, text_chunks, int(padding), video_first)
    return _cached_build(video, text_chunks, int(padding), video_first)
