r"""Executors on the `flash-attn` package (backend `"flash_attn"`, the optional extra `pip install -e ".[flash]"`).

- flash-attn 2.x (2.6 or newer; written against the 2.6 to 2.8 sources):
  `flash_attn.flash_attn_interface._flash_attn_varlen_forward` and `_flash_attn_varlen_backward`, the functions
  `flash_attn_varlen_func` runs on (its public autograd wrapper cannot take the merged output and log-sum-exp for the
  backward). Their keyword arguments changed between releases (`window_size` became `window_size_left` / `_right`,
  `softcap` came in, 2.6 returned eight values), so the call passes only the names the installed signature has.
- flash-attn 4 (`flash_attn.cute`, Hopper and Blackwell): `flash_attn.cute.interface._flash_attn_fwd` /
  `_flash_attn_bwd` with `cu_seqlens_q` / `cu_seqlens_k`, used when flash-attn 2 is not importable.

Both return the log-sum-exp as `(heads, total_q)` float32 for var-len inputs; head sizes are padded to a multiple of 8
as `flash_attn_varlen_func` does. The tests run this module on the CPU against stand-in kernels with the real
signatures that enforce flash-attn's argument contract (`tests/flash_fakes.py`); `benchmarks/gpu_check.py` runs it on
a GPU (flash-attn 4 passed it on an H200 in bfloat16; flash-attn 2 has not run). No host reads.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

from .executors import flash_device_unsupported, flash_inputs_unsupported, pad_head

__all__ = ["FlashAttnExecutor", "flash_attn_version", "flash_attn_unavailable", "flash_attn_unsupported"]


@functools.cache
def _interface():
    """`(kind, forward, backward, version)` of the installed flash-attn, or `(None, reason, None, None)`."""
    try:
        fa2 = importlib.import_module("flash_attn.flash_attn_interface")
        version = getattr(importlib.import_module("flash_attn"), "__version__", "2")
        fwd, bwd = getattr(fa2, "_flash_attn_varlen_forward", None), getattr(fa2, "_flash_attn_varlen_backward", None)
        if fwd is None or bwd is None:
            return None, f"flash-attn {version} lacks _flash_attn_varlen_forward/_backward (need 2.6+)", None, None
        return "fa2", fwd, bwd, version
    except ImportError as e:
        fa2_error = e
    try:
        fa4 = importlib.import_module("flash_attn.cute.interface")
        return "fa4", fa4._flash_attn_fwd, fa4._flash_attn_bwd, "4 (cute)"
    except ModuleNotFoundError as e:
        if e.name is not None and not e.name.startswith("flash_attn"):  # installed, one of its own imports missing
            return None, f"flash-attn 4 does not import ({e})", None, None
    except Exception as e:  # noqa: BLE001  (installed but broken, e.g. its CUDA libraries: name why)
        return None, f"flash-attn 4 does not import ({type(e).__name__}: {e})", None, None
    return None, f"flash-attn is not installed ({fa2_error}); pip install -e '.[flash]'", None, None


def flash_attn_version() -> str | None:
    """The installed flash-attn's version, or `None`."""
    return _interface()[3]


def flash_attn_unavailable(device: torch.device) -> str | None:
    """Why the flash-attn executor cannot run on `device` at all, or `None`."""
    kind, reason, _, _ = _interface()
    if kind is None:
        return reason
    device = torch.device(device)
    reason = flash_device_unsupported(device)
    if reason is None and kind == "fa4" and torch.cuda.get_device_capability(device)[0] < 9:
        reason = "flash-attn 4 (cute) needs a Hopper or newer GPU"
    return reason


def flash_attn_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the flash-attn executor cannot run these inputs, or `None`."""
    return flash_attn_unavailable(q.device) or flash_inputs_unsupported(q, v)


def _call(fn, **kwargs):
    """Call `fn` with the keyword arguments its signature has (flash-attn's changed between releases)."""
    # flash-attn 2.7+ wraps these in `torch.library.custom_op`: read the wrapped function's signature.
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    if "window_size" in params and "window_size_left" not in params:
        kwargs["window_size"] = (kwargs.get("window_size_left", -1), kwargs.get("window_size_right", -1))
    return fn(**{k: v for k, v in kwargs.items() if k in params})


# flash-attn 2's features MoC does not use, switched off (FA4's interface has none of them).
_FA2_OFF = dict(dropout_p=0.0, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None)


def _varlen_args(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> dict:
    """The var-len arguments forward and backward share, heads padded to the kernels' granularity."""
    return dict(
        q=pad_head(q),
        k=pad_head(k),
        v=pad_head(v),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        softmax_scale=scale,
        causal=False,
    )


class FlashAttnExecutor:
    """Var-len calls through the installed flash-attn (2.x, else 4)."""

    name = "flash_attn"

    @staticmethod
    def unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
        return flash_attn_unsupported(q, v)

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, scale):
        kind, fwd, _, _ = _interface()
        D = v.shape[-1]
        common = _varlen_args(q, k, v, cu_q, cu_k, max_q, max_k, scale)
        if kind == "fa2":
            res = _call(fwd, **common, **_FA2_OFF, return_softmax=False)
        else:
            res = _call(fwd, **common, return_lse=True)
        lse = res[5] if len(res) == 8 else res[1]  # 2.6 returned (out, q, k, v, out_padded, lse, S, rng_state)
        return res[0][..., :D], lse

    def backward(self, grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
        kind, _, bwd, _ = _interface()
        D = q.shape[-1]
        common = _varlen_args(q, k, v, cu_q, cu_k, max_q, max_k, scale)
        common.update(out=pad_head(out), dout=pad_head(grad_out), softmax_lse=lse, lse=lse)
        if kind == "fa2":
            dq, dk, dv = (torch.empty_like(common[x]) for x in "qkv")
            _call(bwd, **common, dq=dq, dk=dk, dv=dv, **_FA2_OFF, deterministic=False, rng_state=None)
        else:
            dq, dk, dv = _call(bwd, **common)[:3]
        return dq[..., :D], dk[..., :D], dv[..., :D]
