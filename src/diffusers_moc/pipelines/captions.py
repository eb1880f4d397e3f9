"""Compatibility: the shot-aware text context lives in `diffusers_moc.captions` (shared by pipelines and training,
which import nothing from each other)."""

from ..captions import CaptionLayout, caption_layout, encode_caption

__all__ = ["CaptionLayout", "caption_layout", "encode_caption"]
