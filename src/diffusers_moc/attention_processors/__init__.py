"""MoC attention processors for diffusers transformers (set with `set_attn_processor` or `apply_moc`)."""

from .wan import MoCWanAttnProcessor, video_grid_from_rotary

__all__ = ["MoCWanAttnProcessor", "video_grid_from_rotary"]
