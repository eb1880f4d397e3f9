"""Pipelines built on MoC: multi-shot long videos and the storyboard files that describe them."""

from .long_video import (
    LongVideoPipeline,
    LongVideoPipelineOutput,
    Shot,
    check_shot_frames,
    frames_for_seconds,
    prepare_moc_transformer,
)
from .storyboard import Storyboard, StoryboardError, load_storyboard

__all__ = [
    "LongVideoPipeline",
    "LongVideoPipelineOutput",
    "Shot",
    "Storyboard",
    "StoryboardError",
    "check_shot_frames",
    "frames_for_seconds",
    "load_storyboard",
    "prepare_moc_transformer",
]
