"""Kernel-level test helpers: a backend's forward and backward halves as one differentiable function, for tests that
study a kernel with settings the registered backend does not expose (a prebuilt Triton plan, a tile size). The
library's own autograd path is `moc_attention`'s custom op."""

from __future__ import annotations

import math

import torch

from diffusers_moc.core.kernels.reference import REFERENCE


class _KernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, routing, scale, kernel):
        out, lse = kernel.forward(q, k, v, routing, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.routing, ctx.scale, ctx.kernel = routing, scale, kernel
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(grad_out, q, k, v, out, lse, ctx.routing, ctx.scale)
        return dq, dk, dv, None, None, None


def kernel_attention(kernel, q, k, v, routing, scale: float):
    """`(out, lse)` of `kernel`, differentiable with respect to `q, k, v` through the kernel's own backward."""
    return _KernelFunction.apply(q, k, v, routing, scale, kernel)


def reference_attention(q, k, v, routing, scale: float | None = None) -> torch.Tensor:
    """MoC attention by definition (the reference backend), differentiable."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return kernel_attention(REFERENCE, q, k, v, routing, scale)[0]


def triton_attention(q, k, v, routing, scale=None, *, return_lse=False, plan=None, reorder="auto", block_m=None):
    """The Triton backend with explicit planning settings (see `triton_moc.triton_kernel`), differentiable."""
    from diffusers_moc.core.kernels import triton_moc as tm

    tm._check(q, k, v, routing)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    plan, _ = tm._plan_for(q, v, routing, plan, block_m, reorder)  # one plan for forward and backward
    out, lse = kernel_attention(tm.triton_kernel(plan=plan), q, k, v, routing, scale)
    return (out, lse) if return_lse else out


def pretend_runs(monkeypatch, **runs: bool) -> None:
    """Make registered backends report that they run (or not) on CUDA, whatever this machine has."""
    import dataclasses

    from diffusers_moc.core import backends

    for name, ok in runs.items():
        spec = backends._REGISTRY[name]
        reason = None if ok else f"{name} pretends not to run"
        fake = dataclasses.replace(spec, unavailable=lambda device, r=reason: r if device.type == "cuda" else "cpu")
        monkeypatch.setitem(backends._REGISTRY, name, fake)
