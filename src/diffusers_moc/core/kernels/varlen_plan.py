r"""The packing of a MoC routing into flash-attention var-len calls (used by `kernels/varlen.py`).

Two kinds of call:

- **anchor calls** (forward): every token of a query chunk `a` attends the same mandatory anchor chunks `M(a)`, in
  every head. One var-len segment per query chunk, all heads at once: the queries are the chunk itself (a view of
  `q`, no gather), the keys the tokens of `M(a)`.
- **segment calls**: per key chunk `c` and flat head `bh = b * H + h`, a segment of the query tokens that attend `c`,
  head-major (one head per call, the heads folded into the segments): those that routed to `c` (forward), or also
  the anchor attendees (backward, so that a chunk's `dk` and `dv` come out of its segments whole). The routed pairs
  come from `routing.selected`, sorted once into `(chunk, bh, token)` order; the anchor attendees are token ranges.

Calls are cut in order within a memory budget (`memory_budget`), a segment larger than the budget into query
ranges. Nothing `L x C` is built: the plan's only device tensor is the sorted routed rows (at most the size of
`routing.selected`). Host reads: the `(C, C)` anchor matrix and the per `(chunk, bh)` routed counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..routing import MoCRouting

__all__ = ["VarlenPlan", "build_varlen_plan", "memory_budget"]

#: Bytes one call may hold (gathered rows, partial results, the executor's buffers); `None`: `memory_budget()`.
MEMORY_BUDGET_BYTES: int | None = None
# Elements of `selected` processed at once while sorting the routed pairs (bounds the sort's temporaries).
_PLAN_BLOCK = 1 << 24
# A segment is split into query ranges of at least this many rows, whatever the budget (smaller calls would cost more
# in per-call work than they save in memory).
_MIN_PIECE_ROWS = 512


def memory_budget(q: torch.Tensor, v: torch.Tensor, backward: bool, plan_bytes: int = 0) -> int:
    r"""
    Bytes one var-len call may hold (`MEMORY_BUDGET_BYTES` overrides), chosen so that MoC's forward+backward peak
    stays at or below dense attention's:

    - forward: twice the attention output's size (within [16 MiB, 4 GiB]): the forward holds the output and its
      accumulator besides, the backward several times the output, so a forward call does not set the peak;
    - backward, float16 / bfloat16: 7/8 of the output, less the plan. The calls' buffers and the plan are freed
      before the float32 `dq` accumulator is cast to `dq`, so they use room that cast takes anyway (dense flash
      attention holds the same float32 accumulator, `dq`, `dk` and `dv` at once);
    - backward, float32 / float64: `dq` accumulates in place and dense attention has no such slack: a sixteenth of
      the output (at least 2 MiB).

    A call always holds at least one chunk's keys and 512 query rows (`_MIN_PIECE_ROWS`), even above the budget.
    """
    if MEMORY_BUDGET_BYTES is not None:
        return int(MEMORY_BUDGET_BYTES)
    out_bytes = v.numel() * q.element_size()
    if not backward:
        return min(max(2 * out_bytes, 16 << 20), 4 << 30)
    if q.element_size() < 4:
        return min(max(out_bytes * 7 // 8 - plan_bytes, 4 << 20), 2 << 30)
    return min(max(out_bytes // 16, 2 << 20), 1 << 30)


def call_costs(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """Bytes per packed query row and per packed key row of a call (one head), forward or backward."""
    D, Dv, es = q.shape[-1], v.shape[-1], q.element_size()
    work = max(es, 4)
    # Backward: gathered q, dO, O, the returned dq and its float32 copy, the executor's float32 dq buffer.
    # Forward: gathered q, the partial output, the merge's float32 gather of the accumulator.
    row = max((2 * D + 2 * Dv) * es + 2 * D * work, (D + Dv) * es + 2 * Dv * work) + 16
    key = 2 * (D + Dv) * es + (D + Dv) * work  # k, v copies, dk, dv, float32 staging
    return row, key


@dataclass
class Piece:
    """Rows `lo:hi` of the segment of key chunk `chunk` and flat head `bh` (anchor attendees first, then routed)."""

    chunk: int
    bh: int
    lo: int
    hi: int


@dataclass
class AnchorCall:
    """Query chunks `first:last` of batch element `b`, each attending its anchor chunks, all heads."""

    b: int
    first: int
    last: int


def _routed_keys(sel, anchors_flat, tok_chunk, bh0, C, BH):
    """`(bh, t, slot)` -> int32 key `chunk * BH + bh` of each routed pair that is kept, `C * BH` for the others."""
    # Duplicates (a user-built routing may repeat a chunk) and chunks that are also anchors count once, as anchors.
    if sel.shape[-1] > 4:
        sel = torch.sort(sel, dim=-1).values  # slot order does not matter; repeats become neighbours
        valid = sel >= 0
        valid[..., 1:] &= sel[..., 1:] != sel[..., :-1]
    else:
        valid = sel >= 0
        for j in range(1, sel.shape[-1]):
            valid[..., j] &= ~(sel[..., :j] == sel[..., j : j + 1]).any(-1)
    c = sel.clamp(min=0)
    valid &= ~anchors_flat[tok_chunk[None, :, None] * C + c]
    bh = torch.arange(bh0, bh0 + sel.shape[0], device=sel.device, dtype=torch.int32)[:, None, None]
    return torch.where(valid, c.to(torch.int32) * BH + bh, C * BH)


def _routed_rows(routing: MoCRouting, B: int, L: int, H: int):
    """The routed pairs in `(chunk, bh, t)` order as flat query rows `(b * L + t) * H + h` (plus one scratch entry),
    and their count per `chunk * BH + bh`."""
    layout, device = routing.layout, routing.selected.device
    C, BH, S = layout.num_chunks, B * H, routing.selected.shape[-1]
    drop = C * BH
    if S == 0:
        return torch.zeros(1, dtype=torch.int32, device=device), [0] * drop
    sel = routing.selected.reshape(BH, L, S)
    anchors_flat = routing.anchors.reshape(-1)
    tok_chunk = layout.token_chunks(device)
    step = max(1, _PLAN_BLOCK // (L * S))
    blocks = [(b0, min(b0 + step, BH)) for b0 in range(0, BH, step)]
    first = _routed_keys(sel[: blocks[0][1]], anchors_flat, tok_chunk, 0, C, BH)

    def keys(i):
        b0, b1 = blocks[i]
        return first if i == 0 else _routed_keys(sel[b0:b1], anchors_flat, tok_chunk, b0, C, BH)

    counts = sum(torch.bincount(keys(i).reshape(-1), minlength=drop + 1) for i in range(len(blocks)))
    counts_h = counts.tolist()  # host read
    total = sum(counts_h[:drop])
    starts = torch.cumsum(counts, 0) - counts
    # int32 rows (half the memory); `B * L * H < 2**31` is checked by the caller.
    rows = torch.empty(total + 1, dtype=torch.int32, device=device)
    for i, (b0, _) in enumerate(blocks):
        sorted_key, flat = torch.sort(keys(i).reshape(-1), stable=True)  # within a key: (t, slot) order
        sorted_key = sorted_key.long()
        block_counts = torch.bincount(sorted_key, minlength=drop + 1)
        rank = torch.arange(flat.numel(), device=device) - (torch.cumsum(block_counts, 0) - block_counts)[sorted_key]
        pos = torch.where(sorted_key == drop, total, starts[sorted_key] + rank)  # dropped pairs: the scratch entry
        bh = b0 + flat // (L * S)
        t = (flat // S) % L
        rows.index_copy_(0, pos, (((bh // H) * L + t) * H + bh % H).to(torch.int32))
    return rows, counts_h[:drop]


@dataclass
class VarlenPlan:
    r"""
    The packing of one routing into var-len calls: host lists plus one device index.

    Attributes:
        anchor_src (`list[list[int]]`): per key chunk, the query chunks that have it as a mandatory anchor.
        anchor_dst (`list[list[int]]`): per query chunk, its mandatory anchor chunks.
        routed_rows (`torch.IntTensor` `(R + 1,)`): flat query rows of the routed pairs, sorted by
            `(chunk, bh, t)`; the last entry is scratch.
        routed_start, routed_count (`list[list[int]]`): per chunk and flat head, where its routed rows start and how
            many there are.
    """

    B: int
    L: int
    H: int
    offsets: tuple[int, ...]
    anchor_src: list[list[int]]
    anchor_dst: list[list[int]]
    routed_rows: torch.Tensor
    routed_start: list[list[int]]
    routed_count: list[list[int]]
    budgets: tuple[int, int]  # (forward, backward) bytes per call
    row_cost: int
    key_cost: int
    _calls: dict = field(default_factory=dict, repr=False)

    def size(self, c: int) -> int:
        return self.offsets[c + 1] - self.offsets[c]

    @cached_property
    def n_anchor(self) -> list[int]:
        """Per key chunk: how many query tokens have it as an anchor."""
        return [sum(self.size(a) for a in src) for src in self.anchor_src]

    def pairs(self) -> int:
        """Attended (query, key) token pairs, over all heads."""
        routed = sum(self.size(c) * sum(counts) for c, counts in enumerate(self.routed_count))
        return routed + self.B * self.H * sum(self.size(c) * n for c, n in enumerate(self.n_anchor))

    def segment_calls(self, with_anchors: bool) -> list[list[Piece]]:
        """Key-chunk segments cut into calls, in `(chunk, bh)` order: routed attendees only (forward) or anchor
        attendees first, then routed (backward)."""
        if with_anchors not in self._calls:
            self._calls[with_anchors] = self._split(with_anchors)
        return self._calls[with_anchors]

    def _split(self, with_anchors: bool) -> list[list[Piece]]:
        calls: list[list[Piece]] = []
        current: list[Piece] = []
        used = 0
        budget = self.budgets[with_anchors]
        for c in range(len(self.offsets) - 1):
            keys = self.size(c) * self.key_cost
            for bh in range(self.B * self.H):
                rows = self.routed_count[c][bh] + (self.n_anchor[c] if with_anchors else 0)
                if rows == 0:
                    continue
                fits = rows * self.row_cost + keys <= budget
                step = rows if fits else max(_MIN_PIECE_ROWS, (budget - keys) // self.row_cost)
                for lo in range(0, rows, step):
                    hi = min(rows, lo + step)
                    cost = (hi - lo) * self.row_cost + keys
                    if current and used + cost > budget:
                        calls.append(current)
                        current, used = [], 0
                    current.append(Piece(c, bh, lo, hi))
                    used += cost
        return calls + [current] if current else calls

    def anchor_calls(self) -> list[AnchorCall]:
        """Runs of consecutive query chunks (with at least one anchor) per batch element, cut by the budget."""
        C = len(self.offsets) - 1
        calls = []
        for b in range(self.B):
            start, used = None, 0
            for a in range(C + 1):  # a == C closes the last run
                keys = sum(self.size(c) for c in self.anchor_dst[a]) if a < C else 0
                cost = self.H * (self.size(a) * self.row_cost + keys * self.key_cost) if keys else 0
                if start is not None and (keys == 0 or used + cost > self.budgets[0]):
                    calls.append(AnchorCall(b, start, a))
                    start, used = None, 0
                if keys:
                    start = a if start is None else start
                    used += cost
        return calls


def build_varlen_plan(routing: MoCRouting, q: torch.Tensor, v: torch.Tensor, budget: int | None = None) -> VarlenPlan:
    r"""
    Pack a routing into var-len calls for inputs shaped like `q` `(B, L, H, D)` and `v` `(B, L, H, Dv)`.

    Args:
        routing (`MoCRouting`): the routing.
        q, v (`torch.Tensor`): the attention's queries and values (only shapes, dtype and device are used).
        budget (`int`, *optional*): bytes per call, forward and backward (default: [`memory_budget`]).
    """
    B, L, H, _ = q.shape
    layout = routing.layout
    if B * L * H >= 2**31 - 1:
        raise ValueError(f"the var-len backends index B * L * H = {B * L * H} query rows in int32; split the batch")
    if tuple(routing.selected.shape[:3]) != (B, H, L):
        raise ValueError(
            f"the routing is for (B, H, L) = {tuple(routing.selected.shape[:3])} but the inputs have {(B, H, L)}"
        )
    C, BH = layout.num_chunks, B * H
    anchors = routing.anchors.cpu().numpy()  # host read, (C, C)
    rows, counts = _routed_rows(routing, B, L, H)
    count = np.asarray(counts, dtype=np.int64).reshape(C, BH)
    start = (np.cumsum(count.reshape(-1)) - count.reshape(-1)).reshape(C, BH)
    row_cost, key_cost = call_costs(q, v)
    return VarlenPlan(
        B=B,
        L=L,
        H=H,
        offsets=tuple(layout.offsets),
        anchor_src=[np.flatnonzero(anchors[:, c]).tolist() for c in range(C)],
        anchor_dst=[np.flatnonzero(anchors[a]).tolist() for a in range(C)],
        routed_rows=rows,
        routed_start=start.tolist(),
        routed_count=count.tolist(),
        budgets=(memory_budget(q, v, False), memory_budget(q, v, True, rows.numel() * rows.element_size()))
        if budget is None
        else (budget, budget),
        row_cost=row_cost,
        key_cost=key_cost,
    )
