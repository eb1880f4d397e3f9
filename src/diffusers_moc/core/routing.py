"""MoC routing: which chunks every query token attends to, per head (`docs/semantics.md` sections 2-4).

The result is compact: the routed chunk ids per query token and head `(B, H, L, S)` plus a chunk-level anchor mask
`(C, C)`. Scores are computed in query tiles, so nothing here is larger than `L x C` per head; only the test helper
[`expand_routing`] expands to `L x L` (the reference backend's mask).

Routing is plain torch with shapes fixed by the layout and the config: no host reads (`.item()`, `bool(tensor)`,
`nonzero`) and no data-dependent shapes, so `torch.compile(fullgraph=True)` and `torch.export` trace it whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import MoCConfig
from .layout import ChunkLayout

__all__ = ["MoCRouting", "route", "chunk_means", "drop_in_slots", "expand_routing"]

# Queries scored per step; bounds the transient (B, H, tile, C) score tensor.
_ROUTE_TILE = 8192
# Up to this many routed slots, selection takes one argmax per slot instead of a sort (measured faster on CPU).
_ARGMAX_SLOTS = 8
# Elements of one (B, chunks, size, H, D) working copy of the keys when computing chunk means; bounds that transient.
_MEAN_TILE_ELEMS = 1 << 24
# Drop-in draws `m ~ Poisson(drop_in)` extra chunks per query, capped at the smallest `M` with
# `P(Poisson(drop_in) > M) <= _DROP_IN_TAIL`, so that the routing has a static number of slots.
_DROP_IN_TAIL = 1e-12
# Two primes below 2**31 for the descriptor fingerprints of `_canonical_chunks` (products stay below 2**62).
_PRIMES = (2147483629, 2147483587)


@dataclass
class MoCRouting:
    r"""
    The attended set of every query token, per head, in compact form.

    Attributes:
        layout (`ChunkLayout`): the layout routed over.
        selected (`torch.LongTensor` of shape `(B, H, L, S)`): routed (non-mandatory) chunk ids of each query,
            `-1` in unused slots. `S` is `min(top_k, C)` plus, in training, room for drop-in extras
            ([`drop_in_slots`]).
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
        """Fraction of the `L x L` query-key pairs that are attended (1.0 is dense). Reads the result to the host."""
        L = self.layout.num_tokens
        return self.attended_tokens().double().mean().item() / L


def _selected_mask(selected: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """`(..., S)` chunk ids (-1 = empty slot) -> `(..., C)` bool: which chunks the slots hold."""
    # Empty slots write into an extra column that is dropped.
    mask = torch.zeros(*selected.shape[:-1], num_chunks + 1, dtype=torch.bool, device=selected.device)
    mask.scatter_(-1, selected % (num_chunks + 1), True)
    return mask[..., :num_chunks]


def drop_in_slots(drop_in: float, num_chunks: int) -> int:
    r"""
    The most drop-in extras one query can get: the smallest `M` with `P(Poisson(drop_in) > M) <= 1e-12`, at most
    `num_chunks`. Draws above `M` are capped at `M` (a truncated Poisson), which keeps the routing's shape static.
    """
    if drop_in <= 0:
        return 0
    term = cdf = math.exp(-drop_in)
    m = 0
    while 1.0 - cdf > _DROP_IN_TAIL and m < num_chunks:
        m += 1
        term *= drop_in / m
        cdf += term
    return min(m, num_chunks)


def _runs(layout: ChunkLayout) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive chunks of one size: `(first chunk, number of chunks, size)`. A video with one
    chunk per frame is one run; its chunks' keys are then one `(n, size)` view, no gather."""
    runs: list[tuple[int, int, int]] = []
    for c, size in enumerate(layout.sizes):
        if runs and runs[-1][2] == size and runs[-1][0] + runs[-1][1] == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, size)
        else:
            runs.append((c, 1, size))
    return runs


