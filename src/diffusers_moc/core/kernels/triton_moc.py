r"""The `triton` backend: fused MoC attention (forward, backward) for CUDA, in Triton.

Scheme: **masked union per query tile**.

1. *Plan* (torch ops on the GPU, `build_plan`, nothing of size `L x L`): every query token's attended chunks (its
   mandatory anchors plus its routed `selected` chunks) are packed into a per-token bitset over the chunks, `(B*H, L,
   ceil(C / 64))` int64. Inside each query chunk the tokens are reordered, when that helps, so that tokens with the
   same bitset sit next to each other (a stable radix sort on the bitset words, then on the chunk id), and the
   tokens are cut into tiles of `BLOCK_M` slots that never cross a chunk. For each `(batch*head, tile)` the
   **union** of the chunks its tokens attend is listed in a compact, `cu_seqlens`-style array (`cu`, `chunks`).
2. *Forward kernel*: one program per `(batch*head, tile)` loads its queries (gathered through the reordering),
   walks the tile's union list chunk by chunk and, inside a chunk, its keys in blocks of `BLOCK_N` (variable chunk
   sizes, tails masked). Each token tests its own bit for the chunk, so a token that does not attend a chunk of the
   union contributes nothing: the result is the exact token-level routing rule. Online softmax (base 2), fp32
   accumulation; returns the output and the log-sum-exp per token and head.
3. *Backward*: `delta = rowsum(dO * O)`; a `dq` kernel with the forward's structure; a `dk, dv` kernel with one
   program per `(batch*head, key block)` that walks the *transposed* lists (the tiles whose union contains the key
   block's chunk). Both recompute the probabilities from the saved log-sum-exp (FlashAttention-2 style), so nothing
   of the size of the attended pairs is stored, and no atomics are needed.

Programs are launched heaviest first (longest processing time order) because causal routing gives late chunks many
more candidates than early ones.

Why this scheme (and not MoBA's queries-gathered-per-key-chunk with a log-sum-exp merge): it needs no per
`(query, chunk)` partial outputs (at 180k tokens, 12 heads, D=128 and ~19 attended chunks per token those would be
~10 GB in bf16), no merge pass and no atomics, and one kernel launch does the whole forward. On video, neighbouring
tokens pick nearly the same chunks, so the union of a tile is close to each token's own set and the work is close to the
attended pairs. The reordering makes this hold also when the tokens of a region disagree but fall into a few groups
(e.g. foreground vs background): tokens with equal sets land in the same tiles.

Cost, measured on the plan alone (no GPU needed; `MoCTritonPlan.overfetch()` = computed / attended pairs;
`benchmarks/bench_plan_overfetch.py`, results in `benchmarks/results/`), Wan-style frames of 1560 tokens in 8 shots,
~15% density (`top_k=16` at 180k tokens), 128-token tiles: video-like inputs (smooth, low-rank content) 1.2 at 32k
tokens and 1.6 at 180k (1.4 with 64-token tiles; 2.0 without the reordering). **Worst case: iid random inputs**: every
token of a tile picks different chunks, the union of a tile approaches all `min(C, BLOCK_M * top_k)` candidates and
the work approaches that of chunk-causal dense attention (overfetch 3.2 at 180k): still exact, but no faster than
dense. Fixing that needs the rare (tile, chunk) pairs to be computed on compacted query rows (MoBA-style, merged by
log-sum-exp); not done yet. The named approximation `route_by="block"` with `block_size` a multiple of the tile size
makes every tile pure: overfetch exactly 1.0 on any input, random included.

fp32 runs with exact fp32 products (no tensor cores): correct everywhere, slow on GPU; use bf16 or fp16 there.

Host reads: in `build_plan`, `nonzero` of the tile unions (the size of the compact chunk lists) and, with
`reorder="auto"`, the computed and attended pair counts; in the backward, `nonzero` of the transposed lists; plus the
NaN check of `kernels/nan_guard.py` (one per forward and backward).

`triton` is imported here, at module import; `diffusers_moc` itself imports this module lazily (backend
`"triton"`), so the package works without Triton installed. On CPU the kernels run only under the Triton
interpreter (`TRITON_INTERPRET=1` set before Triton is imported), which the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..routing import MoCRouting
from .base import MoCKernel
from .nan_guard import sdpa_nan

__all__ = ["TRITON", "triton_kernel", "build_plan", "MoCTritonPlan"]

_LOG2E = 1.4426950408889634
# Bits per bitset word; int64 words keep the kernels' bit test to one load per token and chunk.
_WORD = 64


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _token_attends(BITS, bh, tok, row_ok, c, L, W):
    """Per token of a tile: does it attend chunk `c`? One int64 load per token."""
    word = tl.load(BITS + bh * L * W + (tok * W + c // 64), mask=row_ok, other=0)
    return ((word >> (c % 64).to(tl.int64)) & 1) != 0


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, BITS, PERM, TILE_START, TILE_END, CU, CHUNKS, OFFS, ORDER,
    sqb, sql, sqh, sob, sol, soh,
    H, L, T, W, qk_scale,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    work = tl.load(ORDER + tl.program_id(0))
    bh = work // T
    t = work % T
    b32 = bh // H
    h32 = bh % H
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    start = tl.load(TILE_START + t)
    end = tl.load(TILE_END + t)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tok = tl.load(PERM + bh.to(tl.int64) * L + rows, mask=row_ok, other=0).to(IDX)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < D
    dv_ok = dv < DV
    q = tl.load(
        Q + (b * sqb + h * sqh) + (tok[:, None] * sql + d[None, :]), mask=row_ok[:, None] & d_ok[None, :], other=0
    )

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite start: exp2(m_old - m_new) is never NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo = tl.load(CU + work)
    hi = tl.load(CU + work + 1)
    for j in range(lo, hi):
        c = tl.load(CHUNKS + j)
        attend = _token_attends(BITS, bh.to(tl.int64), tok, row_ok, c, L, W) & row_ok
        k0 = tl.load(OFFS + c)
        k1 = tl.load(OFFS + c + 1)
        for n0 in range(k0, k1, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < k1
            kb = K.load([b32, n0, h32, 0]).reshape(BLOCK_N, BLOCK_D)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
            s = tl.where(attend[:, None] & col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vb = V.load([b32, n0, h32, 0]).reshape(BLOCK_N, BLOCK_DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        OUT + (b * sob + h * soh) + (tok[:, None] * sol + dv[None, :]),
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    # Natural-log LSE per (b*h, token): m and l are in base 2.
    tl.store(LSE + bh.to(tl.int64) * L + tok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _delta_kernel(OUT, DO, DELTA, sob, sol, soh, sdb, sdl, sdh, H, L, DV, BLOCK: tl.constexpr, BLOCK_DV: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < L
    rows64 = rows.to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    mask = row_ok[:, None] & (dv < DV)[None, :]
    o = tl.load(OUT + (b * sob + h * soh) + (rows64[:, None] * sol + dv[None, :]), mask=mask, other=0).to(tl.float32)
    do = tl.load(DO + (b * sdb + h * sdh) + (rows64[:, None] * sdl + dv[None, :]), mask=mask, other=0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * L + rows64, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, BITS, PERM, TILE_START, TILE_END, CU, CHUNKS, OFFS, ORDER,
    sqb, sql, sqh, sdb, sdl, sdh,
    H, L, T, W, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    work = tl.load(ORDER + tl.program_id(0))
    bh = work // T
    t = work % T
    b32 = bh // H
    h32 = bh % H
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    bh64 = bh.to(tl.int64)
    start = tl.load(TILE_START + t)
    end = tl.load(TILE_END + t)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tok = tl.load(PERM + bh64 * L + rows, mask=row_ok, other=0).to(IDX)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < D
    dv_ok = dv < DV
    q = tl.load(
        Q + (b * sqb + h * sqh) + (tok[:, None] * sql + d[None, :]), mask=row_ok[:, None] & d_ok[None, :], other=0
    )
    do = tl.load(
        DO + (b * sdb + h * sdh) + (tok[:, None] * sdl + dv[None, :]), mask=row_ok[:, None] & dv_ok[None, :], other=0
    )
    lse2 = tl.load(LSE + bh64 * L + tok, mask=row_ok, other=0) * 1.4426950408889634
    delta = tl.load(DELTA + bh64 * L + tok, mask=row_ok, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = tl.load(CU + work)
    hi = tl.load(CU + work + 1)
    for j in range(lo, hi):
        c = tl.load(CHUNKS + j)
        attend = _token_attends(BITS, bh64, tok, row_ok, c, L, W) & row_ok
        k0 = tl.load(OFFS + c)
        k1 = tl.load(OFFS + c + 1)
        for n0 in range(k0, k1, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < k1
            kb = K.load([b32, n0, h32, 0]).reshape(BLOCK_N, BLOCK_D)
            vb = V.load([b32, n0, h32, 0]).reshape(BLOCK_N, BLOCK_DV)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
            p = tl.where(attend[:, None] & col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vb), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)
    tl.store(
        DQ + (b * sqb + h * sqh) + (tok[:, None] * sql + d[None, :]),
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV_, LSE, DELTA, BITS, PERM, TILE_START, TILE_END, CU_T, TILES, KB_START, KB_END, KB_CHUNK,
    ORDER,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh,
    H, L, C, NKB, W, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    work = tl.load(ORDER + tl.program_id(0))
    bh = work // NKB
    kb_id = work % NKB
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    c = tl.load(KB_CHUNK + kb_id)
    k_lo = tl.load(KB_START + kb_id)
    k_hi = tl.load(KB_END + kb_id)
    cols = k_lo + tl.arange(0, BLOCK_N)
    col_ok = cols < k_hi
    colsi = cols.to(IDX)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < D
    dv_ok = dv < DV
    kb = tl.load(
        K + (b * skb + h * skh) + (colsi[:, None] * skl + d[None, :]), mask=col_ok[:, None] & d_ok[None, :], other=0
    )
    vb = tl.load(
        V + (b * svb + h * svh) + (colsi[:, None] * svl + dv[None, :]), mask=col_ok[:, None] & dv_ok[None, :], other=0
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = tl.load(CU_T + bh * C + c)
    hi = tl.load(CU_T + bh * C + c + 1)
    for j in range(lo, hi):
        t = tl.load(TILES + j)
        start = tl.load(TILE_START + t)
        end = tl.load(TILE_END + t)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            tok = tl.load(PERM + bh64 * L + rows, mask=row_ok, other=0).to(IDX)
            attend = _token_attends(BITS, bh64, tok, row_ok, c, L, W) & row_ok
            qt = tl.load(
                Q + (b * sqb + h * sqh) + (tok[None, :] * sql + d[:, None]),
                mask=row_ok[None, :] & d_ok[:, None],
                other=0,
            )
            do = tl.load(
                DO + (b * sdb + h * sdh) + (tok[:, None] * sdl + dv[None, :]),
                mask=row_ok[:, None] & dv_ok[None, :],
                other=0,
            )
            lse2 = tl.load(LSE + bh64 * L + tok, mask=row_ok, other=0) * 1.4426950408889634
            delta = tl.load(DELTA + bh64 * L + tok, mask=row_ok, other=0)
            st = tl.dot(kb, qt, input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M): keys x queries
            pt = tl.where(col_ok[:, None] & attend[None, :], tl.exp2(st - lse2[None, :]), 0.0)
            dvacc += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(vb, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    tl.store(
        DK + (b * skb + h * skh) + (colsi[:, None] * skl + d[None, :]),
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=col_ok[:, None] & d_ok[None, :],
    )
    tl.store(
        DV_ + (b * svb + h * svh) + (colsi[:, None] * svl + dv[None, :]),
        dvacc.to(DV_.dtype.element_ty),
        mask=col_ok[:, None] & dv_ok[None, :],
    )


#: True when Triton was imported with `TRITON_INTERPRET=1`: the kernels then run on CPU tensors (tests only).
_INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------------------- planning
@dataclass
class MoCTritonPlan:
    r"""
    The compact work lists the kernels run on, built from a [`MoCRouting`] by [`build_plan`].

    Attributes:
        bits (`torch.LongTensor` of shape `(B*H, L, W)`): per token, the bitset of its attended chunks
            (anchors and routed), `W = ceil(C / 64)`.
        perm (`torch.IntTensor` of shape `(B*H, L)`): token at each slot; tiles are runs of slots.
        tile_start, tile_end (`torch.IntTensor` of shape `(T,)`): slot range of each query tile (same for all heads).
        tile_chunk (`torch.LongTensor` of shape `(T,)`): the query chunk of each tile.
        union (`torch.BoolTensor` of shape `(B*H, T, C)`): chunks attended by at least one token of a tile.
        cu (`torch.IntTensor` of shape `(B*H*T + 1,)`), chunks (`torch.IntTensor`): the union lists, packed.
        order (`torch.IntTensor` of shape `(B*H*T,)`): `(batch*head, tile)` work items, heaviest first.
        offsets (`torch.IntTensor` of shape `(C + 1,)`): chunk boundaries in tokens.
        block_m (`int`): slots per tile.
    """

    bits: torch.Tensor
    perm: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    tile_chunk: torch.Tensor
    union: torch.Tensor
    cu: torch.Tensor
    chunks: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    block_m: int

    @property
    def num_tiles(self) -> int:
        return self.tile_start.numel()

    def computed_pairs(self) -> int:
        """Query-key pairs the kernels compute (tile rows x union keys, before per-token masking)."""
        sizes = (self.offsets[1:] - self.offsets[:-1]).to(torch.float64)
        rows = (self.tile_end - self.tile_start).to(torch.float64)
        return int(((self.union.to(torch.float64) @ sizes) * rows).sum().item())

    def attended_pairs(self) -> int:
        """Query-key pairs actually attended (the useful work)."""
        sizes = (self.offsets[1:] - self.offsets[:-1]).to(torch.long)
        total = 0
        for w in range(self.bits.shape[-1]):
            word = self.bits[..., w]
            for i in range(min(_WORD, sizes.numel() - w * _WORD)):
                total += int(((word >> i) & 1).sum().item()) * int(sizes[w * _WORD + i].item())
        return total

    def overfetch(self) -> float:
        """Computed / attended pairs: 1.0 when every token of every tile attends its tile's whole union."""
        return self.computed_pairs() / max(1, self.attended_pairs())

    def transposed(self, block_n: int, layout_offsets: tuple[int, ...]):
        """For the `dk, dv` kernel: per `(batch*head, chunk)` the tiles whose union contains it, and the key blocks."""
        BH, T, C = self.union.shape
        device = self.union.device
        union_t = self.union.transpose(1, 2)  # (BH, C, T)
        cu_t = torch.zeros(BH * C + 1, dtype=torch.int32, device=device)
        cu_t[1:] = union_t.sum(-1).flatten().cumsum(0)
        tiles = union_t.nonzero()[:, 2].to(torch.int32)
        kb_start, kb_end, kb_chunk = [], [], []
        for c in range(C):
            for s in range(layout_offsets[c], layout_offsets[c + 1], block_n):
                kb_start.append(s)
                kb_end.append(min(s + block_n, layout_offsets[c + 1]))
                kb_chunk.append(c)
        kb_chunk_t = torch.tensor(kb_chunk, dtype=torch.long, device=device)
        # Work of a key block: rows of the tiles that may attend it; heaviest first.
        rows = (self.tile_end - self.tile_start).to(torch.float32)
        work = (union_t.to(torch.float32) @ rows)[:, kb_chunk_t]  # (BH, NKB)
        order = torch.argsort(work.flatten(), descending=True, stable=True).to(torch.int32)
        as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        return cu_t, tiles, as_i32(kb_start), as_i32(kb_end), kb_chunk_t.to(torch.int32), order


