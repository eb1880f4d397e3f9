"""MoC self-attention processor for Wan-family transformers (Wan 2.1/2.2, Wan VACE, SkyReels-V2, Wan I2V)."""

from __future__ import annotations

import weakref
from functools import lru_cache

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from ..attention import moc_attention
from ..config import MoCConfig
from ..context import current_moc_context
from ..layout import ChunkLayout
from ..parallel import gather_sequence, heads_to_sequence, sequence_shard, sequence_to_heads, ulysses_config
from .base import first_change

__all__ = ["MoCWanAttnProcessor", "video_grid_from_rotary"]


def video_grid_from_rotary(rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int, int]:
    r"""
    The latent grid `(frames, height, width)` after patchify, read off Wan's 3D RoPE.

    Wan's rotary table `(1, L, 1, D)` is the concatenation of a time, a height and a width part
    (`D - 4 * (D // 6)`, `2 * (D // 6)`, `2 * (D // 6)` columns), each constant along the other two axes. Tokens are
    in `(frame, row, column)` order, so the first token whose time part differs from token 0 starts frame 1, and the
    first whose height part differs starts row 1.
    """
    cos, sin = rotary_emb
    if cos.ndim != 4 or cos.shape[0] != 1 or cos.shape[2] != 1:
        raise ValueError(f"expected Wan rotary embeddings shaped (1, L, 1, D), got {tuple(cos.shape)}")
    table = torch.cat([cos[0, :, 0], sin[0, :, 0]], dim=-1)
    L, D = cos.shape[1], cos.shape[-1]
    hw = 2 * (D // 6)
    t = D - 2 * hw
    time_part = torch.cat([table[:, :t], table[:, D : D + t]], dim=-1)
    height_part = torch.cat([table[:, t : t + hw], table[:, D + t : D + t + hw]], dim=-1)
    per_frame = first_change(time_part)
    width = first_change(height_part[:per_frame])
    if L % per_frame or per_frame % width:
        raise ValueError(f"could not read a (frames, height, width) grid from rotary embeddings of {L} tokens")
    frames = L // per_frame
    # Every frame must repeat frame 0's spatial pattern; a mismatch means this is not Wan's RoPE layout.
    grid = time_part.view(frames, per_frame, -1)
    if not bool((grid == grid[:, :1]).all()):
        raise ValueError("rotary embeddings are not laid out as Wan's (frame, row, column) grid")
    return frames, per_frame // width, width


@lru_cache(maxsize=64)
def _video_layout(
    frames: int, tokens_per_frame: int, shot_frames: tuple[int, ...] | None, chunk_tokens: int | None
) -> ChunkLayout:
    if shot_frames is not None and sum(shot_frames) != frames:
        raise ValueError(
            f"the MoC context says the shots have {list(shot_frames)} latent frames (sum {sum(shot_frames)}), but the "
            f"transformer input has {frames} latent frames; set `moc_context(shot_frames=...)` to match"
        )
    return ChunkLayout.for_video(frames, tokens_per_frame, shot_frames, chunk_tokens)


class MoCWanAttnProcessor:
    r"""
    Attention processor for `WanAttention` that computes self-attention with Mixture of Contexts.

    Cross-attention (text, and image keys of Wan I2V) is left to diffusers' `WanAttnProcessor`, so the same instance
    can be set on every attention module: `transformer.set_attn_processor(MoCWanAttnProcessor(config))`.

    The layout is one chunk per latent frame (or `config.chunk_tokens`), found from the rotary embeddings the model
    passes in; shots come from [`moc_context`] (default: one shot).

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, config: MoCConfig | None = None):
        self.config = MoCConfig() if config is None else config
        self._dense = WanAttnProcessor()
        self._grid_cache: tuple[weakref.ref, tuple[int, int, int]] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def layout_for(self, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None, num_tokens: int) -> ChunkLayout:
        """The chunk layout of a self-attention call with these rotary embeddings."""
        if rotary_emb is None:
            raise ValueError(
                "MoCWanAttnProcessor needs the rotary embeddings of a Wan self-attention call to find the frame grid"
            )
        # All layers of one forward share the same rotary tensors: read the grid once per forward, not per layer
        # (each read syncs with the device).
        cached = self._grid_cache
        if cached is not None and cached[0]() is rotary_emb[0]:
            frames, height, width = cached[1]
        else:
            frames, height, width = video_grid_from_rotary(rotary_emb)
            self._grid_cache = (weakref.ref(rotary_emb[0]), (frames, height, width))
        if frames * height * width != num_tokens:
            raise ValueError(
                f"rotary embeddings describe {frames}x{height}x{width} tokens but the sequence has {num_tokens}"
            )
        shots = current_moc_context().shot_frames
        return _video_layout(frames, height * width, shots, self.config.chunk_tokens)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            context = current_moc_context()
            if context.caption_spans is not None:
                return _shot_cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, context, self)
            # Cross-attention is not routed: delegate to the stock processor with this processor's settings.
            self._dense._attention_backend = self._attention_backend
            self._dense._parallel_config = self._parallel_config
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attention_mask is not None:
            raise NotImplementedError(
                "MoC self-attention does not take an explicit attention mask (e.g. SkyReels-V2 diffusion forcing with "
                "num_frame_per_block > 1); use causal=True routing instead"
            )

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        cp = ulysses_config(self._parallel_config)
        if cp is not None and rotary_emb is not None:
            # Ulysses context parallelism: this rank holds L/P tokens; route over all tokens for H/P heads instead.
            query, key, value = (sequence_to_heads(x, cp) for x in (query, key, value))
            rotary_emb = tuple(gather_sequence(r, 1, cp) for r in rotary_emb)
        layout = self.layout_for(rotary_emb, query.shape[1])
        # Drop-off / drop-in (train mode only) draw from the global RNG, which activation checkpointing replays.
        hidden_states = moc_attention(query, key, value, layout, self.config, training=attn.training)
        if cp is not None and rotary_emb is not None:
            hidden_states = heads_to_sequence(hidden_states, cp)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _shot_cross_attention(
    attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, attention_mask, context, processor
) -> torch.Tensor:
    """Cross-attention with per-shot caption anchors: shot `s` attends to its caption span plus the global span."""
    if attn.add_k_proj is not None:
        raise NotImplementedError(
            "per-shot caption spans are only supported for text-only cross-attention (Wan T2V); this layer also "
            "attends to image keys (Wan I2V)"
        )
    if attention_mask is not None:
        raise NotImplementedError("per-shot caption spans do not take an explicit cross-attention mask")
    shot_frames, spans, global_span = context.shot_frames, context.caption_spans, context.global_caption_span
    num_frames, num_tokens, num_text = sum(shot_frames), hidden_states.shape[1], encoder_hidden_states.shape[1]
    # Under Ulysses context parallelism this rank's queries are one contiguous slice of the video tokens.
    rank, world = sequence_shard(processor._parallel_config)
    offset, total = rank * num_tokens, num_tokens * world
    # Cross-attention gets no RoPE, so the frame size comes from the shots: tokens are in (frame, row, col) order.
    if total % num_frames:
        raise ValueError(
            f"the MoC context has {num_frames} latent frames but the cross-attention query has {total} tokens, "
            "which is not a whole number of frames"
        )
    named = [(f"caption_spans[{i}]", s) for i, s in enumerate(spans)] + [("global_caption_span", global_span)]
    for name, span in named:
        if span is not None and span[1] > num_text:
            raise ValueError(f"{name}={span} lies outside encoder_hidden_states of {num_text} tokens")
    tokens_per_frame = total // num_frames

    query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))

    out = query.new_empty(*query.shape[:3], value.shape[-1])
    shot_end = 0
    for frames, (s0, s1) in zip(shot_frames, spans):
        shot_start, shot_end = shot_end, shot_end + frames * tokens_per_frame
        # This shot's tokens within this rank's slice, in local positions.
        start, end = max(shot_start, offset) - offset, min(shot_end, offset + num_tokens) - offset
        if start >= end:
            continue
        # Each shot is its own attention call: its output never depends on other shots' captions.
        if global_span is None or global_span == (s0, s1):
            k, v = key[:, s0:s1], value[:, s0:s1]
        else:
            g0, g1 = global_span
            k = torch.cat([key[:, g0:g1], key[:, s0:s1]], dim=1)
            v = torch.cat([value[:, g0:g1], value[:, s0:s1]], dim=1)
        out[:, start:end] = dispatch_attention_fn(
            query[:, start:end], k, v, dropout_p=0.0, is_causal=False, backend=processor._attention_backend
        )
    hidden_states = out.flatten(2, 3).type_as(query)
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved-pair rotation, as in diffusers' WanAttnProcessor.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