def chunk_means(k: torch.Tensor, layout: ChunkLayout, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""
    The chunk descriptors: mean-pooled keys per chunk, `(B, L, H, D) -> (B, C, H, D)`, at least float32.

    Computed so that chunks with identical keys get bitwise identical descriptors, whatever their sizes, the dtype
    and the device (`docs/semantics.md` section 2.5): a component on which all of a chunk's keys agree is taken as
    that value, exactly (a plain sum / n rounds differently for different n); the others are one fixed-order sum per
    chunk divided by its size, so chunks holding the same keys in the same order reduce identically.

    Args:
        k (`torch.Tensor` of shape `(B, L, H, D)`): the keys.
        layout (`ChunkLayout`): the chunks.
        padding_mask (`torch.BoolTensor` of shape `(B, L)`, *optional*): False marks padded tokens, which are
            left out of the means (a chunk without valid tokens gets 0).
    """
    return _descriptors(k, layout, padding_mask)[0]


def _descriptors(
    k: torch.Tensor, layout: ChunkLayout, padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`chunk_means`] and `(B, C)` bool, True where a chunk has no valid token in that sample."""
    B, L, H, D = k.shape
    work = torch.promote_types(k.dtype, torch.float32)
    offsets = layout.offsets
    means, empties = [], []
    for first_chunk, count, size in _runs(layout):
        # Tiles of whole chunks bound the transient copy in the working dtype.
        step = max(1, _MEAN_TILE_ELEMS // max(1, B * size * H * D))
        for c0 in range(first_chunk, first_chunk + count, step):
            n = min(step, first_chunk + count - c0)
            lo, hi = offsets[c0], offsets[c0 + n]
            x = k[:, lo:hi].to(work).view(B, n, size, H, D)
            first = x[:, :, :1]
            if padding_mask is None:
                valid, tokens, summed = None, None, x.sum(2)
            else:
                valid = padding_mask[:, lo:hi].view(B, n, size)
                # Padded keys take the first valid key's value for the min/max test (argmax: the first True).
                first = x.gather(2, valid.to(torch.uint8).argmax(2)[:, :, None, None, None].expand(B, n, 1, H, D))
                x = torch.where(valid[..., None, None], x, first)
                tokens = valid.sum(2)
                summed = torch.where(valid[..., None, None], x, 0.0).sum(2)
            # A component on which all (valid) keys agree is that value exactly: the mean of identical keys is the
            # key, whatever the chunk size (a plain sum / n rounds differently for different n).
            constant = x.amax(2) == x.amin(2)
            divisor = size if tokens is None else tokens.clamp(min=1)[..., None, None]
            mean = torch.where(constant, first[:, :, 0], summed / divisor)
            if tokens is not None:
                mean = torch.where((tokens > 0)[..., None, None], mean, 0.0)
            means.append(mean)
            empties.append(torch.zeros(B, n, dtype=torch.bool, device=k.device) if tokens is None else tokens == 0)
    return torch.cat(means, dim=1), torch.cat(empties, dim=1)


def _canonical_chunks(phi: torch.Tensor) -> torch.Tensor:
    r"""
    `(B, C, H, D)` descriptors -> `(B, H, C)` long: for each chunk, the first chunk whose descriptor equals it
    (itself when none earlier does). Routing scores every chunk through its canonical chunk's column, so equal
    descriptors get bitwise equal scores however the score matmul rounds each column.

    Equality is found through two integer fingerprints of the descriptor bits (exact, order-free arithmetic), then
    confirmed elementwise; `-0.0` counts as `0.0`, and a NaN descriptor equals no other.
    """
    B, C, H, D = phi.shape
    clean = torch.where(phi == 0, torch.zeros_like(phi), phi)  # -0.0 == 0.0: give both the same bits
    bits = clean.view(torch.int64 if phi.dtype == torch.float64 else torch.int32).to(torch.int64)
    gen_weights = torch.arange(1, D + 1, device=phi.device, dtype=torch.int64)
    same = torch.ones(B, H, C, C, dtype=torch.bool, device=phi.device)
    for i, p in enumerate(_PRIMES):
        # Weights 1..D scrambled differently per prime; `bits mod p` times a weight < p stays below 2**62.
        weights = (gen_weights * (7919 + 104729 * i)) % p + 1
        fingerprint = ((bits % p) * weights % p).sum(-1).transpose(1, 2)  # (B, H, C), < D * p
        same &= fingerprint[..., :, None] == fingerprint[..., None, :]
    first = same.to(torch.uint8).argmax(-1)  # (B, H, C): first chunk with the same fingerprint
    canonical = phi.gather(1, first.transpose(1, 2)[..., None].expand(B, C, H, D))
    confirmed = (canonical == phi).all(-1).transpose(1, 2)
    return torch.where(confirmed, first, torch.arange(C, device=phi.device))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, layout: ChunkLayout, padding_mask: torch.Tensor | None) -> None:
    if not isinstance(layout, ChunkLayout):
        raise TypeError(
            f"layout must be one ChunkLayout shared by the whole batch, got {type(layout).__name__}; for captions "
            "of different lengths per sample, give the longest layout and mark the padding with `padding_mask`"
        )
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be shaped (B, L, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"MoC self-attention needs q and k of one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    if q.shape[1] != layout.num_tokens:
        raise ValueError(
            f"the layout covers {layout.num_tokens} tokens but the sequence has {q.shape[1]} tokens "
            "(chunk sizes must sum to the sequence length)"
        )
    if padding_mask is not None and (padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != q.shape[:2]):
        raise ValueError(
            f"padding_mask must be a bool tensor shaped (B, L) = {tuple(q.shape[:2])}, got "
            f"{tuple(padding_mask.shape)} of {padding_mask.dtype}"
        )


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: ChunkLayout,
    config: MoCConfig,
    *,
    training: bool = False,
    generator: torch.Generator | None = None,
    padding_mask: torch.Tensor | None = None,
    head_shard: tuple[int, int] | None = None,
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
        padding_mask (`torch.BoolTensor` of shape `(B, L)`, *optional*): False marks padded tokens (e.g. caption
            padding), left out of the chunk means; a chunk with no valid token in a sample is never routed to.
        head_shard (`tuple[int, int]`, *optional*): `(first, total)`: the `H` heads given are heads
            `first : first + H` of a model with `total` heads (Ulysses context parallelism). Drop-off and drop-in
            then draw for all `total` heads and keep this slice, so that every head draws what it draws on one
            device with the same generator state, whatever the number of ranks.

    Returns:
        [`MoCRouting`]
    """
    _check_inputs(q, k, layout, padding_mask)
    _check_head_shard(head_shard, q.shape[2])
    B, L, H, D = q.shape
    device = q.device
    C = layout.num_chunks
    anchors = layout.anchor_mask(config.local_window, config.anchor_own_shot, config.text_anchors, device)
    cands = layout.candidate_mask(
        config.local_window, config.anchor_own_shot, config.text_anchors, config.causal, device
    )
    n_slots = min(config.top_k, C)
    tok_chunk = layout.token_chunks(device)
    # Descriptors and scores in float32 (float64 inputs: float64).
    score_dtype = torch.promote_types(q.dtype, torch.float32)

    with torch.no_grad():  # hard top-k: no gradient flows through routing
        phi, empty = _descriptors(k.detach(), layout, padding_mask)
        canonical = _canonical_chunks(phi)[:, :, None, :]  # (B, H, 1, C)
        q_units, unit_chunk = _query_units(q.detach(), layout, config, padding_mask, score_dtype)
        U = q_units.shape[1]
        selected = torch.empty(B, H, U, n_slots, dtype=torch.long, device=device)
        lowest = torch.finfo(score_dtype).min
        for start in range(0, U, _ROUTE_TILE):
            end = min(start + _ROUTE_TILE, U)
            scores = torch.einsum("bthd,bchd->bhtc", q_units[:, start:end].to(score_dtype), phi)
            scores = scores.gather(-1, canonical.expand(B, H, end - start, C))
            blocked = ~cands[unit_chunk[start:end]]
            if padding_mask is not None:
                blocked = blocked | empty[:, None, None, :]
            # NaN (and -inf) scores rank below every finite score but above non-candidates (-inf), so a slot never
            # holds a non-candidate, nor one chunk twice.
            scores = scores.nan_to_num_(nan=lowest, neginf=lowest).masked_fill_(blocked, float("-inf"))
            selected[:, :, start:end] = _top_slots(scores, n_slots)
        if config.route_by == "block":
            token_block, _ = layout.token_blocks(config.block_size, device)
            selected = selected[:, :, token_block]

        if training and (config.drop_off > 0 or config.drop_in > 0):
            allowed = cands[tok_chunk][None, None]
            if padding_mask is not None:
                allowed = allowed & ~empty[:, None, None, :]
            selected = _regularise(selected, allowed, config, generator, head_shard)
    return MoCRouting(layout=layout, selected=selected, anchors=anchors)


def _top_slots(scores: torch.Tensor, n_slots: int) -> torch.Tensor:
    """The `n_slots` highest-scoring chunks in descending order, the earlier chunk first among equal scores (spec:
    ties go to the earlier chunk), `-1` for slots left without a candidate (score `-inf`). Overwrites `scores`."""
    if n_slots > _ARGMAX_SLOTS:
        # A stable descending sort keeps equal scores in chunk order.
        values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        values, order = values[..., :n_slots], order[..., :n_slots]
        return torch.where(torch.isneginf(values), -1, order)
    # Few slots: one argmax per slot is cheaper than a sort; argmax returns the first of equal maxima.
    slots = []
    # A taken chunk gets -inf from a tensor, not a scalar: under deterministic algorithms inductor calls aten's scatter,
    # and AOTInductor's C++ wrapper writes a scalar -inf there as the undeclared name `inf`.
    taken = scores.new_full((1,) * scores.ndim, float("-inf"))
    for _ in range(n_slots):
        best = scores.argmax(-1, keepdim=True)
        slots.append(torch.where(torch.isneginf(scores.gather(-1, best)), -1, best))
        scores.scatter_(-1, best, taken.expand(best.shape))
    return torch.cat(slots, dim=-1) if slots else scores.new_empty(*scores.shape[:-1], 0, dtype=torch.long)


def _query_units(
    q: torch.Tensor,
    layout: ChunkLayout,
    config: MoCConfig,
    padding_mask: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What routes: every query token (`route_by="token"`) or the mean query of each block, and its chunk."""
    if config.route_by != "block":
        return q, layout.token_chunks(q.device)
    B, L, H, D = q.shape
    token_block, block_chunk = layout.token_blocks(config.block_size, q.device)
    G = block_chunk.shape[0]
    weight = torch.ones(B, L, dtype=dtype, device=q.device) if padding_mask is None else padding_mask.to(dtype)
    sums = torch.zeros(B, G, H, D, device=q.device, dtype=dtype)
    sums.index_add_(1, token_block, q.to(dtype) * weight[..., None, None])
    counts = torch.zeros(B, G, device=q.device, dtype=dtype).index_add_(1, token_block, weight)
    return sums / counts.clamp(min=1)[..., None, None], block_chunk


def _check_head_shard(head_shard: tuple[int, int] | None, num_heads: int) -> None:
    if head_shard is None:
        return
    first, total = head_shard
    if not (0 <= first and first + num_heads <= total):
        raise ValueError(f"head_shard={head_shard!r} does not hold the {num_heads} heads given")


def _regularise(
    selected: torch.Tensor,
    allowed: torch.Tensor,
    config: MoCConfig,
    generator: torch.Generator | None,
    head_shard: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Context drop-off and drop-in (`docs/semantics.md` section 3); anchors are untouched. With `head_shard`,
    every draw covers all heads of the model and keeps this shard's (see [`route`])."""
    B, H, L, S = selected.shape
    C = allowed.shape[-1]
    device = selected.device
    first, total = (0, H) if head_shard is None else head_shard

    def draw(fn, *shape, **kw) -> torch.Tensor:
        # The whole model's heads, then this shard's: the generator advances as on one device.
        out = fn(B, total, *shape, device=device, generator=generator, **kw)
        return out if total == H else out[:, first : first + H]

    if config.drop_off > 0 and S > 0:
        p = draw(torch.rand, L, 1) * config.drop_off
        valid = selected >= 0
        # k is what this query actually routed to (min(top_k, candidates)), not top_k.
        n_drop = torch.floor(p * valid.sum(-1, keepdim=True)).long()
        keys = draw(torch.rand, L, S).masked_fill(~valid, 2.0)
        rank = keys.argsort(-1).argsort(-1)  # random order among the valid slots first
        selected = selected.masked_fill((rank < n_drop) & valid, -1)
    extra = drop_in_slots(config.drop_in, C)
    if extra > 0:
        rate = torch.full((B, total, L), float(config.drop_in), device=device)
        m = torch.poisson(rate, generator=generator)[:, first : first + H].long().clamp(max=extra)
        eligible = allowed.expand(B, H, L, C) & ~_selected_mask(selected, C)
        keys = draw(torch.rand, L, C).masked_fill(~eligible, -1.0)
        vals, idx = keys.topk(extra, dim=-1)
        keep = (vals >= 0) & (torch.arange(extra, device=device) < m[..., None])
        selected = torch.cat([selected, torch.where(keep, idx, -1)], dim=-1)
    return selected


def expand_routing(routing: MoCRouting) -> torch.Tensor:
    """`(B, H, L, L)` bool token-pair mask of a routing (the reference backend's; materialises `L x L`)."""
    tok_chunk = routing.layout.token_chunks(routing.selected.device)
    return routing.chunk_mask()[..., tok_chunk]