def _chunk_bits(anchors: torch.Tensor, words: int) -> torch.Tensor:
    """`(C, C)` bool -> `(C, W)` int64 bitsets (distinct powers of two, so a sum is a bitwise or)."""
    C = anchors.shape[0]
    pad = torch.zeros(C, words * _WORD, dtype=torch.long, device=anchors.device)
    pad[:, :C] = anchors.long()
    weights = torch.bitwise_left_shift(
        torch.ones(_WORD, dtype=torch.long, device=anchors.device), torch.arange(_WORD, device=anchors.device)
    )
    return (pad.view(C, words, _WORD) * weights).sum(-1)


def build_plan(routing: MoCRouting, block_m: int = 128, reorder: bool | str = "auto") -> MoCTritonPlan:
    r"""
    Compact per-tile chunk lists from a routing, with torch ops on the routing's device (no `L x L` tensor).

    Args:
        routing (`MoCRouting`): the routing (`selected` `(B, H, L, S)` and `anchors` `(C, C)`).
        block_m (`int`, defaults to 128): query slots per tile.
        reorder (`bool` or `"auto"`, defaults to `"auto"`): `True`: inside each chunk, put tokens with equal attended
            sets next to each other before tiling, so that the union of a tile stays small when tokens of a region
            disagree. `False`: tiles of consecutive tokens. `"auto"`: consecutive tokens when their tiles are already
            pure (every token attends its tile's whole union, e.g. `route_by="block"` with `block_size` a multiple of
            `block_m`), else whichever order computes fewer pairs.

    Returns:
        [`MoCTritonPlan`]
    """
    if reorder not in (True, False, "auto"):
        raise ValueError(f"reorder must be True, False or 'auto', got {reorder!r}")
    layout, device = routing.layout, routing.selected.device
    bits = _token_bits(routing)
    tiles = _Tiles.of(layout, block_m, device)
    perm, union = _tile_order(routing, bits, tiles, reorder)
    counts = union.sum(-1).flatten()
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
    cu[1:] = counts.cumsum(0)
    chunks = union.nonzero()[:, 2].to(torch.int32)
    sizes = layout.chunk_sizes(device)
    work = (union.to(torch.float32) @ sizes.to(torch.float32)) * (tiles.end - tiles.start).to(torch.float32)
    order = torch.argsort(work.flatten(), descending=True, stable=True).to(torch.int32)
    offsets = torch.tensor(layout.offsets, dtype=torch.int32, device=device)
    return MoCTritonPlan(
        bits=bits,
        perm=perm.to(torch.int32).contiguous(),
        tile_start=tiles.start,
        tile_end=tiles.end,
        tile_chunk=tiles.chunk,
        union=union,
        cu=cu,
        chunks=chunks,
        order=order,
        offsets=offsets,
        block_m=block_m,
    )


