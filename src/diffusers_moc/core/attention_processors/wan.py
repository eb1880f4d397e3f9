"""MoC processor for Wan-family transformers (Wan 2.1/2.2, Wan VACE, SkyReels-V2, Wan I2V)."""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    _get_added_kv_projections,
    _get_qkv_projections,
)

from ..context import current_moc_context
from ..parallel import sequence_shard
from .base import MoCAttnProcessorBase, first_change, grid_5d

__all__ = ["MoCWanAttnProcessor", "video_grid_from_rotary"]


def video_grid_from_rotary(rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int, int]:
    r"""
    The latent grid `(frames, height, width)` after patchify, read off Wan's 3D RoPE (on the host).

    Only the fallback of a processor set with `set_attn_processor` alone uses this; [`apply_moc`] computes the grid
    from the input shape. Wan's rotary table `(1, L, 1, D)` is the concatenation of a time, a height and a width part
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


class MoCWanAttnProcessor(MoCAttnProcessorBase):
    r"""
    Processor for `WanAttention` that computes the video self-attention with Mixture of Contexts.

    diffusers' `WanAttnProcessor` flow (projections, QK-norm, RoPE) with MoC in place of its attention call. Video
    chunks are latent frames (or `config.chunk_tokens`), shots come from [`moc_context`]. [`apply_moc`] sets it on
    the cross-attention layers too: with `caption_spans` in the context each shot's tokens attend only to their
    caption plus the global one (per-shot caption anchors); without, cross-attention is diffusers' own.

    `transformer.set_attn_processor(MoCWanAttnProcessor(config))` works in eager mode: without `apply_moc`'s hook,
    the processor reads the frame grid off the rotary embeddings (a host read per layer); use `apply_moc`
    for `torch.compile`.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    def __init__(self, config=None):
        super().__init__(config)
        self._dense = WanAttnProcessor()

    @staticmethod
    def input_grid(transformer, args, kwargs) -> tuple[int, int, int]:
        """Post-patchify `(frames, height, width)` of a Wan forward call: `hidden_states` is `(B, C, F, H, W)`."""
        return grid_5d(transformer, args, kwargs)

    def grid_from_rotary(self, rotary_emb) -> tuple[int, int]:
        frames, height, width = video_grid_from_rotary(rotary_emb)
        return frames, height * width

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            return self._cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
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

        hidden_states = self.moc_attend(attn, query, key, value, rotary_emb=rotary_emb)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def _cross_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        facts = None if self.hook is None else self.hook.facts
        context = current_moc_context() if facts is None else facts.context
        if context.caption_spans is None and context.image_tokens is None:
            # Stock cross-attention, with this processor's diffusers settings.
            self._dense._attention_backend = self._attention_backend
            self._dense._parallel_config = self._parallel_config
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        tokens_per_frame = None if facts is None else facts.tokens_per_frame
        return _shot_cross_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, context, tokens_per_frame, self
        )


def _shot_cross_attention(
    attn, hidden_states, encoder_hidden_states, attention_mask, context, tokens_per_frame, processor
) -> torch.Tensor:
    r"""
    Cross-attention with per-shot caption anchors: shot `s` attends to its caption span plus the global span. With
    `context.image_tokens` (Wan I2V), the leading image tokens are split off and attended by every video token, as
    diffusers' processor attends them, and the spans count the text after them (no spans: all of the text).
    """
    if attention_mask is not None:
        raise NotImplementedError("per-shot caption spans do not take an explicit cross-attention mask")
    image_tokens = context.image_tokens or 0
    if (attn.add_k_proj is not None) != bool(image_tokens):
        raise ValueError(
            "this cross-attention layer attends image keys (Wan I2V): set moc_context(image_tokens=...) to the "
            "number of image tokens leading encoder_hidden_states (LongVideoPipeline does)"
            if attn.add_k_proj is not None
            else f"moc_context(image_tokens={image_tokens}) is set but this cross-attention layer has no image keys"
        )
    image, text = encoder_hidden_states[:, :image_tokens], encoder_hidden_states[:, image_tokens:]
    query, key, value = _get_qkv_projections(attn, hidden_states, text)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    backend = processor._attention_backend
    if context.caption_spans is None:
        hidden = dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False, backend=backend)
    else:
        hidden = _per_shot_text_attention(query, key, value, context, tokens_per_frame, processor)
    hidden = hidden.flatten(2, 3).type_as(query)
    if image_tokens:
        key_img, value_img = _get_added_kv_projections(attn, image)
        key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
        value_img = value_img.unflatten(2, (attn.heads, -1))
        hidden_img = dispatch_attention_fn(query, key_img, value_img, dropout_p=0.0, is_causal=False, backend=backend)
        hidden = hidden + hidden_img.flatten(2, 3).type_as(query)
    hidden = attn.to_out[0](hidden)
    return attn.to_out[1](hidden)


def _per_shot_text_attention(query, key, value, context, tokens_per_frame, processor) -> torch.Tensor:
    """Each shot's queries attend their own caption span (plus the global one): one attention call per shot."""
    shot_frames, spans, global_span = context.shot_frames, context.caption_spans, context.global_caption_span
    num_frames, num_tokens, num_text = sum(shot_frames), query.shape[1], key.shape[1]
    # Under Ulysses context parallelism this rank's queries are one contiguous slice of the video tokens.
    rank, world = sequence_shard(processor._parallel_config)
    offset, total = rank * num_tokens, num_tokens * world
    if tokens_per_frame is None:
        # No per-forward facts (set_attn_processor alone): tokens are in (frame, row, col) order, so the frame
        # size follows from the shots.
        tokens_per_frame = total // num_frames
    if total != num_frames * tokens_per_frame:
        raise ValueError(
            f"the MoC context has {num_frames} latent frames but the cross-attention query has {total} tokens, "
            "which is not a whole number of frames"
        )
    named = [(f"caption_spans[{i}]", s) for i, s in enumerate(spans)] + [("global_caption_span", global_span)]
    for name, span in named:
        if span is not None and span[1] > num_text:
            raise ValueError(f"{name}={span} lies outside encoder_hidden_states of {num_text} tokens")
    parts = []
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
        parts.append(
            dispatch_attention_fn(
                query[:, start:end], k, v, dropout_p=0.0, is_causal=False, backend=processor._attention_backend
            )
        )
    return torch.cat(parts, dim=1)


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved-pair rotation, as in diffusers' WanAttnProcessor.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
