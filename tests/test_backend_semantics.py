"""What every backend promises beyond closeness to the reference (`docs/semantics.md` section 4): NaN as in SDPA,
a `ValueError` for a non-finite scale, and the causal DAG property bit for bit (earlier shots unchanged when later
shots are routed differently)."""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from _kernels import kernel_attention
from conftest import random_layout

import diffusers_moc.core.kernels.executors as executors
import diffusers_moc.core.kernels.flex as flex
import diffusers_moc.core.kernels.flex_mask as flex_mask
from diffusers_moc import ChunkLayout, MoCConfig, MoCRouting, route
from diffusers_moc.core.backends import load_kernel
from diffusers_moc.core.routing import expand_routing


def _triton_kernel():
    try:
        tm = importlib.import_module("diffusers_moc.core.kernels.triton_moc")
    except ImportError:
        return None
    return tm.TRITON if (tm._INTERPRETED or torch.cuda.is_available()) else None


BACKENDS = ["reference", "torch-fused", "torch-matmul", "torch-tiles", "flash", "flex", "triton"]


@pytest.fixture(params=BACKENDS)
def kernel(request, monkeypatch):
    name = request.param
    if name == "triton":
        kernel = _triton_kernel()
        if kernel is None:
            pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
        return kernel
    if name in ("torch-matmul", "torch-tiles"):
        monkeypatch.setattr(executors, "_fused_cpu_available", lambda: False)
    if name == "torch-tiles":  # the GPU's matmul path: fixed row tiles, the last one padded
        monkeypatch.setattr(executors, "_fixed_tiles", lambda device: True)
        monkeypatch.setattr(executors, "_DEVICE_TILE_ROWS", 48)
    if name == "flex":
        if flex.flex_unavailable() is not None:
            pytest.skip(flex.flex_unavailable())
        monkeypatch.setattr(flex_mask, "BLOCK", 8)  # blocks that straddle the short layouts' chunks
    warnings.simplefilter("ignore")  # flash, flex on the CPU: the named fallbacks
    return load_kernel(name.split("-")[0])


def _qkv(layout, B=1, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, layout.num_tokens, H, D, generator=g) for _ in range(3)]


def _expected_nan(q, k, v, routing):
    """By definition, on the `L x L` mask: which output elements depend on a NaN input."""
    attend = expand_routing(routing).permute(0, 2, 1, 3)  # (B, L, H, L)
    k_nan = k.isnan().any(-1).permute(0, 2, 1)[:, None]  # (B, 1, H, L)
    rows = q.isnan().any(-1) | (attend & k_nan).any(-1)  # (B, L, H)
    v_nan = v.isnan().permute(0, 2, 1, 3)  # (B, H, L, Dv)
    cols = torch.einsum("blhm,bhmd->blhd", attend.double(), v_nan.double()) > 0
    return rows[..., None] | cols


@pytest.mark.parametrize("where", ["q", "k", "v", "qkv"])
def test_nan_reaches_exactly_the_rows_that_depend_on_it(kernel, where):
    layout = ChunkLayout.for_video(6, 8, shot_frames=[3, 3])
    q, k, v = _qkv(layout)
    routing = route(q, k, layout, MoCConfig(top_k=1, local_window=0))
    clean_out = kernel.forward(q, k, v, routing, 0.25)[0]
    g = torch.Generator().manual_seed(1)
    for name, x in zip("qkv", (q, k, v)):
        if name in where:
            # A few NaN elements: one token of an early chunk, one of a late one.
            for tok in (3, 41):
                x[0, tok, int(torch.randint(2, (1,), generator=g)), int(torch.randint(16, (1,), generator=g))] = (
                    math.nan
                )
    out, lse = kernel.forward(q, k, v, routing, 0.25)
    want = _expected_nan(q, k, v, routing)
    assert want.any() and not want.all()
    assert torch.equal(out.isnan(), want)
    assert torch.equal(lse.isnan(), (want.all(-1) if where != "v" else torch.zeros_like(want[..., 0])).transpose(1, 2))
    torch.testing.assert_close(out[~want], clean_out[~want], atol=1e-5, rtol=1e-5)


def test_non_finite_scale_is_an_error(kernel):
    layout = ChunkLayout.for_video(2, 4)
    q, k, v = _qkv(layout)
    routing = route(q, k, layout, MoCConfig(top_k=1))
    for scale in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            kernel.forward(q, k, v, routing, scale)


@pytest.mark.parametrize("seeds", [range(0, 60)])
def test_earlier_shots_are_bit_identical_when_later_chunks_reroute(kernel, seeds):
    """A small case: `for_video(4 frames, 20 tokens)`, H=2, D=8, top_k=2, no local window; re-routing only the
    last chunk's queries must leave every earlier query's output unchanged to the last bit (60 seeds; 10 for the
    slow Triton interpreter)."""
    if kernel.name == "triton":
        seeds = range(10)
    layout = ChunkLayout.for_video(4, 20)
    last = slice(layout.offsets[-2], layout.offsets[-1])
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, layout.num_tokens, 2, 8, generator=g) for _ in range(3))
        routing = route(q, k, layout, MoCConfig(top_k=2, local_window=0))
        other = MoCRouting(layout, routing.selected.clone(), routing.anchors)
        other.selected[:, :, last] = torch.randint(0, 3, other.selected[:, :, last].shape, generator=g)
        a = kernel.forward(q, k, v, routing, 0.35)[0]
        b = kernel.forward(q, k, v, other, 0.35)[0]
        assert torch.equal(a[:, : last.start], b[:, : last.start]), f"seed {seed}"


def test_earlier_shots_unchanged_on_random_layouts(kernel, rng):
    """Multi-shot layouts with captions: changing every query of the last shot's chunks (their routing and their
    values) leaves the earlier shots' outputs bit-identical, with causal routing recomputed from the inputs."""
    trials = 2 if kernel.name == "triton" else 8
    for trial in range(trials):
        layout = random_layout(rng, text=False)
        if layout.num_shots < 2:
            continue
        q, k, v = _qkv(layout, seed=trial)
        cfg = MoCConfig(top_k=2, local_window=1)
        first = layout.offsets[[i for i, s in enumerate(layout.shots) if s == layout.shots[-1]][0]]
        q2 = q.clone()
        q2[:, first:] = torch.randn_like(q2[:, first:])
        a = kernel.forward(q, k, v, route(q, k, layout, cfg), 0.3)[0]
        b = kernel.forward(q2, k, v, route(q2, k, layout, cfg), 0.3)[0]
        assert torch.equal(a[:, :first], b[:, :first])


def test_gradients_flow_through_nan_free_inputs(kernel):
    # The NaN guard costs nothing when there is no NaN: the autograd result equals the kernel's own.
    layout = ChunkLayout.for_video(3, 5)
    q, k, v = (x.requires_grad_(True) for x in _qkv(layout))
    routing = route(q, k, layout, MoCConfig(top_k=1))
    out, _ = kernel_attention(kernel, q, k, v, routing, 0.25)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
