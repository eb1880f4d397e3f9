r"""Executors of flash-attention var-len calls in PyTorch (see [`~kernels.varlen.VarlenExecutor`]).

- [`TorchExecutor`] (backend `"torch"`): portable. Per segment, PyTorch's fused CPU flash-attention kernel on the
  CPU (same head size for queries and values), plain float32 matmuls elsewhere (any device, any head sizes; on a GPU
  in fixed-size row tiles, so that a row's result does not depend on its segment's length).
- [`TorchFlashExecutor`] (backend `"flash"`): PyTorch's own CUDA flash-attention var-len kernels,
  `torch.ops.aten._flash_attention_forward` / `_flash_attention_backward` with `cum_seq_q` / `cum_seq_k` (what
  `torch.nn.attention.varlen.varlen_attn` calls; that public wrapper returns the log-sum-exp but has no backward
  that takes another output and log-sum-exp, which the MoBA-style backward needs, so the ops are called directly).
  Features are detected from the op schemas; [`torch_flash_unsupported`] names what is missing.

Host reads: the portable executor reads `cu_seqlens` on the host (CPU tensors there; one copy per call on CUDA).
The flash executor reads nothing.
"""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = [
    "TorchExecutor",
    "TorchFlashExecutor",
    "torch_flash_unavailable",
    "torch_flash_unsupported",
    "choose_executor",
    "pad_head",
]

# BLAS computes a row of a product of very few rows (1 to 7, a GEMV-like path) differently from the same row in a
# larger product, and the fused CPU kernel inherits this for its last, partial query block. With every segment
# padded to whole 32-row blocks (the packing does it, see `row_multiple`) and matmul row tiles of whole blocks,
# every product has at least 32 rows (the fused kernel's query blocks are 32, 64 or 256 rows), so a row's result
# never depends on how many rows share its segment: the exactness the causal DAG property needs (tested).
_ROW_MULTIPLE = 32
# Upper bound on the elements of one float32 score tile in the matmul path.
_TILE_ELEMS = 1 << 24


def _fused_cpu_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


