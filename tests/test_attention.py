"""Backends against the reference backend; the reference against dense attention."""

import pytest
import torch
import torch.nn.functional as F
from _kernels import pretend_runs, reference_attention
from conftest import random_layout

import diffusers_moc.core.kernels.executors as executors
from diffusers_moc import ChunkLayout, MoCConfig, MoCRouting, available_backends, moc_attention, resolve_backend, route
from diffusers_moc.core.kernels.reference import MAX_REFERENCE_TOKENS

CONFIGS = [
    MoCConfig(top_k=2),
    MoCConfig(top_k=1, local_window=0, causal=False),
    MoCConfig(top_k=3, anchor_own_shot=True, text_anchors="shot"),
    MoCConfig(top_k=50),  # more than the candidates
    MoCConfig(top_k=2, route_by="block", block_size=2),
]


@pytest.fixture(params=["fused-cpu", "matmul", "gpu-tiles"])
def block_path(request, monkeypatch):
    """Run the torch backend through its segment implementations: the fused CPU kernel, the matmul one in tiles of a
    few scores, and the matmul one in fixed row tiles with all heads per product (what a GPU runs)."""
    if request.param in ("matmul", "gpu-tiles"):
        monkeypatch.setattr(executors, "_fused_cpu_available", lambda: False)
        monkeypatch.setattr(executors, "_TILE_ELEMS", 64)
    if request.param == "gpu-tiles":
        monkeypatch.setattr(executors, "_fixed_tiles", lambda device: True)
        monkeypatch.setattr(executors, "_DEVICE_TILE_ROWS", 48)
    return request.param


