"""MoC processor for Wan-Animate-2 (`WanAnimate2Transformer3DModel`): the generation pass's in-context self-attention
routed over the generated video, each frame's reference frame a mandatory anchor.

Wan-Animate-2 runs two kinds of forward. The reference pass (`kv_cache_mode="extract"`, once per segment) encodes the
driving video with dense self-attention and caches every layer's keys and values. Each denoising forward
(`kv_cache_mode="cached"`) then attends, through a flex `BlockMask` built by `create_mask`, a packed key buffer
`[generation | reference]`: every generation query sees all generation keys, and a query of generation frame `f >= 1`
also the reference frame `f - 1` (frame 0, the reference image's slot, sees no reference). The buffer is built for the
mask's geometry (`origin_latent_frames + 1` generation and `origin_latent_frames` reference frames of
`origin_latent_hw` tokens each); slots the segment does not fill are zero keys and values that the mask still
attends.

MoC routes the generation queries over the generated video's chunks (latent frames, shots from [`moc_context`]) and
adds, as anchors outside routing, exactly what the mask adds: the aligned reference frame, and the zero slots (a zero
key scores 0 and carries a zero value, so it only weighs in the softmax's denominator, as in the stock call). MoC's
core attends one stream of queries over the same stream of keys, so the reference frames and the zero slots follow the
video as chunks of their own whose queries are zero and whose outputs are dropped; their anchors are set here, since
they are per frame, not per shot or caption. At full density the stock call runs, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2CrossAttnProcessor, _get_qkv_projections

from ..attention import moc_attention
from ..context import MoCContext, current_moc_context
from ..layout import GLOBAL_SHOT, ChunkLayout
from ..recording import active_routing_map
from ..routing import MoCRouting, route
from .base import MoCAttnProcessorBase, MoCForwardFacts, MoCHook, forward_facts, patch_sizes

__all__ = ["InContextFacts", "MoCWanAnimate2AttnProcessor", "WanAnimate2Hook"]

_MODEL = "WanAnimate2Transformer3DModel"
# Positions of the forward's arguments (`WanAnimate2Transformer3DModel.forward`).
_HIDDEN_STATES, _MODE, _REFERENCE_GRID = 0, 5, 9


@dataclass(frozen=True)
class InContextFacts(MoCForwardFacts):
    r"""
    [`MoCForwardFacts`] of a Wan-Animate-2 forward.

    Attributes:
        reference (`tuple[int, int, int]`, *optional*): the reference frames' post-patchify `(frames, height, width)`
            (the forward's `reference_grid_sizes`) in the generation pass; `None` in the reference pass, whose `grid`
            is the driving video's.
    """

    reference: tuple[int, int, int] | None = None


class WanAnimate2Hook(MoCHook):
    r"""
    The [`MoCHook`] of Wan-Animate-2: the facts of a generation pass hold the reference grid too (read off
    `reference_grid_sizes` on the host, as the stock forward reads it); those of a reference pass hold its grid only,
    with no shots, since [`moc_context`] describes the generated video and that pass stays dense.
    """

    def compute_facts(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> InContextFacts | None:
        processor = self.processor
        mode = processor._call_arg(args, kwargs, "kv_cache_mode", _MODE)
        if mode not in ("extract", "cached"):
            return None  # the model's forward raises, naming the mode
        grid = processor.input_grid(module, args, kwargs)
        if mode == "extract":
            facts, reference = forward_facts(grid, MoCContext(), None, False), None
        else:
            facts = forward_facts(grid, current_moc_context(), processor.config.chunk_tokens, module.training)
            if facts.context.caption_shots is not None:
                raise ValueError(
                    f"the MoC context has per-shot caption segments (caption_shots), which {_MODEL} has no place for "
                    "in its self-attention stream (its caption is attended through cross-attention)"
                )
            reference = _reference_grid(processor._call_arg(args, kwargs, "reference_grid_sizes", _REFERENCE_GRID))
        return InContextFacts(
            facts.grid, facts.layout, facts.context, facts.regularise, facts.prefix_tokens, reference=reference
        )


def _reference_grid(grid_sizes: torch.Tensor | None) -> tuple[int, int, int]:
    if grid_sizes is None:
        raise ValueError(f"{_MODEL}'s generation pass (kv_cache_mode='cached') needs `reference_grid_sizes`")
    grids = {tuple(int(n) for n in row) for row in grid_sizes.tolist()}
    if len(grids) != 1:
        # The stock rotary embedding rotates each sample's cached reference with its own grid; MoC routes one layout.
        raise ValueError(f"MoC routes one layout per batch, but this {_MODEL} call has reference grids {sorted(grids)}")
    return grids.pop()


def _rope(x: torch.Tensor, grid: tuple[int, int, int], freqs: torch.Tensor, stride: int) -> torch.Tensor:
    r"""
    diffusers' `rope_apply` of Wan-Animate-2 for a batch whose samples share one grid, given as ints: the same
    elementwise operations, without reading a grid tensor on the host (so the blocks compile whole).
    """
    frames, height, width = grid
    batch, _, heads, dim = x.shape
    half = dim // 2
    time, rows, columns = freqs.split([half - 2 * (half // 3), half // 3, half // 3], dim=1)
    tokens = frames * height * width
    table = torch.cat(
        [
            time[: frames * stride : stride].view(frames, 1, 1, -1).expand(frames, height, width, -1),
            rows[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
            columns[:width].view(1, 1, width, -1).expand(frames, height, width, -1),
        ],
        dim=-1,
    ).reshape(tokens, 1, -1)
    rotated = torch.view_as_complex(x[:, :tokens].to(torch.float64).reshape(batch, tokens, heads, -1, 2))
    rotated = torch.view_as_real(rotated * table).flatten(3)
    return torch.cat([rotated, x[:, tokens:]], dim=1).float()


@dataclass(frozen=True)
class _Geometry:
    """The geometry the block mask is built for (`origin_*`) and the one of this call, in tokens."""

    frames: int  # generation latent frames of the call
    frame_tokens: int
    reference_frames: int
    reference_tokens: int  # per reference frame
    mask_frames: int  # `origin_latent_frames`: reference frames of the mask (generation: one more)
    mask_tokens: int  # `origin_latent_hw`: tokens per frame of the mask

    @property
    def zero_slots(self) -> int:
        """Generation slots of the mask the call leaves empty: zero keys every generation query attends."""
        return (self.mask_frames + 1) * self.mask_tokens - self.frames * self.frame_tokens

    def check(self) -> None:
        """Raise unless the call fits the mask's buffers, as the stock packing needs (it would fail or drop
        tokens)."""
        fits = {
            "generation latent frames": (self.frames, self.mask_frames + 1),
            "generation tokens per frame": (self.frame_tokens, self.mask_tokens),
            "reference latent frames": (self.reference_frames, self.mask_frames),
            "reference tokens per frame": (self.reference_tokens, self.mask_tokens),
        }
        for what, (have, most) in fits.items():
            if have > most:
                raise ValueError(
                    f"{_MODEL}'s block mask (origin_len, origin_area) holds {most} {what}, but this call has {have}"
                )


@dataclass(frozen=True)
class _InContextStream:
    r"""
    The stream MoC attends in a generation pass: `[generation | reference frames | zero slots]`, each reference frame
    padded to the mask's frame size (as the stock buffer holds it), the zero slots one chunk (absent when none).

    Attributes:
        layout (`ChunkLayout`): the generation chunks (video, with their shots), then one text chunk per reference
            frame of the mask and the zero slots' chunk.
        chunk_frames (`tuple[int, ...]`): the generation latent frame of each generation chunk.
        zero_chunk (`bool`): whether the last chunk holds the zero slots.
    """

    layout: ChunkLayout
    chunk_frames: tuple[int, ...]
    zero_chunk: bool
    _tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @property
    def generation_chunks(self) -> int:
        return len(self.chunk_frames)

    def anchors(self, generation: torch.Tensor) -> torch.Tensor:
        r"""`(C, C)` bool: the generation chunks' anchors among themselves (`generation`, from the routing settings)
        plus the mask's: a generation chunk of frame `f >= 1` anchors reference frame `f - 1`, every generation chunk
        the zero slots; the other chunks anchor only themselves (their queries are zero, their outputs dropped)."""
        G = self.generation_chunks
        fixed = self._fixed(generation.device)
        return fixed | F.pad(generation.to(torch.uint8), (0, fixed.shape[1] - G, 0, fixed.shape[0] - G)).bool()

    def _fixed(self, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._build(device)
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = self._build(device)
        return self._tensors[key]

    def _build(self, device: torch.device) -> torch.Tensor:
        C, G = self.layout.num_chunks, self.generation_chunks
        columns = torch.arange(C, device=device)
        aligned = G + torch.tensor(self.chunk_frames, device=device) - 1  # frame 0 points before the reference
        generation = (columns[None, :] == aligned[:, None]) & (aligned[:, None] >= G)
        if self.zero_chunk:
            generation |= columns[None, :] == C - 1
        return torch.cat([generation, columns[G:, None] == columns[None, :]], dim=0)


def _build_stream(generation: ChunkLayout, geometry: _Geometry) -> _InContextStream:
    frame_tokens = geometry.frame_tokens
    chunk_frames = []
    for start, size in zip(generation.offsets, generation.sizes):
        first, last = start // frame_tokens, (start + size - 1) // frame_tokens
        if first != last:
            raise NotImplementedError(
                f"a MoC chunk of {size} tokens spans latent frames {first} to {last}; on {_MODEL} each generation "
                "frame anchors its own reference frame, so chunks must not span frames: use `chunk_tokens` of at "
                f"most one frame ({frame_tokens} tokens) or None"
            )
        chunk_frames.append(first)
    zeros = geometry.zero_slots
    extra = [geometry.mask_tokens] * geometry.mask_frames + ([zeros] if zeros else [])
    layout = ChunkLayout.concat(generation, ChunkLayout.for_captions(extra, [GLOBAL_SHOT] * len(extra)))
    return _InContextStream(layout, tuple(chunk_frames), zeros > 0)


_cached_stream = lru_cache(maxsize=64)(_build_stream)


def _in_context_stream(generation: ChunkLayout, geometry: _Geometry) -> _InContextStream:
    if torch.compiler.is_compiling():
        return _build_stream(generation, geometry)
    return _cached_stream(generation, geometry)


def _reference_slots(x: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """The reference frames' `(B, R * hw_r, H, D)` keys or values in the mask's frame slots: each frame padded to the
    mask's frame size and zero frames after them, as the stock buffer holds them."""
    batch, _, heads, dim = x.shape
    frames, tokens = geometry.reference_frames, geometry.reference_tokens
    x = x[:, : frames * tokens].view(batch, frames, tokens, heads, dim)
    x = F.pad(x, (0, 0, 0, 0, 0, geometry.mask_tokens - tokens, 0, geometry.mask_frames - frames))
    return x.reshape(batch, geometry.mask_frames * geometry.mask_tokens, heads, dim)


