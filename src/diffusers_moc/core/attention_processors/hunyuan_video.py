"""MoC joint attention for `HunyuanVideoTransformer3DModel` (video and caption tokens in one sequence)."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from .base import MoCAttnProcessorBase, frames_from_rotary, grid_5d, qkv_heads

__all__ = ["MoCHunyuanVideoAttnProcessor"]


_ADDED = ("add_q_proj", "add_k_proj", "add_v_proj")
_ADDED_NORMS = ("norm_added_q", "norm_added_k")


class HunyuanProcessorBase(MoCAttnProcessorBase):
    """What the HunyuanVideo and HunyuanVideo 1.5 processors share: the dense processor of the caption refiner's
    text-only attention, and the latent grid (from the input shape, or read off the rotary table, time first)."""

    def __init__(self, config=None):
        super().__init__(config)
        self._refiner = AttnProcessor2_0()

    @staticmethod
    def input_grid(transformer, args, kwargs) -> tuple[int, int, int]:
        """Post-patchify `(frames, height, width)`: `hidden_states` is `(B, C, F, H, W)`."""
        return grid_5d(transformer, args, kwargs)

    def grid_from_rotary(self, rotary_emb) -> tuple[int, int]:
        return frames_from_rotary(rotary_emb, time_column=0)


class MoCHunyuanVideoAttnProcessor(HunyuanProcessorBase):
    r"""
    Drop-in for diffusers' `HunyuanVideoAttnProcessor2_0` that computes the joint video-text attention with MoC.

    The stream is `[video tokens, caption tokens]`. Video chunks are latent frames; the caption is one text chunk, a
    mandatory anchor of every query (`docs/semantics.md` section 1). HunyuanVideo pads the caption to a fixed length
    and masks the padded keys; here the mask becomes MoC's `padding_mask`: padded caption tokens are neither keys nor
    chunk-mean contributors, exactly as the stock mask hides them. Their own (query) outputs are zero: no other token
    ever attends to them, so the video is unaffected.

    `transformer.set_attn_processor(MoCHunyuanVideoAttnProcessor(config))` works in eager mode (the frame grid is
    then read off the rotary table); on the caption refiner's text-only attention the processor falls back to
    diffusers' dense `AttnProcessor2_0`. Use [`apply_moc`] for `torch.compile`.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    @staticmethod
    def stock_processor(module: torch.nn.Module):
        """The dense diffusers processor of `module` (for [`remove_moc`]): the refiner has no QK-norm."""
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        return AttnProcessor2_0() if module.norm_q is None else HunyuanVideoAttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if image_rotary_emb is None and encoder_hidden_states is None:
            # The token refiner's text-only self-attention: not part of the video stream.
            return self._refiner(attn, hidden_states, encoder_hidden_states, attention_mask)
        if image_rotary_emb is None:
            raise ValueError("MoCHunyuanVideoAttnProcessor needs the rotary embeddings of the video stream")
        self.refuse_context_parallel("HunyuanVideoTransformer3DModel")

        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1-3. Projections, QK-norm and RoPE on the video part, as in diffusers' HunyuanVideoAttnProcessor2_0.
        query, key, value = qkv_heads(attn, hidden_states)
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            query = torch.cat(
                [apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1), query[:, -text_len:]], 1
            )
            key = torch.cat(
                [apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1), key[:, -text_len:]], 1
            )
        else:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Caption stream
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = qkv_heads(attn, encoder_hidden_states, _ADDED, _ADDED_NORMS)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # 5. MoC attention over [video, caption], padded caption tokens dropped
        padding = self._padding_mask(attention_mask, query.shape[0], query.shape[1] - text_len, text_len)
        hidden_states = self.moc_attend(
            attn, query, key, value, rotary_emb=image_rotary_emb, text_tokens=text_len, padding_mask=padding
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        # 6. Output projection
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :-text_len], hidden_states[:, -text_len:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    @staticmethod
    def _padding_mask(attention_mask, batch: int, video_len: int, text_len: int) -> torch.Tensor | None:
        """HunyuanVideo's boolean key mask `(B, 1, 1, N)` as MoC's `(B, N)` padding mask (shape checks only)."""
        if attention_mask is None or text_len == 0:
            return None
        mask = attention_mask.reshape(attention_mask.shape[0], -1)
        if mask.shape[-1] != video_len + text_len or mask.dtype != torch.bool:
            raise ValueError(
                "MoCHunyuanVideoAttnProcessor expects HunyuanVideo's boolean key mask shaped (B, 1, 1, N) with "
                f"N = {video_len + text_len} tokens, got {tuple(attention_mask.shape)} of {attention_mask.dtype}"
            )
        return mask.expand(batch, -1)