def _token_bits(routing: MoCRouting) -> torch.Tensor:
    """`(B*H, L, W)` int64: per token, the anchors of its chunk or-ed with each routed slot (-1 slots add nothing)."""
    layout, sel = routing.layout, routing.selected
    device = sel.device
    B, H, L, S = sel.shape
    words = (layout.num_chunks + _WORD - 1) // _WORD
    sel = sel.reshape(B * H, L, S)
    bits = _chunk_bits(routing.anchors.to(device), words)[layout.token_chunks(device)]
    bits = bits.expand(B * H, L, words).contiguous()
    one = torch.ones((), dtype=torch.long, device=device)
    for s in range(S):
        col = sel[..., s]
        colc = col.clamp(min=0)
        widx = (colc // _WORD)[..., None]
        bit = torch.where(col >= 0, torch.bitwise_left_shift(one, colc % _WORD), 0)[..., None]
        bits.scatter_(-1, widx, bits.gather(-1, widx) | bit)
    return bits


@dataclass(frozen=True)
class _Tiles:
    """Runs of `block_m` slots inside one chunk (every slot order used here keeps chunks contiguous)."""

    start: torch.Tensor  # (T,) int32
    end: torch.Tensor  # (T,) int32
    chunk: torch.Tensor  # (T,) int64
    of_slot: torch.Tensor  # (L,) int64: the tile of each slot

    @classmethod
    def of(cls, layout, block_m: int, device) -> _Tiles:
        starts, ends, chunks = [], [], []
        for c in range(layout.num_chunks):
            for s in range(layout.offsets[c], layout.offsets[c + 1], block_m):
                starts.append(s)
                ends.append(min(s + block_m, layout.offsets[c + 1]))
                chunks.append(c)
        start = torch.tensor(starts, dtype=torch.int32, device=device)
        end = torch.tensor(ends, dtype=torch.int32, device=device)
        of_slot = torch.repeat_interleave(torch.arange(len(starts), device=device), (end - start).long())
        return cls(start, end, torch.tensor(chunks, dtype=torch.long, device=device), of_slot)


def _union_for(routing: MoCRouting, tiles: _Tiles, perm: torch.Tensor) -> torch.Tensor:
    """`(B*H, T, C)` bool: each tile's anchors plus every routed chunk of its tokens, tokens placed by `perm`."""
    B, H, L, S = routing.selected.shape
    sel = routing.selected.reshape(B * H, L, S)
    BH, T, C, device = B * H, tiles.start.numel(), routing.layout.num_chunks, sel.device
    tile_of_token = torch.empty(BH, L, dtype=torch.long, device=device)
    tile_of_token.scatter_(1, perm, tiles.of_slot.expand(BH, L))
    flat = torch.zeros(BH * T * (C + 1), dtype=torch.bool, device=device)
    row = (torch.arange(BH, device=device)[:, None] * T + tile_of_token) * (C + 1)
    for s in range(S):
        flat[row + sel[..., s] % (C + 1)] = True  # -1 lands in the dropped column C
    return routing.anchors.to(device)[tiles.chunk].expand(BH, T, C) | flat.view(BH, T, C + 1)[..., :C]


def _sorted_perm(routing: MoCRouting, bits: torch.Tensor) -> torch.Tensor:
    """Slots grouping equal attended sets inside each chunk: an LSD radix sort with stable sorts on the bitset words
    (least significant first), then on the chunk id."""
    BH, L, words = bits.shape
    tok_chunk = routing.layout.token_chunks(bits.device)
    perm = torch.arange(L, device=bits.device).expand(BH, L)
    for w in reversed(range(words)):
        perm = perm.gather(1, torch.argsort(bits[..., w].gather(1, perm), dim=1, stable=True))
    return perm.gather(1, torch.argsort(tok_chunk[perm], dim=1, stable=True))


def _tile_order(routing: MoCRouting, bits: torch.Tensor, tiles: _Tiles, reorder: bool | str):
    """`(perm, union)`: the slot order `reorder` asks for (see [`build_plan`]) and its tiles' unions."""
    BH, L, _ = bits.shape
    perm = torch.arange(L, device=bits.device).expand(BH, L)
    if reorder is True:
        perm = _sorted_perm(routing, bits)
        return perm, _union_for(routing, tiles, perm)
    union = _union_for(routing, tiles, perm)
    if reorder != "auto":
        return perm, union
    sizes = routing.layout.chunk_sizes(bits.device).to(torch.float64)
    rows = (tiles.end - tiles.start).to(torch.float64)
    computed = lambda u: float(((u.to(torch.float64) @ sizes) * rows).sum())  # noqa: E731
    tok_chunk = routing.layout.token_chunks(bits.device)
    sel = routing.selected.reshape(BH, L, -1)
    attended = float((routing.anchors.to(bits.device).to(torch.float64) @ sizes)[tok_chunk].sum() * BH)
    for s in range(sel.shape[-1]):  # slot by slot: temporaries stay (B*H, L)
        attended += float(torch.where(sel[..., s] >= 0, sizes[sel[..., s].clamp(min=0)], 0).sum())
    natural = computed(union)
    if natural > attended:  # some tile is not pure: try grouping equal sets
        alt_perm = _sorted_perm(routing, bits)
        alt_union = _union_for(routing, tiles, alt_perm)
        if computed(alt_union) < natural:
            return alt_perm, alt_union
    return perm, union


# ---------------------------------------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class _Config:
    block_m: int  # query slots per tile (forward and dq)
    block_n: int  # keys per step in forward and dq
    block_n_kv: int  # keys per dk/dv program
    block_m_kv: int  # queries per step in the dk/dv kernel
    fwd: tuple[int, int]  # (num_warps, num_stages) of each kernel
    dq: tuple[int, int]
    dkdv: tuple[int, int]


def _config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> _Config:
    r"""
    Tile sizes and launch settings. Chosen so that the kernels compile for sm_90 without register spills in the
    forward; for head sizes over 64 the dk/dv kernel's setting is the fastest that `benchmarks/tune_triton.py`
    measured on an H200 (bf16, D=128, 180k tokens: 32 queries per step and 4 warps, 1.8x faster than 64 and 8).
    """
    if device.type != "cuda":  # the interpreter: small tiles, several per chunk even in tiny tests
        return _Config(16, 16, 16, 16, (1, 1), (1, 1), (1, 1))
    if dtype == torch.float32:  # exact fp32 products (no tensor cores): small tiles keep shared memory in bounds
        return _Config(64, 32, 32, 32, fwd=(4, 2), dq=(4, 2), dkdv=(4, 2))
    if head_dim <= 64:
        return _Config(128, 64, 64, 64, fwd=(4, 3), dq=(8, 3), dkdv=(4, 2))
    return _Config(128, 64, 64, 32, fwd=(8, 3), dq=(8, 2), dkdv=(4, 2))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: MoCRouting) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "q, k, v must be shaped (B, L, H, D) with equal B, L, H; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"backend='triton' supports float16, bfloat16 and float32, got {q.dtype}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got device {q.device}; use backend='torch' on CPU "
            "(or set TRITON_INTERPRET=1 before importing triton, for testing)"
        )
    B, L, H, _ = q.shape
    if tuple(routing.selected.shape[:3]) != (B, H, L):
        raise ValueError(
            f"the routing is for (B, H, L)={tuple(routing.selected.shape[:3])} but q has B={B}, H={H}, L={L}"
        )
    if routing.selected.device != q.device:
        raise ValueError(f"the routing lives on {routing.selected.device} but q on {q.device}")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise ValueError(f"backend='triton' supports head sizes up to 256, got {q.shape[-1]} / {v.shape[-1]}")