def _stock_in_context(query, key, value, key_ref, value_ref, attention_mask, geometry: _Geometry, parallel_config):
    """The stock generation-pass attention (`WanAnimate2AttnProcessor`, `kv_cache_mode="cached"`), operation for
    operation: the packed `[generation | reference]` buffers attended through the block mask on the flex backend."""
    frames, hw, ref_frames, ref_hw = (
        geometry.frames, geometry.frame_tokens, geometry.reference_frames, geometry.reference_tokens
    )  # fmt: skip
    origin_latent_frames, origin_latent_hw = geometry.mask_frames, geometry.mask_tokens
    valid_length, ref_valid_length = frames * hw, ref_frames * ref_hw
    batch_size, _, heads, head_dim = query.shape
    packed_length = math.ceil((origin_latent_frames + 1) * origin_latent_hw / 128) * 128
    packed_ref_length = math.ceil(origin_latent_frames * origin_latent_hw / 128) * 128

    query_packed = query.new_zeros(batch_size, packed_length, heads, head_dim)
    key_packed = key.new_zeros(batch_size, packed_length + packed_ref_length, heads, head_dim)
    value_packed = value.new_zeros(batch_size, packed_length + packed_ref_length, heads, head_dim)
    generation = slice(0, frames * origin_latent_hw)
    shape, ref_shape = (batch_size, frames, origin_latent_hw, heads, head_dim), (batch_size, ref_frames)
    for packed, x in ((query_packed, query), (key_packed, key), (value_packed, value)):
        packed[:, generation].view(*shape)[:, :, :hw] = x[:, :valid_length].view(batch_size, frames, hw, heads, -1)
    reference = slice(packed_length, packed_length + ref_frames * origin_latent_hw)
    for packed, x in ((key_packed, key_ref), (value_packed, value_ref)):
        packed[:, reference].view(*ref_shape, origin_latent_hw, heads, head_dim)[:, :, :ref_hw] = x[
            :, :ref_valid_length
        ].view(*ref_shape, ref_hw, heads, head_dim)

    hidden_states = dispatch_attention_fn(
        query_packed,
        key_packed,
        value_packed,
        attn_mask=attention_mask,
        backend=AttentionBackendName.FLEX,
        parallel_config=parallel_config,
    )
    hidden_states = (
        hidden_states[:, generation].view(*shape)[:, :, :hw].reshape(batch_size, valid_length, heads, head_dim)
    )
    # Padded query positions are not attended and pass through unchanged.
    return torch.cat([hidden_states, query[:, valid_length:]], dim=1)


