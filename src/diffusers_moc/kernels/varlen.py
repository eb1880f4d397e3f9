r"""MoC attention as flash-attention var-len calls over packed (query, key chunk) segments: the paper's scheme.

**Packing.** For every key chunk `c` and every `(batch, head)` pair, the query tokens that attend `c` form one
*segment* whose keys are exactly chunk `c`: first the tokens of the chunks that have `c` as a mandatory anchor (a
few token ranges, from `routing.anchors`), then the tokens that routed to `c` (from `routing.selected`), each in token
order. Segments are laid out head-major for the var-len call: every `(batch, head, chunk)` segment is its own
"sequence" of a call with one head, `q` `(total_q, 1, D)` gathered from the `(B, L, H, D)` input, `k, v`
`(total_k, 1, D)` copied from the chunk, `cu_seqlens` int32 and the maximal lengths. Nothing `L x C` is built: the
routed pairs are sorted once into a list of query rows (at most the size of `routing.selected`), the anchors are
ranges.

**Calls and memory.** Segments are cut into calls in `(chunk, batch, head)` order, each call within a memory budget
(`memory_budget()`: about half the size of the attention output, so that a call's gathered rows, partial outputs and
the executor's own buffers never hold all attended pairs at once; a segment larger than the budget is split into
query ranges). At 180k tokens, 12 heads, D=128 and ~19 attended chunks per token all pairs at once would be ~10 GB.

**Merge.** Each call returns, per row, the partial output over one chunk and its log-sum-exp. They are merged into a
float32 accumulator (float64 for float64 inputs) by log-sum-exp, one chunk after the other in chunk order, so every
query's output is the same sequence of operations on its own partials, whatever else is packed around it.

**Backward** (MoBA style): each segment's var-len backward runs with the *merged* output and log-sum-exp, which gives
exactly that segment's share of the gradient. `dq` is scattered (added) into a float32 accumulator, `dk` and `dv` of a
chunk come out of its segments whole (staged in float32 only when a segment was split). Nothing of the size of the
attended pairs is kept for autograd: the plan is rebuilt from the routing in the backward.

**Executors** run the var-len calls (`VarlenExecutor`, flash-attn's calling convention); see `kernels/executors.py`
and `kernels/flash_attn_executors.py`. The same packing, merge and backward run on the CPU through the portable
executor, which is how this module is tested without a GPU.

**Exactness.** With an executor whose per-row result does not depend on the other rows of a call (the portable CPU
executor pads every segment to whole 32-row blocks for that; flash kernels compute rows independently when split-KV is
off, which we request), a query's output is bit-for-bit independent of other queries' routing, so with causal routing
earlier shots are unchanged when later shots change. `dq`, `dk` and `dv` are sums over queries in an order that
does follow the packing (CUDA `index_add_` is atomic), so gradients are exact only to rounding.

Host reads (device synchronisations) per forward and per backward: the chunk-level anchor matrix and the per
`(chunk, batch, head)` segment sizes (two small copies to the host); executors may read `cu_seqlens` (CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..routing import MoCRouting

__all__ = ["VarlenExecutor", "VarlenPlan", "build_varlen_plan", "memory_budget", "varlen_forward", "varlen_backward"]

#: Bytes one call may hold (gathered rows, partial results, the executor's buffers); `None`: `memory_budget()`.
MEMORY_BUDGET_BYTES: int | None = None
_MIN_BUDGET = 16 << 20
_MAX_BUDGET = 2 << 30
# Elements of `selected` processed at once while building the plan (bounds the sort's temporaries).
_PLAN_BLOCK = 1 << 24


class VarlenExecutor(Protocol):
    r"""
    Runs flash-attention var-len calls (non-causal, no dropout), flash-attn's calling convention:

    - `forward(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> (out, lse)`: `q` `(total_q, H, D)`, `k, v` `(total_k, H,
      D)` with a contiguous last dimension, `cu_q, cu_k` int32 cumulative lengths `(n + 1,)`, `max_q, max_k` Python
      ints; `out` `(total_q, H, Dv)` in `q.dtype`, `lse` `(H, total_q)` float32 (float64 for float64 inputs).
    - `backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale) -> (dq, dk, dv)` from the given `out` and
      `lse` (which may be the merged ones), in the dtypes of `q, k, v`.
    """

    name: str

    def forward(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float): ...

    def backward(self, grad_out, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float): ...


def memory_budget(q: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes one var-len call may hold: half the attention output, within [16 MiB, 2 GiB] (`MEMORY_BUDGET_BYTES`)."""
    if MEMORY_BUDGET_BYTES is not None:
        return int(MEMORY_BUDGET_BYTES)
    out_bytes = v.numel() * q.element_size()
    return min(max(out_bytes // 2, _MIN_BUDGET), _MAX_BUDGET)


def _costs(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """Bytes per packed query row and per packed key row of a call, forward or backward, whichever is larger."""
    D, Dv, es = q.shape[-1], v.shape[-1], q.element_size()
    work = max(es, 4)
    # Backward: gathered q, dO, O and dq per row, the float32 dq it is added as, the executor's float32 dq buffer.
    # Forward: gathered q, the partial output, and the merge's float32 gathers of the accumulator.
    row = max((D + 2 * Dv + D) * es + 2 * D * work, (D + Dv) * es + 3 * Dv * work) + 16
    key = 2 * (D + Dv) * es + (D + Dv) * work  # k, v copies, dk, dv, float32 staging
    return row, key


@dataclass
class _Piece:
    """Rows `lo:hi` of the segment of key chunk `chunk` and flat head `bh` (anchor attendees first, then routed)."""

    chunk: int
    bh: int
    lo: int
    hi: int


@dataclass
class VarlenPlan:
    r"""
    The packing of one routing into var-len calls (host lists plus one device index).

    Attributes:
        routed_rows (`torch.LongTensor` `(R + 1,)`): flat query rows `(b * L + t) * H + h` of the routed pairs,
            sorted by `(chunk, b * H + h, t)`; the last entry is scratch.
        routed_start, routed_count (`list[list[int]]`): per chunk and flat head, where its routed rows start and
            how many there are.
        anchor_src (`list[list[int]]`): per key chunk, the query chunks that have it as a mandatory anchor.
        calls (`list[list[_Piece]]`): the segment pieces of each call, in `(chunk, flat head)` order.
    """

    B: int
    L: int
    H: int
    offsets: tuple[int, ...]
    anchor_src: list[list[int]]
    n_anchor: list[int]
    routed_rows: torch.Tensor
    routed_start: list[list[int]]
    routed_count: list[list[int]]
    calls: list[list[_Piece]]

    def segment_rows(self, chunk: int, bh: int) -> int:
        return self.n_anchor[chunk] + self.routed_count[chunk][bh]

    def pairs(self) -> int:
        """Attended (query, key) token pairs, over all heads."""
        sizes = np.diff(self.offsets)
        counts = np.asarray(self.n_anchor)[:, None] + np.asarray(self.routed_count).reshape(len(sizes), -1)
        return int((counts * sizes[:, None]).sum())


def _routed_keys(sel, anchors_flat, tok_chunk, bh0, C, BH):
    """`(bh, t, slot)` -> int32 key `chunk * BH + bh` of each routed pair that is kept, `C * BH` for the others."""
    valid = sel >= 0
    # Duplicates (a user-built routing may repeat a chunk) and chunks that are also anchors count once, as anchors.
    for j in range(1, sel.shape[-1]):
        valid[..., j] &= ~(sel[..., :j] == sel[..., j : j + 1]).any(-1)
    c = sel.clamp(min=0)
    valid &= ~anchors_flat[tok_chunk[None, :, None] * C + c]
    bh = torch.arange(bh0, bh0 + sel.shape[0], device=sel.device, dtype=torch.int32)[:, None, None]
    return torch.where(valid, c.to(torch.int32) * BH + bh, C * BH)


def _routed_rows(routing: MoCRouting, B: int, L: int, H: int):
    """The routed pairs sorted into `(chunk, bh, t)` order: (rows `(R + 1,)`, counts per `chunk * BH + bh`)."""
    layout, device = routing.layout, routing.selected.device
    C, BH, S = layout.num_chunks, B * H, routing.selected.shape[-1]
    drop = C * BH
    if S == 0:
        return torch.zeros(1, dtype=torch.long, device=device), [0] * drop
    sel = routing.selected.reshape(BH, L, S)
    anchors_flat = routing.anchors.reshape(-1)
    tok_chunk = layout.token_chunks(device)
    step = max(1, _PLAN_BLOCK // (L * S))
    blocks = [(b0, min(b0 + step, BH)) for b0 in range(0, BH, step)]
    keys = [_routed_keys(sel[b0:b1], anchors_flat, tok_chunk, b0, C, BH) for b0, b1 in blocks[:1]]
    counts = torch.zeros(drop + 1, dtype=torch.long, device=device)
    for i, (b0, b1) in enumerate(blocks):
        key = keys[0] if i == 0 else _routed_keys(sel[b0:b1], anchors_flat, tok_chunk, b0, C, BH)
        counts += torch.bincount(key.reshape(-1), minlength=drop + 1)
    counts_h = counts.tolist()  # host read
    total = sum(counts_h[:drop])
    starts = torch.cumsum(counts, 0) - counts
    rows = torch.empty(total + 1, dtype=torch.long, device=device)
    for i, (b0, b1) in enumerate(blocks):
        key = (keys[0] if i == 0 else _routed_keys(sel[b0:b1], anchors_flat, tok_chunk, b0, C, BH)).reshape(-1)
        sorted_key, flat = torch.sort(key, stable=True)  # within one key, (t, slot) order: tokens ascending
        sorted_key = sorted_key.long()
        block_counts = torch.bincount(sorted_key, minlength=drop + 1)
        rank = torch.arange(flat.numel(), device=device) - (torch.cumsum(block_counts, 0) - block_counts)[sorted_key]
        pos = torch.where(sorted_key == drop, total, starts[sorted_key] + rank)
        bh = b0 + flat // (L * S)
        t = (flat // S) % L
        rows.index_copy_(0, pos, ((bh // H) * L + t) * H + bh % H)
    return rows, counts_h[:drop]


def _split_calls(plan: VarlenPlan, budget: int, row_cost: int, key_cost: int, BH: int) -> list[list[_Piece]]:
    """Cut the segments, in `(chunk, bh)` order, into calls of at most `budget` bytes (a segment too large for one
    call is split into query ranges)."""
    calls: list[list[_Piece]] = []
    current: list[_Piece] = []
    used = 0
    for c in range(len(plan.offsets) - 1):
        n_keys = plan.offsets[c + 1] - plan.offsets[c]
        keys = n_keys * key_cost
        for bh in range(BH):
            rows = plan.segment_rows(c, bh)
            if rows == 0:
                continue
            step = max(1, (budget - keys) // row_cost) if rows * row_cost + keys > budget else rows
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)
                cost = (hi - lo) * row_cost + keys
                if current and used + cost > budget:
                    calls.append(current)
                    current, used = [], 0
                current.append(_Piece(c, bh, lo, hi))
                used += cost
    if current:
        calls.append(current)
    return calls


def build_varlen_plan(routing: MoCRouting, q: torch.Tensor, v: torch.Tensor, budget: int | None = None) -> VarlenPlan:
    r"""
    Pack a routing into var-len calls for inputs shaped like `q` `(B, L, H, D)` and `v` `(B, L, H, Dv)`.

    Args:
        routing (`MoCRouting`): the routing.
        q, v (`torch.Tensor`): the attention's queries and values (only shapes, dtype and device are used).
        budget (`int`, *optional*): bytes per call (default: [`memory_budget`]).
    """
    B, L, H, _ = q.shape
    layout = routing.layout
    if tuple(routing.selected.shape[:3]) != (B, H, L):
        raise ValueError(
            f"the routing is for (B, H, L) = {tuple(routing.selected.shape[:3])} but the inputs have {(B, H, L)}"
        )
    C, BH = layout.num_chunks, B * H
    offsets = tuple(layout.offsets)
    sizes = np.diff(offsets)
    anchors = routing.anchors.cpu().numpy()  # host read, (C, C)
    anchor_src = [np.flatnonzero(anchors[:, c]).tolist() for c in range(C)]
    n_anchor = [int(sizes[src].sum()) for src in anchor_src]
    rows, counts = _routed_rows(routing, B, L, H)
    count = np.asarray(counts, dtype=np.int64).reshape(C, BH)
    start = (np.cumsum(count.reshape(-1)) - count.reshape(-1)).reshape(C, BH)
    plan = VarlenPlan(B, L, H, offsets, anchor_src, n_anchor, rows, start.tolist(), count.tolist(), [])
    row_cost, key_cost = _costs(q, v)
    plan.calls = _split_calls(plan, memory_budget(q, v) if budget is None else budget, row_cost, key_cost, BH)
    return plan


# ---------------------------------------------------------------------------------------------- one call
@dataclass
class _Call:
    rows: torch.Tensor  # (n,) flat query rows gathered into the packed q
    merge_rows: torch.Tensor  # (n,) where each packed row's result goes: `rows`, padding rows to the scratch row
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    # Per chunk of the call: (chunk, first row, end row, first key row, end key row, flat heads of its pieces).
    chunks: list[tuple[int, int, int, int, int, list[int]]]


def _anchor_rows(plan: VarlenPlan, c: int, device) -> torch.Tensor:
    """`(B * H, n_anchor)` flat query rows of chunk `c`'s anchor attendees, per flat head."""
    src = plan.anchor_src[c]
    off = plan.offsets
    lengths = [off[a + 1] - off[a] for a in src]
    n = sum(lengths)
    # Token ids of a few ranges without a host read: arange plus a per-range shift.
    shift = torch.tensor([off[a] for a in src], device=device) - torch.tensor(
        np.cumsum([0] + lengths[:-1]).tolist(), device=device
    )
    tok = torch.arange(n, device=device) + torch.repeat_interleave(
        shift, torch.tensor(lengths, device=device), output_size=n
    )
    bh = torch.arange(plan.B * plan.H, device=device)
    return ((bh // plan.H)[:, None] * plan.L + tok[None, :]) * plan.H + (bh % plan.H)[:, None]


def _pack_call(plan: VarlenPlan, pieces: list[_Piece], device, multiple: int = 1) -> _Call:
    r"""
    The index tensors and lengths of one call. With `multiple > 1` every segment is padded to a multiple of that
    many rows by repeating its last row; the padding rows' results go to the scratch row `B * L * H`.
    """
    parts, pads, cu_q, cu_k, chunks = [], [], [0], [0], []
    anchor_cache: dict[int, torch.Tensor] = {}
    max_q = max_k = 0
    scratch = plan.B * plan.L * plan.H
    for piece in pieces:
        c, bh = piece.chunk, piece.bh
        n_keys = plan.offsets[c + 1] - plan.offsets[c]
        if not chunks or chunks[-1][0] != c:
            chunks.append([c, cu_q[-1], cu_q[-1], cu_k[-1], cu_k[-1], []])
        n_a = plan.n_anchor[c]
        if piece.lo < n_a:
            if c not in anchor_cache:
                anchor_cache[c] = _anchor_rows(plan, c, device)
            parts.append(anchor_cache[c][bh, piece.lo : min(piece.hi, n_a)])
        if piece.hi > n_a:
            s = plan.routed_start[c][bh]
            parts.append(plan.routed_rows[s + max(piece.lo - n_a, 0) : s + piece.hi - n_a])
        rows = piece.hi - piece.lo
        pad = (-rows) % multiple
        if pad:
            pads.append((cu_q[-1] + rows, pad))
            parts.append(parts[-1][-1:].expand(pad))
        cu_q.append(cu_q[-1] + rows + pad)
        cu_k.append(cu_k[-1] + n_keys)
        max_q, max_k = max(max_q, rows + pad), max(max_k, n_keys)
        chunks[-1][2], chunks[-1][4] = cu_q[-1], cu_k[-1]
        chunks[-1][5].append(bh)
    rows = torch.cat(parts) if len(parts) > 1 else parts[0]
    merge_rows = rows
    if pads:
        merge_rows = rows.clone()
        for start, pad in pads:
            merge_rows[start : start + pad] = scratch
    return _Call(
        rows=rows,
        merge_rows=merge_rows,
        cu_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_q=max_q,
        max_k=max_k,
        chunks=[tuple(ch) for ch in chunks],
    )


def _chunk_keys(x: torch.Tensor, lo: int, hi: int, bhs: list[int], H: int) -> torch.Tensor:
    """`(len(bhs) * n, 1, D)`: chunk `lo:hi` of `x` `(B, L, H, D)` for the flat heads `bhs`, head-major."""
    if bhs == list(range(x.shape[0] * H)):
        block = x[:, lo:hi].transpose(1, 2)  # (B, H, n, D) view; reshape copies it head-major
    else:
        block = torch.stack([x[bh // H, lo:hi, bh % H] for bh in bhs])
    return block.reshape(-1, 1, x.shape[-1])


def _call_keys(call: _Call, k: torch.Tensor, v: torch.Tensor, offsets, H: int):
    ks, vs = [], []
    for c, _, _, _, _, bhs in call.chunks:
        ks.append(_chunk_keys(k, offsets[c], offsets[c + 1], bhs, H))
        vs.append(_chunk_keys(v, offsets[c], offsets[c + 1], bhs, H))
    if len(ks) == 1:
        return ks[0], vs[0]
    return torch.cat(ks), torch.cat(vs)


# ---------------------------------------------------------------------------------------------- forward
def _merge(acc: torch.Tensor, lse_acc: torch.Tensor, rows: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge partial results `(o, lse)` of distinct query rows into the running `(acc, lse_acc)`, by log-sum-exp."""
    old = lse_acc.index_select(0, rows)
    top = torch.maximum(old, lse)  # NaN propagates
    w_old, w_new = torch.exp(old - top), torch.exp(lse - top)
    total = w_old + w_new
    # Only elementwise arithmetic (no fused multiply-add), exp and log on gathered rows: a row's result does not
    # depend on where it sits. The first chunk of a row gives w_old = 0, w_new = 1: the partial itself, exactly.
    blended = acc.index_select(0, rows).mul_((w_old / total)[:, None])
    blended += o.to(acc.dtype) * (w_new / total)[:, None]
    acc.index_copy_(0, rows, blended)
    lse_acc.index_copy_(0, rows, top + torch.log(total))


def varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: MoCRouting,
    scale: float,
    executor: VarlenExecutor,
    plan: VarlenPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoC attention `(out (B, L, H, Dv), lse (B, H, L))` through var-len calls of `executor`."""
    B, L, H, D = q.shape
    Dv = v.shape[-1]
    plan = build_varlen_plan(routing, q, v) if plan is None else plan
    work = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 merge in float32, float64 stays float64
    q_flat = q.reshape(B * L * H, D)
    n = B * L * H
    acc = torch.zeros(n + 1, Dv, dtype=work, device=q.device)  # + the scratch row of padding rows
    lse_acc = torch.full((n + 1,), -math.inf, dtype=work, device=q.device)
    multiple = getattr(executor, "row_multiple", 1)
    for pieces in plan.calls:
        call = _pack_call(plan, pieces, q.device, multiple)
        kc, vc = _call_keys(call, k, v, plan.offsets, H)
        qc = q_flat.index_select(0, call.rows).view(-1, 1, D)
        o, lse = executor.forward(qc, kc, vc, call.cu_q, call.cu_k, call.max_q, call.max_k, scale)
        o, lse = o.reshape(-1, Dv), lse.reshape(-1)
        for _, r0, r1, _, _, _ in call.chunks:  # chunk by chunk: a query appears once per chunk
            _merge(acc, lse_acc, call.merge_rows[r0:r1], o[r0:r1], lse[r0:r1].to(work))
    out = acc[:n].view(B, L, H, Dv)
    return out.to(q.dtype), lse_acc[:n].view(B, L, H).permute(0, 2, 1).contiguous()


# ---------------------------------------------------------------------------------------------- backward
def varlen_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    routing: MoCRouting,
    scale: float,
    executor: VarlenExecutor,
    plan: VarlenPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dq, dk, dv)` from the merged `out` and `lse` of [`varlen_forward`], segment by segment."""
    B, L, H, D = q.shape
    Dv = v.shape[-1]
    plan = build_varlen_plan(routing, q, v) if plan is None else plan
    work = torch.promote_types(q.dtype, torch.float32)
    n = B * L * H
    flat = lambda x: x.reshape(n, x.shape[-1])  # noqa: E731
    q_flat, do_flat, o_flat = flat(q), flat(grad_out), flat(out)
    # + the scratch row: padding rows read an infinite log-sum-exp (probability 0, so no share of dk, dv).
    lse_flat = torch.cat([lse.to(work).permute(0, 2, 1).reshape(n), lse.new_full((1,), math.inf, dtype=work)])
    dq = torch.zeros(n + 1, D, dtype=work, device=q.device)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    last_call = _last_call_of_chunks(plan)
    staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    multiple = getattr(executor, "row_multiple", 1)
    for i, pieces in enumerate(plan.calls):
        call = _pack_call(plan, pieces, q.device, multiple)
        kc, vc = _call_keys(call, k, v, plan.offsets, H)
        rows = call.rows
        grads = executor.backward(
            do_flat.index_select(0, rows).view(-1, 1, Dv),
            q_flat.index_select(0, rows).view(-1, 1, D),
            kc,
            vc,
            o_flat.index_select(0, rows).view(-1, 1, Dv),
            lse_flat.index_select(0, call.merge_rows).view(1, -1),
            call.cu_q,
            call.cu_k,
            call.max_q,
            call.max_k,
            scale,
        )
        dq.index_add_(0, call.merge_rows, grads[0].reshape(-1, D).to(work))
        for c, _, _, k0, k1, bhs in call.chunks:
            _add_chunk_grads(dk, dv, grads[1][k0:k1], grads[2][k0:k1], c, bhs, plan, staged, last_call[c] == i, work)
    return dq[:n].view(B, L, H, D).to(q.dtype), dk, dv


def _last_call_of_chunks(plan: VarlenPlan) -> dict[int, int]:
    last = {}
    for i, pieces in enumerate(plan.calls):
        for piece in pieces:
            last[piece.chunk] = i
    return last


def _add_chunk_grads(dk, dv, dk_c, dv_c, c, bhs, plan: VarlenPlan, staged, done: bool, work) -> None:
    """Write (or stage, when chunk `c`'s segments are spread over calls or split) the key gradients of chunk `c`."""
    B, H = plan.B, plan.H
    lo, hi = plan.offsets[c], plan.offsets[c + 1]
    n = hi - lo
    whole = done and c not in staged and bhs == list(range(B * H))
    if whole:  # every segment of the chunk, once each, in this call: the gradients are complete
        for dst, src in ((dk, dk_c), (dv, dv_c)):
            dst[:, lo:hi] = src.view(B, H, n, -1).transpose(1, 2)
        return
    if c not in staged:
        staged[c] = (
            torch.zeros(B * H, n, dk.shape[-1], dtype=work, device=dk.device),
            torch.zeros(B * H, n, dv.shape[-1], dtype=work, device=dv.device),
        )
    idx = torch.tensor(bhs, device=dk.device)
    staged[c][0].index_add_(0, idx, dk_c.reshape(len(bhs), n, -1).to(work))
    staged[c][1].index_add_(0, idx, dv_c.reshape(len(bhs), n, -1).to(work))
    if done:
        sk, sv = staged.pop(c)
        dk[:, lo:hi] = sk.view(B, H, n, -1).transpose(1, 2)
        dv[:, lo:hi] = sv.view(B, H, n, -1).transpose(1, 2)


def varlen_kernel_functions(
    choose: Callable[[torch.Tensor, torch.Tensor], VarlenExecutor],
) -> tuple[Callable, Callable]:
    """`(forward, backward)` of a `MoCKernel` running the var-len scheme on the executor `choose(q, v)` returns."""

    def forward(q, k, v, routing, scale):
        return varlen_forward(q, k, v, routing, scale, choose(q, v))

    def backward(grad_out, q, k, v, out, lse, routing, scale):
        return varlen_backward(grad_out, q, k, v, out, lse, routing, scale, choose(q, v))

    return forward, backward
