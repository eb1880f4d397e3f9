r"""The var-len scheme's log-sum-exp merge as one Triton kernel, for CUDA (`kernels/varlen.py` uses it there).

The torch merge takes a dozen kernels and about 58 bytes of memory traffic per merged element (gathers, scaled
copies, an index_add); this kernel reads the accumulator row and the partial row once and writes the accumulator
once (10 bytes per element in bfloat16), which matters at long lengths: ~35 million merged rows of 128 at 180k
tokens. Each program merges a block of distinct rows; a row's arithmetic is the same wherever it sits, so the
exactness of the scheme (a query's output independent of other queries' routing) holds. NaN propagates through
the running maximum.

Tested on the CPU in the Triton interpreter against the torch merge; not yet run on a GPU. No host reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["merge"]


@triton.jit
def _merge_kernel(ACC, LSE_ACC, ROWS, PART, LSE, n, DV, s_acc, s_o, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < n
    row = tl.load(ROWS + r, mask=ok, other=0).to(tl.int64)
    old = tl.load(LSE_ACC + row, mask=ok, other=0.0)
    new = tl.load(LSE + r, mask=ok, other=0.0)
    top = tl.maximum(old, new, propagate_nan=tl.PropagateNan.ALL)
    w_old = tl.exp(old - top)  # 0 on a row's first partial result (old = -inf), so that one is copied exactly
    w_new = tl.exp(new - top)
    total = w_old + w_new
    d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (d < DV)[None, :]
    acc_ptr = ACC + row[:, None] * s_acc + d[None, :]
    acc = tl.load(acc_ptr, mask=mask, other=0.0)
    o = tl.load(PART + r.to(tl.int64)[:, None] * s_o + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(acc_ptr, acc * (w_old / total)[:, None] + o * (w_new / total)[:, None], mask=mask)
    tl.store(LSE_ACC + row, top + tl.log(total), mask=ok)


def merge(acc: torch.Tensor, lse_acc: torch.Tensor, rows: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    r"""
    In place: `acc[rows], lse_acc[rows]` become the log-sum-exp merge of themselves with `(o, lse)`.

    Args:
        acc (`torch.Tensor` `(N, Dv)` float32), lse_acc (`(N,)` float32): the running results.
        rows (`torch.LongTensor` `(n,)`): distinct rows of `acc` (repeats only of a scratch row).
        o (`(n, Dv)`, any float dtype, last dimension contiguous), lse (`(n,)` float32): the partial results.
    """
    n, dv = o.shape
    if n == 0:
        return
    block_d = triton.next_power_of_2(dv)
    block_r = max(1, 4096 // block_d)
    _merge_kernel[(triton.cdiv(n, block_r),)](
        acc, lse_acc, rows, o, lse, n, dv, acc.stride(0), o.stride(0), BLOCK_R=block_r, BLOCK_D=block_d
    )
