"""MoC self-attention for `LTXVideoTransformer3DModel` (LTX-Video; text comes in through cross-attention)."""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from ..parallel import all_gather_sequence, gather_sequence, ulysses_config
from .base import MoCAttnProcessorBase, frames_from_rotary

__all__ = ["MoCLTXVideoAttnProcessor"]


class MoCLTXVideoAttnProcessor(MoCAttnProcessorBase):
    r"""
    Drop-in for diffusers' `LTXVideoAttnProcessor` that computes the video self-attention (`attn1`) with MoC.

    Cross-attention to the caption (`attn2`) is delegated to the stock processor, so one instance can be set on
    every attention module: `transformer.set_attn_processor(MoCLTXVideoAttnProcessor(config))`. Video chunks are
    latent frames: with [`apply_moc`] the grid is the forward's `num_frames`, `height`, `width` (or, when only
    `video_coords` are given, as `LTXConditionPipeline` does, read off their time coordinates once per forward, in
    eager mode); with `set_attn_processor` alone it is read off LTX's rotary table (eager only; the time axis is its
    column `D % 6`, after the padding columns).

    Works under diffusers' Ulysses context parallelism (`ContextParallelConfig(ulysses_degree=N)`, with
    [`apply_moc`]): the shared MoC step exchanges sequence shards for head shards around MoC. Under context
    parallelism it also runs the cross-attention itself (caption gathered on every rank, local video queries):
    diffusers' own LTX processor fails there in 0.42.1 with a caption mask, and in every backward pass.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    def __init__(self, config=None):
        super().__init__(config)
        self._dense = LTXVideoAttnProcessor()

    @staticmethod
    def input_grid(transformer, args, kwargs) -> tuple[int, int, int]:
        """`(frames, height, width)` of the latent tokens: the `num_frames`, `height`, `width` of the call, or the
        frames of its `video_coords` (a host read of that input; not traceable)."""
        call = MoCAttnProcessorBase._call_arg
        grid = tuple(call(args, kwargs, name, i) for name, i in (("num_frames", 4), ("height", 5), ("width", 6)))
        if all(n is not None for n in grid):
            return grid
        coords = call(args, kwargs, "video_coords", 8)
        if coords is None:
            raise ValueError(
                "MoC on LTX-Video needs the latent grid of the call: pass num_frames, height and width (as LTXPipeline "
                "does) or video_coords"
            )
        if torch.compiler.is_compiling():
            raise ValueError(
                "under torch.compile / torch.export MoC on LTX-Video needs num_frames, height and width (the grid of "
                "video_coords can only be read on the host)"
            )
        time = coords[0, 0].float()[:, None]
        frames, per_frame = frames_from_rotary((time, torch.zeros_like(time)))
        return frames, 1, per_frame

    def grid_from_rotary(self, rotary_emb) -> tuple[int, int]:
        cos, sin = rotary_emb
        return frames_from_rotary((cos[0], sin[0]), time_column=cos.shape[-1] % 6)

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

        hidden_states = self.moc_attend(attn, query, key, value, rotary_emb=image_rotary_emb)
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
