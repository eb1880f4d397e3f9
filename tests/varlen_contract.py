r"""flash-attn's documented argument contract for var-len calls, and an executor wrapper that checks every call.

The contract (`flash_attn_varlen_func`'s docstring and the checks of its CUDA entry points, flash-attn 2.6 to 2.8;
PyTorch's `aten._flash_attention_forward` takes the same):

- `q` `(total_q, nheads, headdim)`, `k` and `v` `(total_k, nheads_k, headdim)`, `nheads % nheads_k == 0`, one dtype
  (float16 or bfloat16) and one device for all three, the last dimension contiguous, `headdim <= 256`;
- `cu_seqlens_q`, `cu_seqlens_k`: int32, 1-D, contiguous, on the same device, of one length `batch + 1`, starting
  at 0, non-decreasing, ending at `total_q` / `total_k`;
- `max_seqlen_q`, `max_seqlen_k`: Python ints, at least the longest sequence;
- backward: `out` and `dout` shaped like `q` with a contiguous last dimension, `softmax_lse` float32
  `(nheads, total_q)` contiguous.

On top, what MoC's packing promises: no empty query or key sequence and the maximal lengths exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["varlen_contract_violations", "RecordingExecutor"]


def _cu_violations(name: str, cu, total: int, device) -> list[str]:
    bad = []
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.ndim != 1 or not cu.is_contiguous():
        return [f"{name} must be a contiguous 1-D int32 tensor, got {getattr(cu, 'dtype', type(cu))}"]
    if cu.device != device:
        bad.append(f"{name} is on {cu.device}, the tensors on {device}")
    values = cu.tolist()
    if not values or values[0] != 0:
        bad.append(f"{name} must start at 0")
    if any(b < a for a, b in zip(values, values[1:])):
        bad.append(f"{name} must be non-decreasing")
    if values and values[-1] != total:
        bad.append(f"{name} ends at {values[-1]} but the packed tensor has {total} rows")
    return bad


def varlen_contract_violations(
    q, k, v, cu_q, cu_k, max_q, max_k, *, out=None, grad_out=None, lse=None, dtypes=(torch.float16, torch.bfloat16)
) -> list[str]:
    r"""
    Every way these var-len call arguments break the contract above (empty list: valid).

    Args:
        dtypes (`tuple`): the dtypes accepted for `q, k, v` (flash kernels: float16, bfloat16; pass `None` to check
            only that the three agree, e.g. for a float32 run of the portable executor).
    """
    bad = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            bad.append(f"{name} must be (total, nheads, headdim), got shape {tuple(x.shape)}")
        elif x.stride(-1) != 1:
            bad.append(f"{name} must have a contiguous last dimension, got strides {x.stride()}")
    if bad:
        return bad
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        bad.append(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if dtypes is not None and q.dtype not in dtypes:
        bad.append(f"q, k, v must be one of {[str(d) for d in dtypes]}, got {q.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        bad.append("q, k, v must be on one device")
    if k.shape != v.shape[:2] + k.shape[2:] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        bad.append(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share (total_k, nheads_k), nheads_k | nheads")
    if q.shape[-1] != k.shape[-1] or q.shape[-1] > 256 or v.shape[-1] > 256:
        bad.append(f"head sizes must agree for q and k and be at most 256, got {q.shape[-1]}, {k.shape[-1]}")
    bad += _cu_violations("cu_seqlens_q", cu_q, q.shape[0], q.device)
    bad += _cu_violations("cu_seqlens_k", cu_k, k.shape[0], q.device)
    if bad:
        return bad
    if cu_q.numel() != cu_k.numel():
        bad.append(f"cu_seqlens_q and cu_seqlens_k must have one length, got {cu_q.numel()} and {cu_k.numel()}")
        return bad
    lq, lk = (cu[1:] - cu[:-1] for cu in (cu_q, cu_k))
    for name, value, lengths in (("max_seqlen_q", max_q, lq), ("max_seqlen_k", max_k, lk)):
        if not isinstance(value, int) or isinstance(value, bool):
            bad.append(f"{name} must be a Python int, got {type(value).__name__}")
        elif lengths.numel() and value != int(lengths.max()):
            bad.append(f"{name}={value} but the longest sequence has {int(lengths.max())}")
    if lq.numel() and (int(lq.min()) < 1 or int(lk.min()) < 1):
        bad.append("MoC packs no empty query or key sequence")
    for name, x, width in (("out", out, v.shape[-1]), ("dout", grad_out, v.shape[-1])):
        if x is not None and (tuple(x.shape) != (*q.shape[:2], width) or x.stride(-1) != 1 or x.dtype != q.dtype):
            bad.append(f"{name} must be shaped like q with v's head size, in q's dtype, last dimension contiguous")
    if lse is not None and (
        lse.dtype != torch.float32 or tuple(lse.shape) != (q.shape[1], q.shape[0]) or not lse.is_contiguous()
    ):
        bad.append(f"softmax_lse must be contiguous float32 (nheads, total_q), got {lse.dtype} {tuple(lse.shape)}")
    return bad


@dataclass
class RecordingExecutor:
    r"""
    Wraps a var-len executor: records every call and the contract violations of its arguments.

    Attributes:
        calls (`list[dict]`): per call, `"kind"` (`"forward"` / `"backward"`), segment count, `max_q`, `max_k`.
        violations (`list[str]`): every violation seen, prefixed with the call number.
    """

    inner: object
    dtypes: tuple | None = (torch.float16, torch.bfloat16)
    calls: list = field(default_factory=list)
    violations: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def __getattr__(self, attr):  # the packing options the wrapped executor asks for (`row_multiple`, ...)
        if attr in ("row_multiple", "uniform_segments"):
            return getattr(self.inner, attr)
        raise AttributeError(attr)

    def _record(self, kind, q, k, v, cu_q, cu_k, max_q, max_k, **extra):
        bad = varlen_contract_violations(q, k, v, cu_q, cu_k, max_q, max_k, dtypes=self.dtypes, **extra)
        n = len(self.calls)
        self.calls.append({"kind": kind, "segments": cu_q.numel() - 1, "max_q": max_q, "max_k": max_k})
        self.violations += [f"call {n} ({kind}): {b}" for b in bad]

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale):
        self._record("forward", q, k, v, cu_q, cu_k, max_q, max_k)
        return self.inner.forward(q, k, v, cu_q, cu_k, max_q, max_k, scale)

    def backward(self, grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
        self._record("backward", q, k, v, cu_q, cu_k, max_q, max_k, out=out, grad_out=grad_out, lse=lse)
        return self.inner.backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)
