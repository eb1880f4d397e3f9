"""MoC routing: which chunks every query token attends to, per head (`docs/semantics.md` sections 2-4).

The result is compact: the routed chunk ids per query token and head `(B, H, L, S)` plus a chunk-level anchor mask
`(C, C)`. Scores are computed in query tiles, so nothing here is larger than `L x C` per head; only the test helper
[`dense_mask`] expands to `L x L`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MoCConfig
from .layout import ChunkLayout

__all__ = ["MoCRouting", "route", "chunk_means", "dense_mask"]

# Queries scored per step; bounds the transient (B, H, tile, C) score tensor.
_ROUTE_TILE = 8192


@dataclass
class MoCRouting:
    r"""
    The attended set of every query token, per head, in compact form.

    Attributes:
        layout (`ChunkLayout`): the layout routed over.
        selected (`torch.LongTensor` of shape `(B, H, L, S)`): routed (non-mandatory) chunk ids of each query,
            `-1` in unused slots. `S` is `min(top_k, C)` plus room for drop-in extras.
        anchors (`torch.BoolTensor` of shape `(C, C)`): `anchors[a, c]` is True when chunk `c` is a mandatory
            anchor of queries in chunk `a`.
    """

    layout: ChunkLayout
    selected: torch.Tensor
    anchors: torch.Tensor

    def chunk_mask(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """`(B, H, end - start, C)` bool: the chunks attended by queries `start:end`."""
        sel = self.selected[:, :, start:end]
        B, H, T, _ = sel.shape
        C = self.layout.num_chunks
        tok_chunk = self.layout.token_chunks(sel.device)[start:end]
        return self.anchors[tok_chunk].expand(B, H, T, C) | _selected_mask(sel, C)

    def attended_tokens(self) -> torch.Tensor:
        """`(B, H, L)` long: how many key tokens each query attends to."""
        sizes = self.layout.chunk_sizes(self.selected.device)
        out = []
        for start in range(0, self.layout.num_tokens, _ROUTE_TILE):
            out.append((self.chunk_mask(start, start + _ROUTE_TILE).long() * sizes).sum(-1))
        return torch.cat(out, dim=-1)

    def density(self) -> float:
        """Fraction of the `L x L` query-key pairs that are attended (1.0 is dense)."""
        L = self.layout.num_tokens
        return self.attended_tokens().double().mean().item() / L


def _selected_mask(selected: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """`(..., S)` chunk ids (-1 = empty slot) -> `(..., C)` bool: which chunks the slots hold."""
    # Empty slots write into an extra column that is dropped.
    mask = torch.zeros(*selected.shape[:-1], num_chunks + 1, dtype=torch.bool, device=selected.device)
    mask.scatter_(-1, selected % (num_chunks + 1), True)
    return mask[..., :num_chunks]


def chunk_means(k: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    r"""Mean-pooled keys per chunk: `(B, L, H, D) -> (B, C, H, D)`, at least float32 (the chunk descriptors)."""
    B, L, H, D = k.shape
    tok_chunk = layout.token_chunks(k.device)
    work = torch.promote_types(k.dtype, torch.float32)
    sums = torch.zeros(B, layout.num_chunks, H, D, device=k.device, dtype=work)
    sums.index_add_(1, tok_chunk, k.to(work))
    return sums / layout.chunk_sizes(k.device).to(work)[None, :, None, None]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, layout: ChunkLayout) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be shaped (B, L, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"MoC self-attention needs q and k of one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] != layout.num_tokens:
        raise ValueError(
            f"the layout covers {layout.num_tokens} tokens but the sequence has {q.shape[1]} tokens "
            "(chunk sizes must sum to the sequence length)"
        )


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: ChunkLayout,
    config: MoCConfig,
    *,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> MoCRouting:
    r"""
    Route every query token, per head, to its chunks (`docs/semantics.md` section 2).

    Args:
        q, k (`torch.Tensor` of shape `(B, L, H, D)`): queries and keys as the attention uses them (after QK-norm
            and RoPE).
        layout (`ChunkLayout`): the chunks of the sequence.
        config (`MoCConfig`): routing settings.
        training (`bool`, defaults to `False`): apply context drop-off / drop-in (`config.drop_off`, `config.drop_in`).
        generator (`torch.Generator`, *optional*): random source for drop-off / drop-in, on `q.device`.

    Returns:
        [`MoCRouting`]
    """
    _check_inputs(q, k, layout)
    B, L, H, D = q.shape
    device = q.device
    C = layout.num_chunks
    anchors = layout.anchor_mask(config.local_window, config.anchor_own_shot, config.text_anchors, device)
    cands = layout.candidate_mask(
        config.local_window, config.anchor_own_shot, config.text_anchors, config.causal, device
    )
    n_slots = min(config.top_k, C)
    tok_chunk = layout.token_chunks(device)

    with torch.no_grad():  # hard top-k: no gradient flows through routing
        phi = chunk_means(k.detach(), layout)
        if config.route_by == "block":
            token_block, block_chunk = layout.token_blocks(config.block_size, device)
            G = block_chunk.numel()
            q_units = torch.zeros(B, G, H, D, device=device, dtype=phi.dtype)
            q_units.index_add_(1, token_block, q.detach().to(phi.dtype))
            counts = torch.bincount(token_block, minlength=G).to(phi.dtype)
            q_units /= counts[None, :, None, None]
            unit_chunk = block_chunk
        else:
            q_units, unit_chunk = q.detach(), tok_chunk

        U = q_units.shape[1]
        selected = torch.empty(B, H, U, n_slots, dtype=torch.long, device=device)
        for start in range(0, U, _ROUTE_TILE):
            end = min(start + _ROUTE_TILE, U)
            scores = torch.einsum("bthd,bchd->bhtc", q_units[:, start:end].to(phi.dtype), phi)
            allowed = cands[unit_chunk[start:end]]
            scores.masked_fill_(~allowed, float("-inf"))
            # Stable descending sort: among equal scores the earlier chunk wins (spec: ties go to the earlier chunk).
            values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
            values, order = values[..., :n_slots], order[..., :n_slots]
            selected[:, :, start:end] = torch.where(torch.isneginf(values), -1, order)
        if config.route_by == "block":
            selected = selected[:, :, token_block]

        if training and (config.drop_off > 0 or config.drop_in > 0):
            selected = _regularise(selected, cands[tok_chunk], config, generator)
    return MoCRouting(layout=layout, selected=selected, anchors=anchors)


def _regularise(
    selected: torch.Tensor, allowed: torch.Tensor, config: MoCConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Context drop-off and drop-in (`docs/semantics.md` section 3); anchors are untouched."""
    B, H, L, S = selected.shape
    C = allowed.shape[-1]
    device = selected.device
    if config.drop_off > 0 and S > 0:
        p = torch.rand(B, H, L, 1, device=device, generator=generator) * config.drop_off
        n_drop = torch.floor(p * config.top_k).long()
        valid = selected >= 0
        keys = torch.rand(B, H, L, S, device=device, generator=generator).masked_fill(~valid, 2.0)
        rank = keys.argsort(-1).argsort(-1)  # random order among the valid slots first
        selected = selected.masked_fill((rank < n_drop) & valid, -1)
    if config.drop_in > 0:
        rate = torch.full((B, H, L), float(config.drop_in), device=device)
        m = torch.poisson(rate, generator=generator).long()
        m_max = int(m.max().item()) if m.numel() else 0
        if m_max > 0:
            eligible = allowed.expand(B, H, L, C) & ~_selected_mask(selected, C)
            keys = torch.rand(B, H, L, C, device=device, generator=generator).masked_fill(~eligible, -1.0)
            vals, idx = keys.topk(min(m_max, C), dim=-1)
            keep = (vals >= 0) & (torch.arange(idx.shape[-1], device=device) < m[..., None])
            selected = torch.cat([selected, torch.where(keep, idx, -1)], dim=-1)
    return selected


def dense_mask(
    q: torch.Tensor, k: torch.Tensor, layout: ChunkLayout, config: MoCConfig, **route_kwargs
) -> torch.Tensor:
    r"""
    Test helper: the boolean `(B, H, L, L)` set of attended query-key pairs. Materialises `L x L`; small inputs only.
    """
    routing = route(q, k, layout, config, **route_kwargs)
    return expand_routing(routing)


def expand_routing(routing: MoCRouting) -> torch.Tensor:
    """`(B, H, L, L)` bool token-pair mask of a routing (test and reference use only)."""
    tok_chunk = routing.layout.token_chunks(routing.selected.device)
    return routing.chunk_mask()[..., tok_chunk]
