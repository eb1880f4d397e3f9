"""The shot-aware text context of multi-shot Wan videos, shared by `LongVideoPipeline` and `diffusers-moc train`
(below both, which import nothing from each other).

The cross-attention context holds the global caption and each distinct shot caption once, in that order, each encoded
alone by the text encoder and zero-padded to `max_sequence_length` tokens as Wan does. The `caption_spans` and
`global_caption_span` of [`moc_context`] then tell the MoC processor which tokens each shot attends to. Training and
inference build the context with the same two functions here, so a LoRA is trained on the layout it is used with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils.torch_utils import get_module_execution_device

__all__ = ["CaptionLayout", "caption_layout", "encode_caption"]


@dataclass(frozen=True)
class CaptionLayout:
    r"""
    Where each caption sits in the cross-attention context of one multi-shot video.

    Attributes:
        segments (`tuple[str, ...]`): the distinct captions in context order (global caption first); the context is
            their embeddings concatenated, `max_sequence_length` tokens each.
        max_sequence_length (`int`): text tokens per caption.
        caption_spans (`tuple[tuple[int, int], ...]`, *optional*): token range of each shot's caption, one per shot;
            `None` when the context is a single caption, which every token attends to (stock cross-attention).
        global_caption_span (`tuple[int, int]`, *optional*): token range of the global caption (with
            `caption_spans` only).
    """

    segments: tuple[str, ...]
    max_sequence_length: int
    caption_spans: tuple[tuple[int, int], ...] | None = None
    global_caption_span: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        """Text tokens of the whole context."""
        return len(self.segments) * self.max_sequence_length

    def context_kwargs(self) -> dict[str, Any]:
        """The caption arguments of [`moc_context`] (empty for a single caption: stock cross-attention)."""
        if self.caption_spans is None:
            return {}
        return {"caption_spans": self.caption_spans, "global_caption_span": self.global_caption_span}


def caption_layout(
    global_caption: str | None, shot_captions: Sequence[str | None], max_sequence_length: int
) -> CaptionLayout:
    r"""
    The text context of a multi-shot video: which captions it holds, in which order, and each shot's token spans.

    Each distinct caption is one segment, the global caption first, then shot captions in shot order. Shot `s` attends
    to its own caption plus the global caption. A shot whose caption is `None` attends to the global caption only.
    With a single segment (one caption for everything) no spans are set: that is stock cross-attention.

    Args:
        global_caption (`str`, *optional*): caption attended by every shot.
        shot_captions (`Sequence[str | None]`): each shot's caption, in order.
        max_sequence_length (`int`): text tokens per caption.

    Returns:
        [`CaptionLayout`]

    Raises:
        `ValueError` when there are no shots, no caption at all, or a shot without caption and no global caption.
    """
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
    shot_captions = list(shot_captions)
    if not shot_captions:
        raise ValueError("a video needs at least one shot caption entry")
    for i, caption in enumerate(shot_captions):
        if caption is None and global_caption is None:
            raise ValueError(f"shot {i} has no caption and there is no global caption for it to attend to")
    segments: list[str] = []
    for caption in [global_caption, *shot_captions]:
        if caption is not None and caption not in segments:
            segments.append(caption)
    if len(segments) == 1:
        return CaptionLayout(tuple(segments), max_sequence_length)

    def span(caption: str) -> tuple[int, int]:
        start = segments.index(caption) * max_sequence_length
        return start, start + max_sequence_length

    global_span = None if global_caption is None else span(global_caption)
    spans = tuple(global_span if c is None else span(c) for c in shot_captions)
    return CaptionLayout(tuple(segments), max_sequence_length, spans, global_span)


def encode_caption(
    tokenizer,
    text_encoder: torch.nn.Module,
    caption: str,
    max_sequence_length: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""
    T5 embeddings of one caption, alone, zero-padded past its length as `WanPipeline.encode_prompt` does.

    Args:
        tokenizer: the text encoder's tokenizer.
        text_encoder (`UMT5EncoderModel`): the text encoder.
        caption (`str`): the caption.
        max_sequence_length (`int`): tokens (longer captions are truncated).
        device (`torch.device`, *optional*), dtype (`torch.dtype`, *optional*): of the result (default: the text
            encoder's).

    Returns:
        `torch.Tensor` of shape `(1, max_sequence_length, dim)`.
    """
    inputs = tokenizer(
        [prompt_clean(caption)],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs.input_ids, inputs.attention_mask
    length = int(mask.gt(0).sum())
    model_device = get_module_execution_device(text_encoder)
    embeds = text_encoder(ids.to(model_device), mask.to(model_device)).last_hidden_state
    embeds = embeds.to(dtype=dtype or text_encoder.dtype, device=device or model_device)
    # Wan was trained on captions whose padding embeddings are exactly zero.
    padded = torch.zeros_like(embeds)
    padded[:, :length] = embeds[:, :length]
    return padded
