"""Pipelines built on MoC: multi-shot long videos and the storyboard files that describe them."""

from .captions import CaptionLayout, caption_layout, encode_caption
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


def __getattr__(name: str):
    # Imported on first use: diffusers' HunyuanVideo 1.5 pipelines import their image processors, which costs time
    # and, without torchvision, prints a transformers notice on every Wan run.
    if name == "HunyuanVideo15LongVideoPipeline":
        from .hunyuan_video15 import HunyuanVideo15LongVideoPipeline

        return HunyuanVideo15LongVideoPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
