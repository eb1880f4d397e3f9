"""MoC attention processors for diffusers transformers (installed by `apply_moc`, or set with `set_attn_processor`)."""

from .base import (
    MoCAttnProcessorBase,
    MoCForwardFacts,
    MoCHook,
    forward_facts,
    frames_from_rotary,
)
from .cogvideox import MoCCogVideoXAttnProcessor
from .cosmos3 import MoCCosmos3AttnProcessor
from .generic import MoCDispatchAttnProcessor, VideoStream, dispatch_calls
from .hunyuan_video import MoCHunyuanVideoAttnProcessor
from .hunyuan_video15 import MoCHunyuanVideo15AttnProcessor
from .ltx import MoCLTXVideoAttnProcessor
from .mochi import MoCMochiAttnProcessor
from .wan import MoCWanAttnProcessor, video_grid_from_rotary
from .wan_animate2 import MoCWanAnimate2AttnProcessor

__all__ = [
    "MoCAttnProcessorBase",
    "MoCCogVideoXAttnProcessor",
    "MoCCosmos3AttnProcessor",
    "MoCDispatchAttnProcessor",
    "MoCForwardFacts",
    "MoCHook",
    "MoCHunyuanVideo15AttnProcessor",
    "MoCHunyuanVideoAttnProcessor",
    "MoCLTXVideoAttnProcessor",
    "MoCMochiAttnProcessor",
    "MoCWanAnimate2AttnProcessor",
    "MoCWanAttnProcessor",
    "VideoStream",
    "dispatch_calls",
    "forward_facts",
    "frames_from_rotary",
    "video_grid_from_rotary",
]
