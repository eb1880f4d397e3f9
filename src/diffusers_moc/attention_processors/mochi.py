"""MoC joint attention for `MochiTransformer3DModel` (Mochi 1: video and caption streams attended jointly)."""

from __future__ import annotations

import torch

from .base import MoCAttnProcessorBase, qkv_heads

__all__ = ["MoCMochiAttnProcessor"]


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Mochi's interleaved-pair rotation, computed in float32 as diffusers' MochiAttnProcessor2_0 does.
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


_ADDED = ("add_q_proj", "add_k_proj", "add_v_proj")
_ADDED_NORMS = ("norm_added_q", "norm_added_k")


class MoCMochiAttnProcessor(MoCAttnProcessorBase):
    r"""
    Drop-in for diffusers' `MochiAttnProcessor2_0` that computes the joint video-caption attention with MoC.

    The stream is `[video tokens, valid caption tokens]`: like the stock processor, padded caption tokens (by the
    `encoder_attention_mask`) are left out of each sample's attention, and their outputs are zero. Video chunks are
    latent frames; the caption is one text chunk, a mandatory anchor.

    Mochi's RoPE mixes the three axes in every column (learned frequencies), so the frame grid cannot be read off
    it: it comes from the transformer input, recorded by the pre-hook that [`apply_moc`] registers. Install this
    processor with `apply_moc(transformer, config)`; `set_attn_processor` alone raises a clear error.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    @staticmethod
    def input_grid(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        """Post-patchify `(frames, height, width)` of a `MochiTransformer3DModel.forward` call."""
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        if hidden_states is None or hidden_states.ndim != 5:
            return None
        _, _, frames, height, width = hidden_states.shape
        p = transformer.config.patch_size
        return frames, height // p, width // p

    @staticmethod
    def stock_processor(module: torch.nn.Module):
        """The dense diffusers processor (for [`remove_moc`])."""
        from diffusers.models.attention_processor import MochiAttnProcessor2_0

        return MochiAttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.refuse_context_parallel("MochiTransformer3DModel")
        query, key, value = qkv_heads(attn, hidden_states)

        encoder_query, encoder_key, encoder_value = qkv_heads(attn, encoder_hidden_states, _ADDED, _ADDED_NORMS)

        if image_rotary_emb is not None:
            query = _apply_rotary_emb(query, *image_rotary_emb)
            key = _apply_rotary_emb(key, *image_rotary_emb)

        video_len, text_len = query.shape[1], encoder_query.shape[1]
        frames, per_frame = self._video_grid(video_len)
        valid = self._valid_text(attention_mask, query.shape[0], text_len)
        query = torch.cat([query, encoder_query], dim=1)
        key = torch.cat([key, encoder_key], dim=1)
        value = torch.cat([value, encoder_value], dim=1)
        hidden_states = self.attend_video_then_text(attn, query, key, value, frames, per_frame, valid)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes((video_len, text_len), dim=1)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    def _video_grid(self, video_len: int) -> tuple[int, int]:
        if self._grid is None:
            raise ValueError(
                "MoCMochiAttnProcessor has no recorded input grid (Mochi's RoPE does not reveal it); install it with "
                "`apply_moc(transformer, config)`, which records the grid of every forward"
            )
        frames, height, width = self._grid
        if frames * height * width != video_len:
            raise ValueError(
                f"the recorded input grid {frames}x{height}x{width} does not match the {video_len} video tokens"
            )
        return frames, height * width

    @staticmethod
    def _valid_text(attention_mask: torch.Tensor | None, batch: int, text_len: int) -> list[torch.Tensor | None]:
        if attention_mask is None:
            return [None] * batch
        if attention_mask.shape != (batch, text_len):
            raise ValueError(
                f"expected Mochi's caption mask shaped ({batch}, {text_len}), got {tuple(attention_mask.shape)}"
            )
        # Indices of the valid caption tokens (the stock processor keeps the same ones with `nonzero`).
        return [None if bool(m.all()) else torch.nonzero(m).flatten() for m in attention_mask.bool()]