def _qkv(layout, B=2, H=3, D=8, dtype=torch.float32, grad=False):
    return [torch.randn(B, layout.num_tokens, H, D, dtype=dtype, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"k{c.top_k}-{c.route_by}-causal{c.causal}")
def test_torch_backend_equals_reference_fp32_with_gradients(rng, cfg, block_path):
    for _ in range(5):
        layout = random_layout(rng)
        q, k, v = _qkv(layout, grad=True)
        ref = moc_attention(q, k, v, layout, cfg.replace(backend="reference"))
        out = moc_attention(q, k, v, layout, cfg.replace(backend="torch"))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(ref)
        grads_ref = torch.autograd.grad(ref, (q, k, v), g)
        grads = torch.autograd.grad(out, (q, k, v), g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_low_precision_close_to_reference(rng, dtype, block_path):
    layout = random_layout(rng, text=True)
    q, k, v = _qkv(layout, dtype=dtype, grad=True)
    cfg = MoCConfig(top_k=2)
    routing = route(q, k, layout, cfg)
    ref = reference_attention(*(t.double() for t in (q, k, v)), routing)
    out = moc_attention(q, k, v, layout, cfg.replace(backend="torch"), routing=routing)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_full_density_equals_dense_attention(rng):
    layout = random_layout(rng)
    q, k, v = _qkv(layout)
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    cfg = MoCConfig(top_k=layout.num_chunks, causal=False)
    for backend in ("reference", "torch"):
        torch.testing.assert_close(moc_attention(q, k, v, layout, cfg.replace(backend=backend)), dense)


def test_sparse_differs_from_dense():
    layout = ChunkLayout.for_video(6, 4)
    q, k, v = _qkv(layout)
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = moc_attention(q, k, v, layout, MoCConfig(top_k=1, backend="torch"))
    assert (out - dense).abs().max() > 1e-3


def test_custom_scale_and_routing_reuse(rng):
    layout = random_layout(rng)
    q, k, v = _qkv(layout)
    cfg = MoCConfig(top_k=1)
    out, routing = moc_attention(q, k, v, layout, cfg, scale=0.3, return_routing=True)
    ref = moc_attention(q, k, v, layout, cfg.replace(backend="reference"), scale=0.3, routing=routing)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_auto_backend_on_cpu_is_torch():
    assert resolve_backend("auto", "cpu") == "torch"
    assert available_backends("cpu")[-1] == "reference"
    with pytest.raises(ValueError, match="unknown MoC backend"):
        resolve_backend("cuda", "cpu")


def test_reference_refuses_long_sequences():
    layout = ChunkLayout.for_video(2, MAX_REFERENCE_TOKENS // 2 + 1)
    q = torch.zeros(1, layout.num_tokens, 1, 2)
    with pytest.raises(ValueError, match="reference backend materialises an L x L mask"):
        moc_attention(q, q, q, layout, MoCConfig(backend="reference"))


def test_shape_and_layout_errors():
    layout = ChunkLayout.for_video(2, 3)
    q = torch.randn(1, 6, 2, 4)
    with pytest.raises(ValueError, match=r"shaped \(B, L, H, D\)"):
        moc_attention(q, q, torch.randn(1, 6, 3, 4), layout)
    with pytest.raises(ValueError, match="covers 6 tokens but the sequence has 5"):
        moc_attention(q[:, :5], q[:, :5], q[:, :5], layout)
    routing = route(q, q, layout, MoCConfig())
    with pytest.raises(ValueError, match="another layout"):
        moc_attention(q, q, q, ChunkLayout.for_video(3, 2), routing=routing)


def test_triton_backend_reports_why_it_is_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton.") or name.endswith("triton_moc"):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    layout = ChunkLayout.for_video(2, 3)
    q = torch.randn(1, 6, 2, 4)
    with pytest.raises(RuntimeError, match="backend='triton' is not available"):
        moc_attention(q, q, q, layout, MoCConfig(backend="triton"))


def test_a_query_output_does_not_depend_on_other_queries_routing(block_path):
    """Bit-exact: re-routing the last chunk's queries leaves every other query's output unchanged (the DAG property
    of causal routing relies on it: later shots must not perturb earlier ones, not even in the last bit)."""
    layout = ChunkLayout.for_video(7, 13, shot_frames=[3, 4])
    q, k, v = _qkv(layout, B=1, H=2, D=12)
    routing = route(q, k, layout, MoCConfig(top_k=2, local_window=0))
    other = MoCRouting(layout, routing.selected.clone(), routing.anchors)
    last = slice(layout.offsets[-2], layout.offsets[-1])
    other.selected[:, :, last] = torch.tensor([0, 3])  # different chunks than the router picked
    assert not torch.equal(other.selected, routing.selected)
    a = moc_attention(q, k, v, layout, MoCConfig(backend="torch"), routing=routing)
    b = moc_attention(q, k, v, layout, MoCConfig(backend="torch"), routing=other)
    assert torch.equal(a[:, : last.start], b[:, : last.start])
    assert not torch.allclose(a[:, last], b[:, last])


def test_auto_takes_the_measured_fastest_backend_per_dtype_and_length(monkeypatch):
    import diffusers_moc.core.kernels.flex as flex

    pretend_runs(monkeypatch, flash=True, flash_attn=True, flex=True, triton=True)
    monkeypatch.setattr(flex, "flash_kernels_unsupported_for", lambda *facts: None)
    bf16, fp16 = torch.bfloat16, torch.float16
    for dtype in (bf16, fp16):
        assert resolve_backend("auto", "cuda", dtype, 32_760) == "triton"
        assert resolve_backend("auto", "cuda", dtype, 179_400) == "triton"
    assert resolve_backend("auto", "cuda", bf16, 32_760, head_dim=320) == "flex"  # past Triton's head-size limit
    assert resolve_backend("auto", "cuda", bf16, 179_400, head_dim=320) == "flash_attn"
    assert resolve_backend("auto", "cuda", torch.float32, 32_760) == "torch"
    assert resolve_backend("auto", "cpu", bf16, 32_760) == "torch"
    pretend_runs(monkeypatch, triton=False)
    assert resolve_backend("auto", "cuda", bf16, 32_760) == "flex"  # on FlashAttention-4
    assert resolve_backend("auto", "cuda", fp16, 179_400) == "flash_attn"
    monkeypatch.setattr(flex, "flash_kernels_unsupported_for", lambda *facts: "flash-attn-4 is not installed")
    assert resolve_backend("auto", "cuda", bf16, 32_760) == "flash_attn"  # not FlexAttention's slower Triton kernels
    pretend_runs(monkeypatch, flash_attn=False)
    assert resolve_backend("auto", "cuda", bf16, 179_400) == "flash"
    pretend_runs(monkeypatch, flash=False)
    assert resolve_backend("auto", "cuda", bf16, 179_400) == "torch"
    assert resolve_backend("triton", "cuda") == "triton"


def test_value_head_size_may_differ(rng):
    layout = random_layout(rng)
    q, k = _qkv(layout, D=8, grad=True)[:2]
    v = torch.randn(2, layout.num_tokens, 3, 4, requires_grad=True)
    cfg = MoCConfig(top_k=1)
    ref = moc_attention(q, k, v, layout, cfg.replace(backend="reference"))
    out = moc_attention(q, k, v, layout, cfg.replace(backend="torch"))
    assert out.shape == (2, layout.num_tokens, 3, 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_gets_named_errors():
    layout = ChunkLayout.for_video(2, 3)
    q = torch.randn(1, 6, 2, 4)
    with pytest.raises(ValueError, match=r"one dtype, got torch.float32, torch.float16 and torch.float32"):
        moc_attention(q, q.half(), q, layout)
    with pytest.raises(TypeError, match="one ChunkLayout for the whole batch, got a list of 2.*padding_mask"):
        moc_attention(torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4), [layout, layout])
    for scale in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            moc_attention(q, q, q, layout, scale=scale)
    for scale in (True, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="scale must be a Python float or None, got (bool|Tensor)"):
            moc_attention(q, q, q, layout, scale=scale)
    with pytest.raises(ValueError, match=r"padding_mask must be a bool tensor shaped \(B, L\) = \(1, 6\)"):
        moc_attention(q, q, q, layout, padding_mask=torch.ones(1, 5, dtype=torch.bool))
    video_hidden = torch.ones(1, 6, dtype=torch.bool)
    video_hidden[0, 1] = False
    with pytest.raises(ValueError, match="padding_mask hides video tokens"):
        moc_attention(q, q, q, layout, padding_mask=video_hidden)


def test_training_regularisers_are_explicit_for_function_callers():
    layout = ChunkLayout.for_video(8, 3)
    q, k, v = _qkv(layout)
    cfg = MoCConfig(top_k=2, drop_off=1.0, drop_in=2.0)
    plain = moc_attention(q, k, v, layout, cfg.replace(drop_off=0.0, drop_in=0.0))
    torch.testing.assert_close(moc_attention(q, k, v, layout, cfg), plain, atol=0, rtol=0)  # training=False
    assert (moc_attention(q, k, v, layout, cfg, training=True) - plain).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ padding_mask
def _padded_case(seed: int = 0):
    # [video (3 frames of 4), caption of 5 tokens]; sample 0 keeps 3 caption tokens, sample 1 all, sample 2 none.
    g = torch.Generator().manual_seed(seed)
    layout = ChunkLayout.concat(ChunkLayout.for_video(3, 4), ChunkLayout.for_captions([5], [-1]))
    q, k, v = (torch.randn(3, 17, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[0, 15:] = False
    mask[2, 12:] = False
    return layout, q, k, v, mask


@pytest.mark.parametrize(
    "cfg", [MoCConfig(top_k=1, local_window=0), MoCConfig(top_k=1, route_by="block", block_size=3)]
)
def test_padding_mask_equals_each_sample_without_its_padding(cfg, block_path):
    layout, q, k, v, mask = _padded_case()
    out = moc_attention(q, k, v, layout, cfg.replace(backend="torch"), padding_mask=mask)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for b in range(3):
        keep = mask[b]
        n_text = int(keep[12:].sum())
        sub = (
            ChunkLayout.for_video(3, 4)
            if n_text == 0
            else ChunkLayout.concat(ChunkLayout.for_video(3, 4), ChunkLayout.for_captions([n_text], [-1]))
        )
        qb, kb, vb = (x[b : b + 1, keep] for x in (q, k, v))
        ref = moc_attention(qb, kb, vb, sub, cfg.replace(backend="reference"))
        torch.testing.assert_close(out[b, keep], ref[0], atol=1e-5, rtol=1e-5)
        assert bool((out[b, ~keep] == 0).all())  # padded tokens' outputs are zero
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad[b : b + 1, keep])
        for got, expected in zip(grads, ref_grads):
            torch.testing.assert_close(got[b], expected[b], atol=1e-5, rtol=1e-5)
        assert all(bool((g[b, ~keep] == 0).all()) for g in grads)


def test_padding_mask_compiles_whole_with_inductor():
    """Routing plus the op with per-sample caption padding, through inductor, forward and backward."""
    torch._dynamo.reset()
    layout, q, k, v, mask = _padded_case(1)
    cfg = MoCConfig(top_k=1, local_window=0)

    def f(q, k, v, mask):
        return moc_attention(q, k, v, layout, cfg, padding_mask=mask)

    eager = f(q, k, v, mask)
    grad = torch.randn_like(eager)
    eager_grads = torch.autograd.grad(eager, (q, k, v), grad)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v, mask)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad), eager_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    mask[1, 13] = False  # other padding, same shapes: no recompile, the op reads it at run time
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(q, k, v, mask), f(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_moc_context_refuses_what_it_would_truncate():
    import numpy as np

    from diffusers_moc import moc_context
    from diffusers_moc.core.context import MoCContext

    assert MoCContext(shot_frames=[np.int64(2), 1]).shot_frames == (2, 1)
    for frames in ([2.9, 1.2], [4.5], "13", [True, 2], 3):
        with pytest.raises(ValueError, match="shot_frames must be positive latent-frame counts"):
            with moc_context(shot_frames=frames):
                pass
    for span in ([0.5, 4], "04", [0, 4, 8]):
        with pytest.raises(ValueError, match=r"caption_spans\[0\] must be a \(start, end\) pair of token indices"):
            MoCContext(shot_frames=[2], caption_spans=[span])


def test_backend_resolution_is_a_constant_of_a_compiled_graph(monkeypatch):
    # `auto`'s usability checks import packages and query the device: under torch.compile(fullgraph=True) they must
    # run while tracing, not be traced (a check dynamo cannot trace would break the graph).
    import diffusers_moc.core.attention as attention

    calls = []

    def resolve(name, device, *facts):
        calls.append(name)
        open(__file__).close()  # file I/O: dynamo cannot trace it
        return "torch"

    monkeypatch.setattr(attention, "resolve_backend", resolve)
    torch._dynamo.reset()
    layout = ChunkLayout.for_video(3, 4)
    q, k, v = (torch.randn(1, 12, 2, 8) for _ in range(3))
    fn = torch.compile(lambda a, b, c: moc_attention(a, b, c, layout, MoCConfig(top_k=1)), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), moc_attention(q, k, v, layout, MoCConfig(top_k=1, backend="torch")))
    assert calls and calls[0] == "auto"