def _warps(warps: int, block_m: int) -> int:
    # One warpgroup (4 warps) per 64 query rows: a 64-row tile with 8 warps would split rows too thin.
    return min(warps, max(1, block_m // 16))


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _index_type(*tensors: torch.Tensor):
    # Per-batch offsets (token * stride + feature) in int32 keep the address math cheap in registers; int64 only
    # when one batch element of a tensor spans 2**31 elements or more.
    big = any(x.shape[1] * x.stride(1) + x.shape[2] * x.stride(2) >= 2**31 for x in tensors)
    return tl.int64 if big else tl.int32


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (no TF32), so fp32 results match the reference tightly.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, plan: MoCTritonPlan, scale: float, cfg: _Config):
    B, L, H, D = q.shape
    DV = v.shape[-1]
    out = torch.empty(B, L, H, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
    T = plan.num_tiles
    k_desc = TensorDescriptor.from_tensor(k, [1, cfg.block_n, 1, _block(D)])
    v_desc = TensorDescriptor.from_tensor(v, [1, cfg.block_n, 1, _block(DV)])
    _fwd_kernel[(B * H * T,)](
        q, k_desc, v_desc, out, lse, plan.bits, plan.perm, plan.tile_start, plan.tile_end, plan.cu, plan.chunks,
        plan.offsets, plan.order,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, L, T, plan.bits.shape[-1], scale * _LOG2E, D=D, DV=DV,
        BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block(D), BLOCK_DV=_block(DV),
        PRECISION=_precision(q.dtype), IDX=_index_type(q, k, v, out), num_warps=_warps(cfg.fwd[0], plan.block_m),
        num_stages=cfg.fwd[1],
    )  # fmt: skip
    return out, lse


def _backward(q, k, v, out, lse, grad_out, plan: MoCTritonPlan, offsets: tuple[int, ...], scale, cfg: _Config):
    B, L, H, D = q.shape
    DV = v.shape[-1]
    BH = B * H
    grad_out = grad_out.contiguous()
    delta = torch.empty(BH, L, device=q.device, dtype=torch.float32)
    rows = 64
    _delta_kernel[(triton.cdiv(L, rows), BH)](
        out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), H, L, DV, BLOCK=rows, BLOCK_DV=_block(DV),
    )  # fmt: skip
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    T = plan.num_tiles
    common = dict(
        BLOCK_D=_block(D), BLOCK_DV=_block(DV), PRECISION=_precision(q.dtype), IDX=_index_type(q, k, v, grad_out)
    )
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )  # fmt: skip
    k_desc = TensorDescriptor.from_tensor(k, [1, cfg.block_n, 1, _block(D)])
    v_desc = TensorDescriptor.from_tensor(v, [1, cfg.block_n, 1, _block(DV)])
    _dq_kernel[(BH * T,)](
        q, k_desc, v_desc, grad_out, dq, lse, delta, plan.bits, plan.perm, plan.tile_start, plan.tile_end, plan.cu,
        plan.chunks, plan.offsets, plan.order, q.stride(0), q.stride(1), q.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        H, L, T, plan.bits.shape[-1], scale * _LOG2E, scale, D=D, DV=DV,
        BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n, **common, num_warps=_warps(cfg.dq[0], plan.block_m),
        num_stages=cfg.dq[1],
    )  # fmt: skip
    cu_t, tiles, kb_start, kb_end, kb_chunk, order = plan.transposed(cfg.block_n_kv, offsets)
    NKB = kb_start.numel()
    C = plan.union.shape[-1]
    _dkdv_kernel[(BH * NKB,)](
        q, k, v, grad_out, dk, dv, lse, delta, plan.bits, plan.perm, plan.tile_start, plan.tile_end, cu_t, tiles,
        kb_start, kb_end, kb_chunk, order, *strides,
        H, L, C, NKB, plan.bits.shape[-1], scale * _LOG2E, scale, D=D, DV=DV,
        BLOCK_M=cfg.block_m_kv, BLOCK_N=cfg.block_n_kv, **common, num_warps=cfg.dkdv[0], num_stages=cfg.dkdv[1],
    )  # fmt: skip
    return dq, dk, dv


