"""MoC joint attention for `MochiTransformer3DModel` (Mochi 1: video and caption streams attended jointly)."""

from __future__ import annotations

import torch

from .base import MoCAttnProcessorBase, grid_5d, qkv_heads, video_padding_mask

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

    The stream is `[video tokens, caption tokens]`: like the stock processor, padded caption tokens (by the
    `encoder_attention_mask`) are left out of each sample's attention (MoC's `padding_mask`), and their outputs are
    zero. Video chunks are latent frames; the caption is one text chunk, a mandatory anchor. Unlike the stock
    processor (which finds the valid tokens with `nonzero`), nothing here reads the mask on the host outside the
    attention op, so the model compiles with `fullgraph=True`.

    Mochi's RoPE mixes the three axes in every column (learned frequencies), so the frame grid cannot be read off
    it: it comes from the transformer input, through the hook of [`apply_moc`]. Install this processor
    with `apply_moc(transformer, config)`; `set_attn_processor` alone raises a clear error.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    @staticmethod
    def input_grid(transformer, args, kwargs) -> tuple[int, int, int]:
        """Post-patchify `(frames, height, width)`: `hidden_states` is `(B, C, F, H, W)`, no time patching."""
        return grid_5d(transformer, args, kwargs)

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

        batch, video_len, text_len = query.shape[0], query.shape[1], encoder_query.shape[1]
        padding = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, text_len):
                raise ValueError(
                    f"expected Mochi's caption mask shaped ({batch}, {text_len}), got {tuple(attention_mask.shape)}"
                )
            padding = video_padding_mask(attention_mask, video_len)
        query = torch.cat([query, encoder_query], dim=1)
        key = torch.cat([key, encoder_key], dim=1)
        value = torch.cat([value, encoder_value], dim=1)
        hidden_states = self.moc_attend(attn, query, key, value, text_tokens=text_len, padding_mask=padding)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes((video_len, text_len), dim=1)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
