"""Pipelines built on MoC: multi-shot long videos and the storyboard files that describe them."""

from .long_video import LongVideoPipeline, LongVideoPipelineOutput, Shot, check_shot_frames, frames_for_seconds

__all__ = ["LongVideoPipeline", "LongVideoPipelineOutput", "Shot", "check_shot_frames", "frames_for_seconds"]