def _padded(x: torch.Tensor) -> torch.Tensor:
    # The kernels read keys and values through TMA descriptors: head sizes a power of two (>= 16) and 16-byte
    # aligned strides. Zero-padding q and k leaves the scores unchanged; padded value columns are sliced off.
    if x.shape[-1] != _block(x.shape[-1]):
        x = torch.nn.functional.pad(x, (0, _block(x.shape[-1]) - x.shape[-1]))
    return x if _tma_aligned(x) else x.contiguous()


def _plan_for(q, v, routing: MoCRouting, plan, block_m, reorder) -> tuple[MoCTritonPlan, _Config]:
    B, L, H, D = q.shape
    cfg = _config(max(D, v.shape[-1]), q.device, q.dtype)
    if plan is None:
        plan = build_plan(routing, block_m or cfg.block_m, reorder=reorder)
    if plan.block_m not in (16, 32, 64, 128):
        raise ValueError(f"the query tile size must be 16, 32, 64 or 128 (a power of two), got block_m={plan.block_m}")
    if tuple(plan.perm.shape) != (B * H, L) or plan.union.shape[-1] != routing.layout.num_chunks:
        raise ValueError("the plan passed was built for another routing (shape or number of chunks differ)")
    return plan, cfg


def _triton_forward(q, k, v, routing, scale, plan=None, block_m=None, reorder="auto"):
    _check(q, k, v, routing)
    B, L, H, _ = q.shape
    DV = v.shape[-1]
    plan, cfg = _plan_for(q, v, routing, plan, block_m, reorder)
    out, lse = _forward(_padded(q), _padded(k), _padded(v), plan, scale, cfg)
    return out[..., :DV], lse.view(B, H, L)


