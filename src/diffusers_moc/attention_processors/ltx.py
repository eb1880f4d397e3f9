"""MoC self-attention for `LTXVideoTransformer3DModel` (LTX-Video; text comes in through cross-attention)."""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from ..parallel import all_gather_sequence, gather_sequence, heads_to_sequence, sequence_to_heads, ulysses_config
from .base import MoCAttnProcessorBase, frames_from_rotary

__all__ = ["MoCLTXVideoAttnProcessor"]


class MoCLTXVideoAttnProcessor(MoCAttnProcessorBase):
    r"""
    Drop-in for diffusers' `LTXVideoAttnProcessor` that computes the video self-attention (`attn1`) with MoC.

    Cross-attention to the caption (`attn2`) is delegated to the stock processor, so one instance can be set on
    every attention module: `transformer.set_attn_processor(MoCLTXVideoAttnProcessor(config))`. Video chunks are
    latent frames, read off LTX's rotary table (the time axis is its column `D % 6`, after the padding columns).

    Works under diffusers' Ulysses context parallelism (`ContextParallelConfig(ulysses_degree=N)`): the processor
    exchanges sequence shards for head shards around MoC and reads the grid off the gathered rotary table. Under context
    parallelism it also runs the cross-attention itself (caption gathered on every rank, local video queries):
    diffusers' own LTX processor fails there in 0.42.1 with a caption mask, and in every backward pass.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    def __init__(self, config=None):
        super().__init__(config)
        self._dense = LTXVideoAttnProcessor()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            cp = ulysses_config(self._parallel_config)
            if cp is not None:
                return self._cross_attention_parallel(attn, hidden_states, encoder_hidden_states, attention_mask, cp)
            self._dense._attention_backend = self._attention_backend
            self._dense._parallel_config = self._parallel_config
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise NotImplementedError("MoC self-attention does not take an attention mask (LTX-Video passes none)")
        if image_rotary_emb is None:
            raise ValueError("MoCLTXVideoAttnProcessor needs the rotary embeddings to find the video frame grid")

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        query = apply_rotary_emb(query, image_rotary_emb)
        key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))

        cp = ulysses_config(self._parallel_config)
        cos, sin = image_rotary_emb
        if cp is not None:
            # Each rank holds L/P tokens (and their rotary rows): gather heads-sharded full sequences for routing.
            query, key, value = (sequence_to_heads(x, cp) for x in (query, key, value))
            cos, sin = gather_sequence(cos, 1, cp), gather_sequence(sin, 1, cp)
        frames, per_frame = frames_from_rotary((cos[0], sin[0]), time_column=cos.shape[-1] % 6)
        hidden_states = self.attend(attn, query, key, value, self.layout(frames, per_frame))
        if cp is not None:
            hidden_states = heads_to_sequence(hidden_states, cp)

        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def _cross_attention_parallel(self, attn, hidden_states, encoder_hidden_states, attention_mask, cp):
        # The LTX plan splits the caption over the ranks like the video. diffusers' LTX processor then runs Ulysses
        # attention with queries and keys of different lengths, which fails in 0.42.1: with a caption mask in the
        # forward (the mask, repeated over heads, is never scattered over heads), and in the backward always (the
        # key gradients are reshaped with the query length). The caption is short: gather it on every rank and
        # attend from the local video queries, as Wan's unsplit cross-attention does.
        encoder_hidden_states = all_gather_sequence(encoder_hidden_states, 1, cp)
        if attention_mask is not None:
            attention_mask = gather_sequence(attention_mask, attention_mask.ndim - 1, cp)
            # LTX's caption-padding bias (B, 1, S) is the same for every head and query: broadcast it.
            attention_mask = attention_mask.reshape(attention_mask.shape[0], 1, 1, -1).to(hidden_states.dtype)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=None
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
