"""MoC attention processors for diffusers transformers (set with `set_attn_processor` or `apply_moc`)."""

from .base import MoCAttnProcessorBase, frames_from_rotary
from .cogvideox import MoCCogVideoXAttnProcessor
from .hunyuan_video import MoCHunyuanVideoAttnProcessor
from .hunyuan_video15 import MoCHunyuanVideo15AttnProcessor
from .ltx import MoCLTXVideoAttnProcessor
from .mochi import MoCMochiAttnProcessor
from .wan import MoCWanAttnProcessor, video_grid_from_rotary

__all__ = [
    "MoCAttnProcessorBase",
    "MoCCogVideoXAttnProcessor",
    "MoCHunyuanVideo15AttnProcessor",
    "MoCHunyuanVideoAttnProcessor",
    "MoCLTXVideoAttnProcessor",
    "MoCMochiAttnProcessor",
    "MoCWanAttnProcessor",
    "frames_from_rotary",
    "video_grid_from_rotary",
]
