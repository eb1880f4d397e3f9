"""MoC joint attention for `HunyuanVideoTransformer3DModel` (video and caption tokens in one sequence)."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from .base import MoCAttnProcessorBase, frames_from_rotary, qkv_heads

__all__ = ["MoCHunyuanVideoAttnProcessor"]


_ADDED = ("add_q_proj", "add_k_proj", "add_v_proj")
_ADDED_NORMS = ("norm_added_q", "norm_added_k")


class MoCHunyuanVideoAttnProcessor(MoCAttnProcessorBase):
    r"""
    Drop-in for diffusers' `HunyuanVideoAttnProcessor2_0` that computes the joint video-text attention with MoC.

    The stream is `[video tokens, caption tokens]`. Video chunks are latent frames (grid read off the rotary
    table); the caption is one text chunk, a mandatory anchor of every query (`docs/semantics.md` section 1).
    HunyuanVideo pads the caption to a fixed length and masks the padded keys; here padded caption tokens are
    dropped from the stream before routing, so they are neither keys nor chunk-mean contributors, exactly as the
    stock mask hides them. Their own (query) outputs are zero: no other token ever attends to them, so the video is
    unaffected.

    `transformer.set_attn_processor(MoCHunyuanVideoAttnProcessor(config))` works: on the caption refiner's
    text-only attention (no rotary table), the processor falls back to diffusers' dense `AttnProcessor2_0`.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    def __init__(self, config=None):
        super().__init__(config)
        self._refiner = AttnProcessor2_0()

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
            raise ValueError("MoCHunyuanVideoAttnProcessor needs the rotary embeddings to find the video frame grid")
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

        # 5. MoC attention over [video, valid caption tokens]
        hidden_states = self._joint_attention(attn, query, key, value, image_rotary_emb, text_len, attention_mask)
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

    def _valid_text(self, attention_mask: torch.Tensor | None, batch: int, video_len: int, text_len: int):
        """Per batch element, the indices of the caption tokens the stock mask lets through (None: all of them)."""
        if attention_mask is None or text_len == 0:
            return [None] * batch
        mask = attention_mask.reshape(attention_mask.shape[0], -1)
        if mask.shape[-1] != video_len + text_len or mask.dtype != torch.bool:
            raise ValueError(
                "MoCHunyuanVideoAttnProcessor expects HunyuanVideo's boolean key mask shaped (B, 1, 1, N) with "
                f"N = {video_len + text_len} tokens, got {tuple(attention_mask.shape)} of {attention_mask.dtype}"
            )
        mask = mask.expand(batch, -1)
        if not bool(mask[:, :video_len].all()):
            raise ValueError("the attention mask hides video tokens; MoC only drops padded caption tokens")
        out = []
        for b in range(batch):
            keep = mask[b, video_len:]
            out.append(None if bool(keep.all()) else torch.nonzero(keep).flatten())
        return out

    def _joint_attention(self, attn, query, key, value, image_rotary_emb, text_len, attention_mask):
        B, N = query.shape[:2]
        video_len = N - text_len
        if image_rotary_emb[0].shape[0] != video_len:
            raise ValueError(
                f"rotary embeddings cover {image_rotary_emb[0].shape[0]} tokens but the video stream has {video_len}"
            )
        frames, per_frame = frames_from_rotary(image_rotary_emb, time_column=0)
        valid = self._valid_text(attention_mask, B, video_len, text_len)
        return self.attend_video_then_text(attn, query, key, value, frames, per_frame, valid)