# ---------------------------------------------------------------------------------------------- portable executor
def _matmul_fwd(q, k, v, scale):
    """`q (..., m, D), k (..., n, D), v (..., n, Dv)` -> `(out (..., m, Dv), lse (..., m))` in float32 (float64 stays
    float64)."""
    work = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)).mul_(scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(s.sub_(lse[..., None]).exp_(), v.to(work)), lse


# cuBLAS (unlike CPU BLAS over whole 32-row blocks) picks its kernel by the product's shape, so on a GPU a row's result
# would depend on how many rows share its segment. There the forward runs every segment in tiles of exactly this many
# rows, all heads at once, the last tile zero-padded: one product shape per key length.
_DEVICE_TILE_ROWS = 256


def _fixed_tiles(device: torch.device) -> bool:
    return device.type != "cpu"


def _fixed_tile_forward(q, k, v, cu_q, cu_k, scale, out, lse) -> None:
    """The matmul forward in fixed tiles of `_DEVICE_TILE_ROWS` rows, all heads per product (see there)."""
    for a, b, c0, c1 in _segments(cu_q, cu_k):
        keys, values = k[c0:c1].transpose(0, 1), v[c0:c1].transpose(0, 1)  # (H, n, D)
        for r in range(a, b, _DEVICE_TILE_ROWS):
            e = min(b, r + _DEVICE_TILE_ROWS)
            rows = torch.nn.functional.pad(q[r:e], (0, 0, 0, 0, 0, _DEVICE_TILE_ROWS - (e - r)))
            o, l_ = _matmul_fwd(rows.transpose(0, 1), keys, values, scale)  # (H, T, Dv), (H, T)
            out[r:e] = o[:, : e - r].transpose(0, 1)
            lse[:, r:e] = l_[:, : e - r]


def _matmul_bwd(do, q, k, v, o, lse, scale):
    work = lse.dtype
    q, k, v, do = q.to(work), k.to(work), v.to(work), do.to(work)
    p = torch.matmul(q, k.T).mul_(scale).sub_(lse[:, None]).exp_()
    dv = torch.matmul(p.T, do)
    delta = (do * o.to(work)).sum(-1, keepdim=True)
    ds = p.mul_(torch.matmul(do, v.T).sub_(delta))
    return torch.matmul(ds, k).mul_(scale), torch.matmul(ds.T, q).mul_(scale), dv


def _batched(x: torch.Tensor, start: int, count: int, rows: int) -> torch.Tensor:
    """Rows `start : start + count * rows` of `x` `(total, H, D)` as `(count, H, rows, D)` (a view)."""
    return x[start : start + count * rows].view(count, rows, *x.shape[1:]).transpose(1, 2)


def _cpu_fwd(q, k, v, scale):
    """The fused CPU kernel on `(g, H, m, D)` views."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)


def _cpu_bwd(do, q, k, v, o, lse, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, o, lse.contiguous(), 0.0, False, scale=scale
    )


class TorchExecutor:
    r"""
    Portable executor: loops over the segments of a call. On the CPU with one head size for queries and values it
    runs PyTorch's fused flash-attention kernel, on every run of consecutive segments of one shape at once, all
    heads; otherwise float32 matmuls per segment and head, in row tiles of whole 32-row blocks and at most 2^24
    scores. Asks the packing for segments of whole 32-row blocks (`row_multiple`) and, where that wastes little,
    for the segments of a chunk padded to one length (`uniform_segments`).

    Args:
        fused (`bool`, *optional*): force (`True`) or avoid (`False`) the fused CPU kernel; default: where it runs.
    """

    name = "torch"
    #: The packing pads every segment to whole blocks of this many rows (see `_ROW_MULTIPLE`).
    row_multiple = _ROW_MULTIPLE
    #: ... and the segments of one chunk to one length when that adds at most this share of rows (one kernel call).
    uniform_segments = 0.125

    def __init__(self, fused: bool | None = None):
        self.fused = fused

    def _fused(self, q, v) -> bool:
        can = q.device.type == "cpu" and _fused_cpu_available() and q.shape[-1] == v.shape[-1]
        return can if self.fused is None else (self.fused and can)

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale):
        total, heads, _ = q.shape
        work = torch.promote_types(q.dtype, torch.float32)
        out = q.new_empty(total, heads, v.shape[-1])
        lse = torch.empty(heads, total, dtype=work, device=q.device)
        if self._fused(q, v):
            # Runs of segments of one shape go through the kernel at once, all heads: it parallelises over them.
            for a, m, c0, n, g in _runs(cu_q, cu_k):
                o, l_ = _cpu_fwd(_batched(q, a, g, m), _batched(k, c0, g, n), _batched(v, c0, g, n), scale)
                _batched(out, a, g, m).copy_(o)
                lse[:, a : a + g * m].view(heads, g, m).copy_(l_.transpose(0, 1))
            return out, lse
        if _fixed_tiles(q.device):
            _fixed_tile_forward(q, k, v, cu_q, cu_k, scale, out, lse)
            return out, lse
        for a, b, c0, c1 in _segments(cu_q, cu_k):
            for h in range(heads):
                for r, e in _row_tiles(b - a, c1 - c0):
                    o, l_ = _matmul_fwd(q[a + r : a + e, h], k[c0:c1, h], v[c0:c1, h], scale)
                    out[a + r : a + e, h], lse[h, a + r : a + e] = o, l_
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
        heads = q.shape[1]
        work = torch.promote_types(q.dtype, torch.float32)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if self._fused(q, v):
            for a, m, c0, n, g in _runs(cu_q, cu_k):
                rows = [_batched(x, a, g, m) for x in (grad_out, q)]
                keys = [_batched(x, c0, g, n) for x in (k, v)]
                lse_g = lse[:, a : a + g * m].view(heads, g, m).transpose(0, 1)
                grads = _cpu_bwd(*rows, *keys, _batched(out, a, g, m), lse_g, scale)
                for dst, src, start, length in zip((dq, dk, dv), grads, (a, c0, c0), (m, n, n)):
                    _batched(dst, start, g, length).copy_(src)
            return dq, dk, dv
        for a, b, c0, c1 in _segments(cu_q, cu_k):
            for h in range(heads):
                args = (grad_out[a:b, h], q[a:b, h], k[c0:c1, h], v[c0:c1, h], out[a:b, h], lse[h, a:b])
                gk = torch.zeros(c1 - c0, k.shape[-1], dtype=work, device=k.device)
                gv = torch.zeros(c1 - c0, v.shape[-1], dtype=work, device=v.device)
                for r, e in _row_tiles(b - a, c1 - c0):
                    tile = [x[r:e] for x in args[:2]] + list(args[2:4]) + [x[r:e] for x in args[4:]]
                    gq, gk_, gv_ = _matmul_bwd(*tile, scale)
                    dq[a + r : a + e, h] = gq
                    gk += gk_
                    gv += gv_
                dk[c0:c1, h], dv[c0:c1, h] = gk, gv
        return dq, dk, dv


def _row_tiles(rows: int, keys: int):
    step = max(_ROW_MULTIPLE, _TILE_ELEMS // max(1, keys) // _ROW_MULTIPLE * _ROW_MULTIPLE)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor):
    cq, ck = cu_q.tolist(), cu_k.tolist()  # host read on CUDA
    for i in range(len(cq) - 1):
        if cq[i + 1] > cq[i]:
            yield cq[i], cq[i + 1], ck[i], ck[i + 1]


def _runs(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """`(first q row, q rows, first k row, k rows, count)` for every run of consecutive non-empty segments of one
    shape."""
    runs = []
    for a, b, c0, c1 in _segments(cu_q, cu_k):
        if runs and runs[-1][1] == b - a and runs[-1][3] == c1 - c0 and runs[-1][0] + runs[-1][4] * (b - a) == a:
            runs[-1][4] += 1
        else:
            runs.append([a, b - a, c0, c1 - c0, 1])
    return runs


# ---------------------------------------------------------------------------------------------- PyTorch flash
_FWD_ARGS = ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal")
_BWD_ARGS = ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k")


def _schema_names(op_name: str) -> list[str] | None:
    op = getattr(torch.ops.aten, op_name, None)
    if op is None:
        return None
    try:
        return [a.name for a in op.default._schema.arguments]
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _torch_flash_missing() -> str | None:
    """Why this PyTorch build cannot run its flash var-len kernels (device-independent), or `None`."""
    fwd, bwd = _schema_names("_flash_attention_forward"), _schema_names("_flash_attention_backward")
    if fwd is None or bwd is None:
        return f"PyTorch {torch.__version__} has no aten._flash_attention_forward/_backward ops"
    if tuple(fwd[: len(_FWD_ARGS)]) != _FWD_ARGS or tuple(bwd[: len(_BWD_ARGS)]) != _BWD_ARGS or "scale" not in fwd:
        return f"PyTorch {torch.__version__}'s aten._flash_attention_forward/_backward have an unknown signature"
    if getattr(torch.version, "hip", None):
        return "on ROCm the flash var-len log-sum-exp is padded per sequence, which this executor does not read"
    if not torch.cuda.is_available():
        return "PyTorch's flash var-len kernels need CUDA, and this PyTorch sees no CUDA device"
    available = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    if available is not None and not available():
        return f"this PyTorch build ({torch.__version__}) has no flash-attention kernels"
    return None


def flash_device_unsupported(device: torch.device) -> str | None:
    """Why flash kernels cannot run on `device` (any dtype), or `None`."""
    if device.type != "cuda":
        return f"PyTorch's flash var-len kernels need CUDA tensors, got {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"flash-attention kernels need a GPU of compute capability 8.0 or newer, got {major}.{minor}"
    return None


def flash_inputs_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why flash kernels cannot take these inputs (dtype, head sizes), or `None`."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attention kernels take float16 or bfloat16, got {str(q.dtype).replace('torch.', '')}"
    if q.shape[-1] != v.shape[-1]:
        return f"flash-attention kernels need one head size for queries and values, got {q.shape[-1]} and {v.shape[-1]}"
    if q.shape[-1] > 256:
        return f"flash-attention kernels take head sizes up to 256, got {q.shape[-1]}"
    return None


def torch_flash_unavailable(device: torch.device) -> str | None:
    """Why PyTorch's flash var-len kernels cannot run on `device` at all, or `None`."""
    return _torch_flash_missing() or flash_device_unsupported(torch.device(device))


def torch_flash_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why PyTorch's flash var-len kernels cannot run these inputs, or `None`."""
    return torch_flash_unavailable(q.device) or flash_inputs_unsupported(q, v)


def pad_head(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Zero-pad the last dimension to a multiple of `multiple` (flash kernels' head-size granularity)."""
    extra = (-x.shape[-1]) % multiple
    return x if extra == 0 else torch.nn.functional.pad(x, (0, extra))


def _flash_ops():
    """PyTorch's flash var-len ops `(forward, backward)` (one place to look them up; tests put stand-ins here)."""
    return torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward


class TorchFlashExecutor:
    """PyTorch's CUDA flash-attention var-len kernels (`aten._flash_attention_forward` / `_backward`)."""

    name = "flash"

    @staticmethod
    def unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
        return torch_flash_unsupported(q, v)

    @staticmethod
    def _extra(names: list[str]) -> dict:
        # Split-KV would make a row's result depend on the longest segment of the call.
        return {"num_splits": 1} if "num_splits" in names else {}

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale):
        D = v.shape[-1]
        out, lse = _flash_ops()[0](
            pad_head(q),
            pad_head(k),
            pad_head(v),
            cu_q,
            cu_k,
            max_q,
            max_k,
            0.0,
            False,
            False,
            scale=scale,
            **self._extra(_schema_names("_flash_attention_forward")),
        )[:2]
        return out[..., :D], lse

    def backward(self, grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
        D = q.shape[-1]
        # No dropout: the generator state is not read (varlen_attn passes the same placeholders).
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = _flash_ops()[1](
            pad_head(grad_out),
            pad_head(q),
            pad_head(k),
            pad_head(v),
            pad_head(out),
            lse.contiguous(),
            cu_q,
            cu_k,
            max_q,
            max_k,
            0.0,
            False,
            rng_state,
            unused,
            scale=scale,
        )
        return dq[..., :D], dk[..., :D], dv[..., :D]


# ---------------------------------------------------------------------------------------------- choice
_WARNED: set[str] = set()


def choose_executor(backend: str, candidates, q: torch.Tensor, v: torch.Tensor):
    r"""
    The first of `candidates` (classes with `unsupported(q, v) -> str | None`) that can run these inputs, else the
    portable [`TorchExecutor`]; falling back warns once per reason, naming it.
    """
    reasons = []
    for cls in candidates:
        reason = cls.unsupported(q, v)
        if reason is None:
            return cls()
        reasons.append(reason)
    message = f"MoC backend {backend!r} runs the portable torch executor instead: " + "; ".join(reasons)
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)
    return TorchExecutor()