class MoCWanAnimate2AttnProcessor(MoCAttnProcessorBase):
    r"""
    diffusers' `WanAnimate2AttnProcessor` (the self-attention of `WanAnimate2Transformer3DModel`) with MoC in its
    generation pass.

    - Reference pass (`kv_cache_mode="extract"`): stock, dense. It runs once per segment, and the keys and values it
      caches condition every denoising step.
    - Generation pass (`kv_cache_mode="cached"`): the generation queries are routed over the generated video's chunks
      (one per latent frame, the reference image's slot frame 0, or `chunk_tokens` pieces of a frame; shots from
      [`moc_context`]), the rest of what the stock block mask attends mandatory anchors: the reference frame aligned
      with the query's frame (`f - 1` for generation frame `f >= 1`; frame 0 has none) and the zero slots of the mask's
      buffer that the segment leaves empty. The other reference frames stay masked, as in the stock call. At full
      density the stock flex call runs (bit for bit). Chunks that span several latent frames (`chunk_tokens` above one
      frame) are refused: a chunk's reference anchor is per frame.

    Projections, norms and rotary embeddings are the stock ones; the rotary embedding is applied from the grid
    `apply_moc`'s hook computed (ints), so the blocks compile whole (`compile_repeated_blocks(fullgraph=True)`), which
    the stock processor, reading its grid tensors on the host, does not. Install with [`apply_moc`]; diffusers has no
    context-parallel plan for this model, and MoC refuses one.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    hook_class = WanAnimate2Hook

    @staticmethod
    def stock_processor(module: torch.nn.Module):
        """The dense diffusers processor of `module` (for [`remove_moc`])."""
        from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2AttnProcessor

        return WanAnimate2CrossAttnProcessor() if module.is_cross_attention else WanAnimate2AttnProcessor()

    def input_grid(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """Post-patchify `(frames, height, width)` of the pass's latents (`hidden_states`, a list of `(C, T, H, W)`)."""
        self.refuse_context_parallel(_MODEL)
        latents = self._call_arg(args, kwargs, "hidden_states", _HIDDEN_STATES)
        shapes = sorted({tuple(x.shape[-3:]) for x in latents})
        if len(shapes) != 1:
            raise ValueError(f"MoC routes one layout per batch, but this {_MODEL} call has latents shaped {shapes}")
        frames, height, width = shapes[0]
        p_t, p_h, p_w = patch_sizes(transformer)
        return frames // p_t, height // p_h, width // p_w

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        rotary_emb: torch.Tensor,
        grid_sizes: torch.Tensor,
        kv_cache,
        kv_cache_mode: str,
        rope_stride: int = 1,
        reference_rotary_emb: torch.Tensor | None = None,
        reference_grid_sizes: torch.Tensor | None = None,
        reference_rope_stride: int = 1,
        attention_mask=None,
        origin_latent_frames: int | None = None,
        origin_latent_hw: int | None = None,
    ) -> torch.Tensor:
        if kv_cache_mode not in ("extract", "cached"):
            raise ValueError(f"`kv_cache_mode` must be either 'extract' or 'cached', got {kv_cache_mode}.")
        self.refuse_context_parallel(_MODEL)
        facts = self.forward_facts(attn)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if kv_cache_mode == "extract":
            kv_cache.store(key, value)  # before the rotary embedding, as the stock processor caches them
        # `_rope` computes in float64 and returns float32; attention runs in the model dtype.
        query = _rope(query, facts.grid, rotary_emb, rope_stride).type_as(value)
        key = _rope(key, facts.grid, rotary_emb, rope_stride).type_as(value)
        if kv_cache_mode == "extract":
            hidden_states = dispatch_attention_fn(
                query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
            )
        else:
            if origin_latent_frames is None or origin_latent_hw is None:
                raise ValueError(f"{_MODEL}'s generation pass needs its block mask's origin_len and origin_area")
            key_ref, value_ref = kv_cache.get()
            key_ref = _rope(key_ref, facts.reference, reference_rotary_emb, reference_rope_stride).type_as(value)
            geometry = _Geometry(
                facts.grid[0], facts.tokens_per_frame, facts.reference[0], facts.reference[1] * facts.reference[2],
                int(origin_latent_frames), int(origin_latent_hw),
            )  # fmt: skip
            geometry.check()  # also at full density, where the stock packing would fail or drop tokens
            if self._dense_here(facts):
                hidden_states = _stock_in_context(
                    query, key, value, key_ref, value_ref, attention_mask, geometry, self._parallel_config
                )
            else:
                hidden_states = self._routed(attn, facts, geometry, query, key, value, key_ref, value_ref)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def _dense_here(self, facts: InContextFacts) -> bool:
        """Whether every generation query attends every generation chunk: not causal, `top_k` covers every other
        chunk, no drop-off, and no routing map recording. MoC is then the stock attention, which runs."""
        config = self.config
        dropping = facts.regularise and config.drop_off > 0
        everything = not config.causal and config.top_k >= facts.layout.num_chunks - 1
        return everything and not dropping and active_routing_map() is None

    def _routed(self, attn, facts: InContextFacts, geometry: _Geometry, query, key, value, key_ref, value_ref):
        """MoC over `[generation | reference frames | zero slots]`: the generation queries routed among the generated
        video's chunks, the mask's other keys their anchors; `(B, L, H, D)` outputs of the generation queries."""
        stream = _in_context_stream(facts.layout, geometry)
        generation = route(query, key, facts.layout, self.config, training=facts.regularise)
        self._record(attn, facts, generation)
        batch, length, heads, _ = query.shape
        extra = stream.layout.num_tokens - length
        slots = generation.selected.shape[-1]
        selected = torch.cat([generation.selected, generation.selected.new_full((batch, heads, extra, slots), -1)], 2)
        routing = MoCRouting(stream.layout, selected, stream.anchors(generation.anchors))

        def keys(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
            zeros = x.new_zeros(batch, geometry.zero_slots, heads, x.shape[-1])
            return torch.cat([x, _reference_slots(reference.to(x.dtype), geometry), zeros], dim=1)

        stream_query = torch.cat([query, query.new_zeros(batch, extra, heads, query.shape[-1])], dim=1)
        out = moc_attention(
            stream_query, keys(key, key_ref), keys(value, value_ref), stream.layout, self.config, routing=routing
        )
        return out[:, :length]

    def _record(self, attn, facts: InContextFacts, routing: MoCRouting) -> None:
        """Add the routing among the generated video's frames to the active routing map (reference anchors aside)."""
        recorder = active_routing_map()
        if recorder is not None:
            self.record_routing(recorder, attn, facts, routing)