def _triton_backward(grad_out, q, k, v, out, lse, routing, scale, plan=None, block_m=None, reorder="auto"):
    B, L, H, D = q.shape
    DV = v.shape[-1]
    plan, cfg = _plan_for(q, v, routing, plan, block_m, reorder)
    dq, dk, dv = _backward(
        _padded(q), _padded(k), _padded(v), _padded(out), lse.reshape(B * H, L), _padded(grad_out), plan,
        routing.layout.offsets, scale, cfg,
    )  # fmt: skip
    return dq[..., :D], dk[..., :D], dv[..., :DV]


# NaN inputs: the kernels would spread a key block's NaN values to the tile's rows that do not attend it (zero
# probabilities times NaN); `sdpa_nan` gives SDPA's semantics instead.
TRITON = sdpa_nan(MoCKernel("triton", _triton_forward, _triton_backward))


def triton_kernel(plan: MoCTritonPlan | None = None, block_m: int | None = None, reorder: bool | str = "auto"):
    r"""
    The `triton` backend with its planning settings fixed (the registered backend uses the defaults): for kernel
    studies and benchmarks that reuse one plan.

    Args:
        plan (`MoCTritonPlan`, *optional*): a plan built before with [`build_plan`] (skips planning).
        block_m (`int`, *optional*): query slots per tile, 16 to 128 (default: 128 on CUDA, 64 for float32).
        reorder (`bool` or `"auto"`, defaults to `"auto"`): token order inside chunks before tiling, see
            [`build_plan`].
    """
    options = dict(plan=plan, block_m=block_m, reorder=reorder)
    return sdpa_nan(
        MoCKernel("triton", lambda *a: _triton_forward(*a, **options), lambda *a: _triton_backward(*a, **options))
    )


def _tma_aligned(x: torch.Tensor) -> bool:
    size = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all((st * size) % 16 == 0 for st in x.stride()[:-1])
