"""MoC joint attention for `HunyuanVideo15Transformer3DModel` (HunyuanVideo 1.5)."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from ..joint_stream import joint_stream
from ..recording import active_routing_map
from .base import qkv_heads, video_padding_mask
from .hunyuan_video import HunyuanProcessorBase
from .hunyuan_video15_captions import HunyuanVideo15Hook

__all__ = ["MoCHunyuanVideo15AttnProcessor"]


_ADDED = ("add_q_proj", "add_k_proj", "add_v_proj")
_ADDED_NORMS = ("norm_added_q", "norm_added_k")


class MoCHunyuanVideo15AttnProcessor(HunyuanProcessorBase):
    r"""
    Drop-in for diffusers' `HunyuanVideo15AttnProcessor2_0` that computes the joint attention with MoC.

    The stream is `[video tokens, condition tokens]`; HunyuanVideo 1.5 packs the valid condition tokens (image,
    ByT5 glyph text, Qwen caption) first and the padding last, and passes their mask. The valid condition tokens
    form one text chunk, a mandatory anchor; padded ones are dropped before routing (the stock mask hides them as
    keys and as queries), and their outputs are zero. Video chunks are latent frames, read off the rotary table.

    `transformer.set_attn_processor(MoCHunyuanVideo15AttnProcessor(config))` works in eager mode (the frame grid is
    then read off the rotary table): the caption refiner's text-only attention falls back to diffusers' dense
    `AttnProcessor2_0`. With [`apply_moc`] the blocks compile with `fullgraph=True` (`compile_repeated_blocks`); the
    whole model does not, because diffusers' own forward branches on `torch.all(image_embeds == 0)` and packs the
    condition tokens with boolean masks (data-dependent shapes).

    Per-shot captions: with `caption_shots` in the [`moc_context`] (and [`apply_moc`]), each caption segment is a
    text chunk of its shot, the global caption and the image tokens global chunks, and MoC routes over the stream
    in causal order (global chunks, then each shot's captions before its frames, `core.joint_stream`); the token
    refiner refines each caption alone (`HunyuanVideo15Hook`).

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    #: `apply_moc` installs this hook: it also runs the caption refiner per caption.
    hook_class = HunyuanVideo15Hook

    @staticmethod
    def stock_processor(module: torch.nn.Module):
        """The dense diffusers processor of `module` (for [`remove_moc`]): the refiner has no added projections."""
        from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

        return AttnProcessor2_0() if getattr(module, "add_q_proj", None) is None else HunyuanVideo15AttnProcessor2_0()

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
        if image_rotary_emb is None or encoder_hidden_states is None:
            raise ValueError(
                "MoCHunyuanVideo15AttnProcessor needs the rotary embeddings and the condition tokens of a joint "
                "attention call"
            )
        self.refuse_context_parallel("HunyuanVideo15Transformer3DModel")

        query, key, value = qkv_heads(attn, hidden_states)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        encoder_query, encoder_key, encoder_value = qkv_heads(attn, encoder_hidden_states, _ADDED, _ADDED_NORMS)

        video_len, text_len = query.shape[1], encoder_query.shape[1]
        padding = self._padding_mask(attention_mask, query.shape[0], video_len, text_len)
        query = torch.cat([query, encoder_query], dim=1)
        key = torch.cat([key, encoder_key], dim=1)
        value = torch.cat([value, encoder_value], dim=1)
        hidden_states = self._attend(attn, query, key, value, image_rotary_emb, text_len, padding)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states[:, :video_len], hidden_states[:, video_len:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    def _attend(self, attn, query, key, value, rotary_emb, text_len: int, padding: torch.Tensor | None):
        """MoC over `[video, condition]`: one condition chunk, or per-shot caption chunks in MoC's causal order."""
        facts = self.forward_facts(attn, rotary_emb)
        chunks = getattr(facts, "text_chunks", None)
        if chunks is None:
            if facts.context.caption_shots is not None:
                raise ValueError(
                    "per-shot captions (caption_shots) on HunyuanVideo 1.5 need MoC installed with "
                    "`apply_moc(transformer, config)`, whose hook refines each caption alone"
                )
            return self.moc_attend(
                attn, query, key, value, rotary_emb=rotary_emb, text_tokens=text_len, padding_mask=padding
            )
        stream = joint_stream(facts.layout, chunks, facts.padding)
        if stream.layout.num_tokens != query.shape[1]:
            raise ValueError(
                f"the condition chunks cover {stream.layout.num_tokens - facts.layout.num_tokens} tokens but the "
                f"attention call has {text_len}"
            )
        # Gathered after RoPE and scattered back: positions and the stock token order stay untouched.
        query, key, value = (stream.to_moc(x) for x in (query, key, value))
        padding = None if padding is None else stream.to_moc(padding)
        # A routing map shows each condition chunk as its own row and column, labelled by what it is.
        rows = facts.text_labels(stream.text_index) if active_routing_map() is not None else None
        out = self.moc_attend(
            attn, query, key, value, rotary_emb=rotary_emb, padding_mask=padding, layout=stream.layout, text_rows=rows
        )
        return stream.to_model(out)

    @staticmethod
    def _padding_mask(attention_mask, batch: int, video_len: int, text_len: int) -> torch.Tensor | None:
        """The condition mask as MoC's `(B, N)` padding mask (shape checks only)."""
        if attention_mask is None:
            return None
        # The stock processor left-pads a (B, T) condition mask with True up to the whole sequence; accept both.
        mask = attention_mask.reshape(attention_mask.shape[0], -1).bool()
        if mask.shape[-1] == video_len + text_len:
            return mask.expand(batch, -1)
        if tuple(mask.shape) != (batch, text_len):
            raise ValueError(
                f"expected a condition mask shaped ({batch}, {text_len}), got {tuple(attention_mask.shape)}"
            )
        return video_padding_mask(mask, video_len)
