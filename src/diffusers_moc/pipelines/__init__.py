"""Pipelines built on MoC: multi-shot long videos and the storyboard files that describe them."""

from .captions import CaptionLayout, caption_layout, encode_caption
from .hunyuan_video15 import HunyuanVideo15LongVideoPipeline
from .long_video import (
    LongVideoPipeline,
    LongVideoPipelineOutput,
    Shot,
    check_shot_frames,
    frames_for_seconds,
)
from .storyboard import Storyboard, StoryboardError, load_storyboard

__all__ = [
    "CaptionLayout",
    "HunyuanVideo15LongVideoPipeline",
    "LongVideoPipeline",
    "LongVideoPipelineOutput",
    "Shot",
    "Storyboard",
    "StoryboardError",
    "caption_layout",
    "check_shot_frames",
    "encode_caption",
    "frames_for_seconds",
    "load_storyboard",
]
