r"""MoC attention as flash-attention var-len calls over packed segments: the paper's scheme, on any executor.

**Forward.** The packing is `kernels/varlen_plan.py`:

1. *Anchor calls*: every token of a query chunk `a` attends the same mandatory anchors `M(a)` (own chunk, local
   window, text, own shot), so one var-len segment per query chunk, all heads at once, computes every token's
   attention over its anchors. The queries are a view of `q`, and the result is each token's first partial result,
   written straight into the accumulator.
2. *Segment calls*: per key chunk `c` and `(batch, head)`, the query tokens that routed to `c`, gathered head-major
   (one head per call, heads folded into the segments); keys are the chunk. Each call's partial results are merged
   into the float32 accumulator (float64 for float64 inputs) by log-sum-exp, one chunk after the other in chunk
   order.

So every query's output is the same sequence of operations on its own partial results (anchors first, then routed
chunks in chunk order), whatever else is packed around it: with an executor whose per-row result does not depend on
the other rows of a call, a query's output is bit-for-bit independent of other queries' routing and, with causal
routing, earlier shots are unchanged when later shots change. The portable CPU executor gets that property from
whole 32-row blocks (`row_multiple`: the packing pads segment calls for it); flash kernels compute rows
independently when split-KV is off, which the flash executor requests.

**Backward** (MoBA style): per key chunk and `(batch, head)`, one segment of all the queries that attend the chunk
(anchor attendees and routed), run through the executor's var-len backward with the *merged* output and
log-sum-exp, which gives exactly that segment's share of the gradient. `dq` is added into a float32 accumulator
(`index_add_`, atomic on CUDA: exact only to rounding), a chunk's `dk` and `dv` come out of its segments whole
(when the budget split them: added in place for float32 / float64, staged in float32 for float16 / bfloat16).
Nothing of the size of the attended pairs is kept for autograd: the plan is rebuilt from the routing.

**Memory.** Each call holds at most the plan's budget (`varlen_plan.memory_budget`, a fraction or small multiple
of the attention output chosen so that the forward+backward peak stays at or below dense attention's; all pairs at
once would be ~10 GB at 180k tokens, 12 heads, D=128 and ~19 attended chunks per token). Beyond the output, the
forward keeps the float32 accumulator, the backward a float32 `dq` (as FlashAttention's own backward does).

On CUDA the merge is one Triton kernel (`kernels/merge_triton.py`) where Triton imports, else the torch ops below.

Host reads per forward and backward: those of the plan (anchor matrix, routed counts) and those of the executor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..routing import MoCRouting
from .varlen_plan import AnchorCall, Piece, VarlenPlan, build_varlen_plan

__all__ = ["VarlenExecutor", "varlen_forward", "varlen_backward", "varlen_kernel_functions"]


class VarlenExecutor(Protocol):
    r"""
    Runs flash-attention var-len calls (non-causal, no dropout), flash-attn's calling convention:

    - `forward(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> (out, lse)`: `q` `(total_q, H, D)`, `k, v` `(total_k, H,
      D)` with a contiguous last dimension, `cu_q, cu_k` int32 cumulative lengths `(n + 1,)`, `max_q, max_k` Python
      ints; `out` `(total_q, H, Dv)` in `q.dtype`, `lse` `(H, total_q)` float32 (float64 for float64 inputs).
    - `backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale) -> (dq, dk, dv)` from the given `out` and
      `lse` (which may be the merged ones), in the dtypes of `q, k, v`.

    Optional attributes ask the packing to pad the query segments of segment calls (padding rows repeat a row of the
    segment; their results are discarded): `row_multiple` (int) to a multiple of that many rows, `uniform_segments`
    (float) the segments of one chunk to one length where that adds at most that share of rows.
    """

    name: str

    def forward(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float): ...

    def backward(self, grad_out, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float): ...


class _Buffers:
    """Reusable scratch tensors (a fresh CPU allocation costs a page-faulting pass of its own)."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, rows: int, like: torch.Tensor, cols: int, dtype=None) -> torch.Tensor:
        dtype = like.dtype if dtype is None else dtype
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(max(rows, 1), cols, dtype=dtype, device=like.device)
        return buf[:rows]

    def gather(self, name: str, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of `x` `(n, D)` as `(len(rows), 1, D)`, into a reused buffer."""
        return torch.index_select(x, 0, rows, out=self.take(name, rows.numel(), x, x.shape[-1])).unsqueeze(1)


def _token_ranges(ranges: list[tuple[int, int]], device) -> torch.Tensor:
    """The token ids of a few `(start, end)` ranges, without a host read: an arange plus a per-range shift."""
    lengths = [e - s for s, e in ranges]
    n = sum(lengths)
    shift = [s - c for (s, _), c in zip(ranges, np.cumsum([0] + lengths[:-1]).tolist())]
    return torch.arange(n, device=device) + torch.repeat_interleave(
        torch.tensor(shift, device=device), torch.tensor(lengths, device=device), output_size=n
    )


# ---------------------------------------------------------------------------------------------- segment calls
@dataclass
class _SegmentCall:
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
    tok = _token_ranges([(plan.offsets[a], plan.offsets[a + 1]) for a in plan.anchor_src[c]], device)
    bh = torch.arange(plan.B * plan.H, device=device)
    return ((bh // plan.H)[:, None] * plan.L + tok[None, :]) * plan.H + (bh % plan.H)[:, None]


def _padded_lengths(pieces: list[Piece], executor) -> list[int]:
    """Rows of each segment after the padding `executor` asks for: to a multiple of `row_multiple`, and the segments
    of one chunk to one length where that adds at most a share `uniform_segments` of rows."""
    multiple = getattr(executor, "row_multiple", 1)
    uniform = getattr(executor, "uniform_segments", None)
    rows = [p.hi - p.lo for p in pieces]
    padded = [-(-m // multiple) * multiple for m in rows]
    if uniform is not None:
        i = 0
        while i < len(pieces):
            j = i
            while j < len(pieces) and pieces[j].chunk == pieces[i].chunk:
                j += 1
            top = max(padded[i:j])
            if top * (j - i) <= (1 + uniform) * sum(rows[i:j]):
                padded[i:j] = [top] * (j - i)
            i = j
    return padded


def _pack(plan: VarlenPlan, pieces: list[Piece], with_anchors: bool, device, executor) -> _SegmentCall:
    """Index tensors and lengths of one segment call, segments padded as the executor asks (`_padded_lengths`) by
    repeating their last row; the padding rows' results go to the scratch row `B * L * H`."""
    parts, pads, cu_q, cu_k, chunks = [], [], [0], [0], []
    anchor_cache: dict[int, torch.Tensor] = {}
    max_q = max_k = 0
    for piece, length in zip(pieces, _padded_lengths(pieces, executor)):
        c, bh = piece.chunk, piece.bh
        if not chunks or chunks[-1][0] != c:
            chunks.append([c, cu_q[-1], cu_q[-1], cu_k[-1], cu_k[-1], []])
        n_a = plan.n_anchor[c] if with_anchors else 0
        if piece.lo < n_a:
            if c not in anchor_cache:
                anchor_cache[c] = _anchor_rows(plan, c, device)
            parts.append(anchor_cache[c][bh, piece.lo : min(piece.hi, n_a)])
        if piece.hi > n_a:
            s = plan.routed_start[c][bh]
            parts.append(plan.routed_rows[s + max(piece.lo - n_a, 0) : s + piece.hi - n_a].long())
        rows = piece.hi - piece.lo
        pad = length - rows
        if pad:
            pads.append((cu_q[-1] + rows, pad))
            parts.append(parts[-1][-1:].expand(pad))
        cu_q.append(cu_q[-1] + rows + pad)
        cu_k.append(cu_k[-1] + plan.size(c))
        max_q, max_k = max(max_q, rows + pad), max(max_k, plan.size(c))
        chunks[-1][2], chunks[-1][4] = cu_q[-1], cu_k[-1]
        chunks[-1][5].append(bh)
    rows = torch.cat(parts) if len(parts) > 1 else parts[0]
    merge_rows = rows
    if pads:
        merge_rows = rows.clone()
        for start, pad in pads:
            merge_rows[start : start + pad] = plan.B * plan.L * plan.H
    return _SegmentCall(
        rows,
        merge_rows,
        torch.tensor(cu_q, dtype=torch.int32, device=device),
        torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_q,
        max_k,
        [tuple(ch) for ch in chunks],
    )


def _chunk_keys(x: torch.Tensor, lo: int, hi: int, bhs: list[int], H: int) -> torch.Tensor:
    """`(len(bhs) * n, 1, D)`: chunk `lo:hi` of `x` `(B, L, H, D)` for the flat heads `bhs`, head-major."""
    if bhs == list(range(x.shape[0] * H)):
        block = x[:, lo:hi].transpose(1, 2)  # (B, H, n, D) view; the reshape copies it head-major
    else:
        block = torch.stack([x[bh // H, lo:hi, bh % H] for bh in bhs])
    return block.reshape(-1, 1, x.shape[-1])


def _segment_keys(call: _SegmentCall, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan):
    ks, vs = [], []
    for c, _, _, _, _, bhs in call.chunks:
        lo, hi = plan.offsets[c], plan.offsets[c + 1]
        ks.append(_chunk_keys(k, lo, hi, bhs, plan.H))
        vs.append(_chunk_keys(v, lo, hi, bhs, plan.H))
    return (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks), torch.cat(vs))


# ---------------------------------------------------------------------------------------------- forward
def _anchor_call(plan: VarlenPlan, call: AnchorCall, q, k, v, executor, scale):
    """One anchor call: `(first token, end token, out (n, H, Dv), lse (H, n))` for batch element `call.b`."""
    off = plan.offsets
    t0, t1 = off[call.first], off[call.last]
    chunks = range(call.first, call.last)
    key_ranges = [(off[c], off[c + 1]) for a in chunks for c in plan.anchor_dst[a]]
    if key_ranges == [(off[a], off[a + 1]) for a in chunks]:  # own chunks only: the keys are a view too
        kc, vc = k[call.b, t0:t1], v[call.b, t0:t1]
    else:
        idx = _token_ranges(key_ranges, q.device)
        kc, vc = k[call.b].index_select(0, idx), v[call.b].index_select(0, idx)
    n_keys = [sum(plan.size(c) for c in plan.anchor_dst[a]) for a in chunks]
    cu_q = torch.tensor([off[a] - t0 for a in (*chunks, call.last)], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor(np.cumsum([0] + n_keys).tolist(), dtype=torch.int32, device=q.device)
    max_q = max(plan.size(a) for a in chunks)
    o, lse = executor.forward(q[call.b, t0:t1], kc, vc, cu_q, cu_k, max_q, max(n_keys), scale)
    return t0, t1, o, lse


def _fused_merge():
    """The Triton merge kernel (`kernels/merge_triton.py`), or `None` where Triton does not import."""
    global _FUSED_MERGE
    if _FUSED_MERGE is None:
        try:
            from .merge_triton import merge  # noqa: PLC0415  (optional: Triton ships with CUDA builds of torch)
        except ImportError:
            merge = False
        _FUSED_MERGE = merge
    return _FUSED_MERGE or None


_FUSED_MERGE = None


def _merge(acc, lse_acc, rows, o, lse, bufs: _Buffers) -> None:
    """Merge partial results `(o, lse)` of distinct query rows into the running `(acc, lse_acc)`, by log-sum-exp.
    `o` may be overwritten. On CUDA one fused Triton kernel does it (same arithmetic for every row)."""
    if acc.is_cuda and acc.dtype == torch.float32 and _fused_merge() is not None:
        return _fused_merge()(acc, lse_acc, rows, o, lse)
    old = lse_acc.index_select(0, rows)
    top = torch.maximum(old, lse)  # NaN propagates
    w_old, w_new = torch.exp(old - top), torch.exp(lse - top)
    total = w_old + w_new
    # acc + ((a - 1) * acc + b * o) = a * acc + b * o, with one gather and one index_add_ (faster than index_copy_ on
    # the CPU; one addition per row, so the same bits on CUDA too). Only elementwise arithmetic (no fused
    # multiply-add), exp and log: a row's result does not depend on where it sits. A row's first partial result
    # (no anchor) gives a = 0, b = 1: the partial itself, exactly.
    delta = torch.index_select(acc, 0, rows, out=bufs.take("merge", rows.numel(), acc, acc.shape[1]))
    delta.mul_((w_old / total - 1)[:, None])
    b = (w_new / total)[:, None]
    delta += o.mul_(b) if o.dtype == acc.dtype else o.to(acc.dtype) * b
    acc.index_add_(0, rows, delta)
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
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # kernels read rows of D
    plan = build_varlen_plan(routing, q, v) if plan is None else plan
    work = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 merge in float32, float64 stays float64
    n = B * L * H
    acc = torch.zeros(n + 1, Dv, dtype=work, device=q.device)  # + the scratch row of padding rows
    lse_acc = torch.full((n + 1,), -math.inf, dtype=work, device=q.device)
    acc_bl, lse_bl = acc[:n].view(B, L, H, Dv), lse_acc[:n].view(B, L, H)
    for call in plan.anchor_calls():  # first partial result of every token: written, not merged
        t0, t1, o, lse = _anchor_call(plan, call, q, k, v, executor, scale)
        acc_bl[call.b, t0:t1] = o
        lse_bl[call.b, t0:t1] = lse.T
    bufs = _Buffers()
    q_flat = q.reshape(n, D)
    for pieces in plan.segment_calls(with_anchors=False):
        call = _pack(plan, pieces, False, q.device, executor)
        kc, vc = _segment_keys(call, k, v, plan)
        qc = bufs.gather("q", q_flat, call.rows)
        o, lse = executor.forward(qc, kc, vc, call.cu_q, call.cu_k, call.max_q, call.max_k, scale)
        o, lse = o.reshape(-1, Dv), lse.reshape(-1)
        for _, r0, r1, _, _, _ in call.chunks:  # chunk by chunk: a query appears once per chunk
            _merge(acc, lse_acc, call.merge_rows[r0:r1], o[r0:r1], lse[r0:r1].to(work), bufs)
        del call, kc, vc, qc, o, lse
    del bufs, plan  # before the cast to the input dtype
    return acc_bl.to(q.dtype), lse_bl.permute(0, 2, 1).contiguous()


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
    plan = build_varlen_plan(routing, q, v) if plan is None else plan
    work = torch.promote_types(q.dtype, torch.float32)
    n = B * L * H
    q_flat, do_flat, o_flat = (x.reshape(n, x.shape[-1]) for x in (q, grad_out, out))
    # + the scratch row: padding rows read an infinite log-sum-exp (probability 0, so no share of dk, dv).
    lse_flat = torch.cat([lse.to(work).permute(0, 2, 1).reshape(n), lse.new_full((1,), math.inf, dtype=work)])
    dq = torch.zeros(n + 1, D, dtype=work, device=q.device)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    calls = plan.segment_calls(with_anchors=True)
    last_call = {piece.chunk: i for i, pieces in enumerate(calls) for piece in pieces}
    staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bufs = _Buffers()
    for i, pieces in enumerate(calls):
        call = _pack(plan, pieces, True, q.device, executor)
        kc, vc = _segment_keys(call, k, v, plan)
        rows = call.rows
        args = (
            bufs.gather("do", do_flat, rows),
            bufs.gather("q", q_flat, rows),
            kc,
            vc,
            bufs.gather("o", o_flat, rows),
        )
        lse_c = lse_flat.index_select(0, call.merge_rows).view(1, -1)
        dq_c, dk_c, dv_c = executor.backward(*args, lse_c, call.cu_q, call.cu_k, call.max_q, call.max_k, scale)
        dq.index_add_(0, call.merge_rows, dq_c.reshape(-1, D).to(work))
        for c, _, _, k0, k1, bhs in call.chunks:
            _chunk_grads(dk, dv, dk_c[k0:k1], dv_c[k0:k1], c, bhs, plan, staged, last_call[c] == i, work)
        del call, kc, vc, args, lse_c, dq_c, dk_c, dv_c
    # The calls' buffers go before dq is cast: the cast's copy reuses their room (see `memory_budget`).
    del bufs, plan, lse_flat
    return dq[:n].view(B, L, H, D).to(q.dtype), dk, dv


def _chunk_grads(dk, dv, dk_c, dv_c, c, bhs, plan: VarlenPlan, staged, done: bool, work) -> None:
    """Write (or stage, when chunk `c`'s segments are spread over calls or split) the key gradients of chunk `c`."""
    B, H = plan.B, plan.H
    lo, hi = plan.offsets[c], plan.offsets[c + 1]
    n = hi - lo
    if done and c not in staged and bhs == list(range(B * H)):  # every segment, once, in this call: complete
        for dst, src in ((dk, dk_c), (dv, dv_c)):
            dst[:, lo:hi] = src.view(B, H, n, -1).transpose(1, 2)
        return
    if dk.dtype == work and dv.dtype == work:
        # float32 / float64 gradients accumulate in place (`staged` only marks the chunk as begun): a float32 stage
        # of the chunk's B * H * n rows of dk and dv would raise the backward's peak above dense attention's.
        staged.setdefault(c, None)
        for b in range(B):
            at = [i for i, bh in enumerate(bhs) if bh // H == b]
            if not at:
                continue
            heads = torch.tensor([bhs[i] % H for i in at], device=dk.device)
            for dst, src in ((dk, dk_c), (dv, dv_c)):
                part = src.reshape(len(bhs), n, -1)[at[0] : at[-1] + 1]  # `bhs` ascend: b's pieces are consecutive
                dst[b, lo:hi].transpose(0, 1).index_add_(0, heads, part)
        if done:
            staged.pop(c)
        return
    idx = torch.tensor(bhs, device=dk.device)
    if c not in staged:
        staged[c] = tuple(torch.zeros(B * H, n, x.shape[-1], dtype=work, device=x.device) for x in (dk, dv))
    for stage, src in zip(staged[c], (dk_c, dv_c)):
        stage.index_add_(0, idx, src.reshape(len(bhs), n, -1).to(work))
    if done:
        for dst, stage in zip((dk, dv), staged.pop(c)):
            dst[:, lo:hi] = stage.view(B, H, n, -1).transpose(1, 2)


def varlen_kernel_functions(
    choose: Callable[[torch.Tensor, torch.Tensor], VarlenExecutor],
) -> tuple[Callable, Callable]:
    """`(forward, backward)` of a `MoCKernel` running the var-len scheme on the executor `choose(q, v)` returns."""

    def forward(q, k, v, routing, scale):
        return varlen_forward(q, k, v, routing, scale, choose(q, v))

    def backward(grad_out, q, k, v, out, lse, routing, scale):
        return varlen_backward(grad_out, q, k, v, out, lse, routing, scale, choose(q, v))

    return forward, backward
