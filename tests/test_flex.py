"""The `flex` backend: its block mask is exactly the attended set, it equals the reference (forward and gradients),
FlexAttention's own compiled kernel agrees with it, it names its kernel choice, and it compiles as one op."""

from __future__ import annotations

import warnings

import pytest
import torch
from _kernels import kernel_attention
from conftest import random_layout
from torch.utils._python_dispatch import TorchDispatchMode

import diffusers_moc.core.kernels.flex as flex
import diffusers_moc.core.kernels.flex_mask as flex_mask
from diffusers_moc import ChunkLayout, MoCConfig, available_backends, moc_attention, route
from diffusers_moc.core.kernels.flex_mask import flex_block_mask
from diffusers_moc.core.routing import expand_routing

pytest.importorskip("torch.nn.attention.flex_attention")
if flex.flex_unavailable() is not None:
    pytest.skip(flex.flex_unavailable(), allow_module_level=True)

CONFIGS = [
    MoCConfig(top_k=2),
    MoCConfig(top_k=1, local_window=0, causal=False),
    MoCConfig(top_k=3, anchor_own_shot=True, text_anchors="shot"),
    MoCConfig(top_k=50),  # more than the candidates: dense within causality
    MoCConfig(top_k=2, route_by="block", block_size=2),
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 tokens, so that the suite's short layouts span many blocks and chunks straddle them."""
    monkeypatch.setattr(flex_mask, "BLOCK", 8)
    warnings.simplefilter("ignore")  # on the CPU: the named fallback to the block mask as torch operations


def _qkv(layout, B=2, H=3, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, layout.num_tokens, H, D, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"k{c.top_k}-{c.route_by}-causal{c.causal}")
def test_equals_reference_with_gradients_on_random_layouts(rng, cfg, small_blocks):
    for trial in range(5):
        layout = random_layout(rng)
        q, k, v = _qkv(layout, seed=trial)
        ref = moc_attention(q, k, v, layout, cfg.replace(backend="reference"))
        out = moc_attention(q, k, v, layout, cfg.replace(backend="flex"))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_float64_and_default_blocks_equal_reference(rng):
    warnings.simplefilter("ignore")
    layout = ChunkLayout.concat(ChunkLayout.for_captions([7, 5], [-1, 0]), ChunkLayout.for_video(6, 50, [2, 4]))
    q, k, v = _qkv(layout, dtype=torch.float64)
    cfg = MoCConfig(top_k=2)
    ref = moc_attention(q, k, v, layout, cfg.replace(backend="reference"))
    out = moc_attention(q, k, v, layout, cfg.replace(backend="flex"))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def _blocks_by_definition(dense: torch.Tensor, block: int, L: int):
    """`(some, full)` per (query block, key block) of an `(B, H, L, L)` attended set, padding counted as attended."""
    n = -(-L // block)
    padded = torch.zeros(*dense.shape[:2], n * block, n * block, dtype=torch.bool)
    padded[..., :L, :L] = dense
    valid = torch.zeros(n * block, n * block, dtype=torch.bool)
    valid[:L, :L] = True
    blocks = padded.view(*dense.shape[:2], n, block, n, block)
    some = blocks.any(-1).any(-2)
    return some, (blocks | ~valid.view(n, block, n, block)).all(-1).all(-2) & some


def _listed(num, idx, n):
    got = torch.zeros(*num.shape, n, dtype=torch.bool)
    for b, h, i in torch.cartesian_prod(*(torch.arange(s) for s in num.shape)).tolist():
        got[b, h, i, idx[b, h, i, : num[b, h, i]].long()] = True
    return got


@pytest.mark.parametrize("block", [4, 16])
def test_block_mask_is_the_attended_set(rng, block):
    """Partial and full blocks against the `L x L` definition: a full block is attended whole by every row; every
    attended pair lies in a listed block; `mask_mod` gives the token-level set. Where a query block lies in one
    chunk, every wholly attended block is full."""
    for trial in range(6):
        layout = random_layout(rng, text=trial % 2 == 0)
        q, k, _ = _qkv(layout, B=2, H=2)
        routing = route(q, k, layout, MoCConfig(top_k=1, local_window=trial % 2))
        mask = flex_block_mask(routing, block=block)
        dense = expand_routing(routing)
        L = layout.num_tokens
        some, full = _blocks_by_definition(dense, block, L)
        n = some.shape[-1]
        got_partial = _listed(mask.kv_num_blocks, mask.kv_indices, n)
        got_full = _listed(mask.full_kv_num_blocks, mask.full_kv_indices, n)
        assert not (got_partial & got_full).any()
        assert torch.equal(got_partial | got_full, some)
        assert not (got_full & ~full).any()
        tok_chunk = layout.token_chunks()
        starts = torch.arange(0, L, block)
        one_chunk = tok_chunk[starts] == tok_chunk[(starts + block).clamp(max=L) - 1]
        assert torch.equal(got_full[:, :, one_chunk], full[:, :, one_chunk])
        b, h, qi, ki = torch.meshgrid(*(torch.arange(s) for s in dense.shape), indexing="ij")
        assert torch.equal(mask.mask_mod(b, h, qi, ki), dense)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_building_the_mask_allocates_nothing_l_by_l():
    layout = ChunkLayout.for_video(32, 160, shot_frames=[12, 20])  # L = 5120, C = 32
    L = layout.num_tokens
    q, k, _ = _qkv(layout, B=1, H=2, D=4)
    routing = route(q.detach(), k.detach(), layout, MoCConfig(top_k=3))
    with _LargestTensor() as watch:
        flex_block_mask(routing)
    # The largest is the (B, H, L, C + 1) selection the mask_mod reads (one spare column for empty slots).
    assert watch.largest == 2 * L * (32 + 1) < L * L // 64


def test_flex_attentions_own_compiled_kernel_agrees():
    """FlexAttention's compiled CPU kernel (inference only) with the backend's block mask gives the reference
    output: the mask is valid for the real kernel, its block lists and `mask_mod` included."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    layout = ChunkLayout.concat(ChunkLayout.for_captions([9, 5], [-1, 0]), ChunkLayout.for_video(6, 44, [2, 4]))
    q, k, v = (x.detach() for x in _qkv(layout, B=1, H=2, D=16))
    routing = route(q, k, layout, MoCConfig(top_k=1, local_window=0, text_anchors="shot"))
    mask = flex_block_mask(routing, block=32, compute_q_blocks=False)
    assert int(mask.kv_num_blocks.sum()) > 0 and int(mask.full_kv_num_blocks.sum()) > 0
    out = compiled(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=mask, scale=0.3).transpose(1, 2)
    ref = moc_attention(q, k, v, layout, MoCConfig(backend="reference"), routing=routing, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Another routing of the same shapes (a new mask_mod closure over new tables) reuses the compiled kernel.
    routing = route(q, k, layout, MoCConfig(top_k=2, local_window=0))
    mask = flex_block_mask(routing, block=32, compute_q_blocks=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=mask, scale=0.3).transpose(1, 2)
    ref = moc_attention(q, k, v, layout, MoCConfig(backend="reference"), routing=routing, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_kernel_choice_is_named(monkeypatch):
    layout = ChunkLayout.for_video(3, 8)
    q, k, v = _qkv(layout, B=1, H=1)
    routing = route(q, k, layout, MoCConfig(top_k=1))
    monkeypatch.setattr(flex, "_WARNED", set())
    assert flex.flex_kernel_choice(q, v) == ("TORCH", "FlexAttention's CPU kernels run inference only and return no "
                                                      "log-sum-exp")  # fmt: skip
    with pytest.warns(UserWarning, match="runs its block mask as torch operations instead of FlashAttention-4"):
        kernel_attention(flex.FLEX, q, k, v, routing, 0.5)
    assert flex.flash_kernels_unsupported(q, v) == "FlashAttention-4 kernels need CUDA tensors, got cpu"
    assert "flex" not in available_backends("cpu")


def test_a_failed_flash_build_falls_back_and_says_why(monkeypatch):
    """Where FlashAttention-4 would run but its lowering refuses the inputs, the call runs Flex's own kernels (here on
    the CPU: the block mask as torch operations), warns with the error, and later calls go there directly."""
    layout = ChunkLayout.for_video(3, 8)
    q, k, v = _qkv(layout, B=1, H=1)
    routing = route(q, k, layout, MoCConfig(top_k=1))
    calls = []

    def fake_flex(q, k, v, mask, scale, kernels, lse):
        calls.append(kernels)
        raise NotImplementedError("mask_mod reads a tensor the CuteDSL lowering cannot index")

    monkeypatch.setattr(flex, "flash_kernels_unsupported", lambda q, v: None)
    monkeypatch.setattr(flex, "_flex", fake_flex)
    monkeypatch.setattr(flex, "_FAILED", {})
    monkeypatch.setattr(flex, "_WARNED", set())
    with pytest.warns(UserWarning, match="FLASH lowering failed .NotImplementedError: mask_mod reads a tensor"):
        out, _ = flex.FLEX.forward(q, k, v, routing, 0.5)
    assert calls == ["FLASH"]
    assert flex.flex_kernel_choice(q, v)[0] == "TORCH"
    flex.FLEX.forward(q, k, v, routing, 0.5)
    assert calls == ["FLASH"]
    assert flex.flex_kernel_choice(q, v, "backward") == ("FLASH", None)  # the backward is its own build
    ref = moc_attention(q, k, v, layout, MoCConfig(top_k=1, backend="reference"), routing=routing, scale=0.5)
    torch.testing.assert_close(out, ref)


def test_unavailable_flex_is_named(monkeypatch):
    monkeypatch.setattr(flex, "flex_unavailable", lambda: "PyTorch 2.4's FlexAttention is older than it needs")
    layout = ChunkLayout.for_video(2, 4)
    q = torch.randn(1, layout.num_tokens, 1, 8)
    with pytest.raises(RuntimeError, match="backend='flex' is not available: PyTorch 2.4's FlexAttention is older"):
        moc_attention(q, q, q, layout, MoCConfig(backend="flex"))


def test_compiles_as_one_op_with_gradients(small_blocks):
    """`torch.compile(fullgraph=True)` with inductor: MoC on the flex backend is one opaque op; forward and
    gradients equal eager."""
    layout = ChunkLayout.for_video(5, 12, shot_frames=[2, 3])
    cfg = MoCConfig(top_k=1, backend="flex")

    def fn(q, k, v):
        return moc_attention(q, k, v, layout, cfg).square().sum()

    q, k, v = _qkv(layout)
    eager = fn(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(q, k, v)
    torch.testing.assert_close(got, eager)
    for a, b in zip(torch.autograd.grad(got, (q, k, v)), eager_grads):
        torch.testing.assert_close(a, b)
