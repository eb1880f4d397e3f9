"""The var-len scheme (packing, merge, backward) against the reference, on the CPU through its executors."""

from __future__ import annotations

import os
import warnings

import flash_fakes
import pytest
import torch
from _kernels import pretend_runs, reference_attention
from conftest import random_layout
from varlen_contract import RecordingExecutor, varlen_contract_violations

import diffusers_moc.core.kernels.executors as executors
import diffusers_moc.core.kernels.flash_attn_executors as fa_executors
import diffusers_moc.core.kernels.varlen_plan as varlen_plan
from diffusers_moc import ChunkLayout, MoCConfig, MoCRouting, moc_attention, route
from diffusers_moc.core.kernels.executors import TorchExecutor, TorchFlashExecutor
from diffusers_moc.core.kernels.flash import FLASH
from diffusers_moc.core.kernels.flash_attn_executors import FlashAttnExecutor
from diffusers_moc.core.kernels.varlen import varlen_backward, varlen_forward
from diffusers_moc.core.kernels.varlen_plan import build_varlen_plan, call_costs
from diffusers_moc.core.routing import expand_routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(layout, B=2, H=3, D=8, DV=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, layout.num_tokens, H, D)] * 2 + [(B, layout.num_tokens, H, DV or D)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _fwd_bwd(executor, q, k, v, routing, scale=0.4, grad=None, plan=None):
    out, lse = varlen_forward(q, k, v, routing, scale, executor, plan=plan)
    grad = torch.randn_like(out) if grad is None else grad
    grads = varlen_backward(grad, q, k, v, out, lse, routing, scale, executor, plan=plan)
    return out, lse, grad, grads


def _reference(q, k, v, routing, grad, scale=0.4):
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    out = reference_attention(*leaves, routing, scale=scale)
    return (out, *torch.autograd.grad(out, leaves, grad.double()))


def _random_config(rng):
    return MoCConfig(
        top_k=rng.randint(0, 6),
        local_window=rng.randint(0, 2),
        anchor_own_shot=rng.random() < 0.3,
        text_anchors=rng.choice(["all", "shot"]),
        causal=rng.random() < 0.5,
        route_by=rng.choice(["token", "token", "block"]),
        block_size=2,
    )


@pytest.fixture(params=["fused-cpu", "matmul"])
def executor(request):
    return TorchExecutor(fused=request.param == "fused-cpu")


@pytest.mark.parametrize("budget", [None, 2000], ids=["default-budget", "tiny-budget"])
def test_forward_and_gradients_equal_reference_on_random_layouts(rng, executor, budget, monkeypatch):
    # A tiny budget splits segments into query ranges and spreads chunks over calls (staged dk, dv).
    monkeypatch.setattr(varlen_plan, "MEMORY_BUDGET_BYTES", budget)
    monkeypatch.setattr(varlen_plan, "_MIN_PIECE_ROWS", 1)
    for trial in range(6):
        layout = random_layout(rng)
        q, k, v = _qkv(layout, seed=trial)
        routing = route(q, k, layout, _random_config(rng))
        out, lse, grad, grads = _fwd_bwd(executor, q, k, v, routing)
        want = _reference(q, k, v, routing, grad)
        torch.testing.assert_close(out.double(), want[0], atol=1e-5, rtol=1e-5)
        for got, ref in zip(grads, want[1:]):
            torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
        scores = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) * 0.4
        want_lse = torch.logsumexp(scores.masked_fill(~expand_routing(routing), -torch.inf), -1)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_tiny_budget_splits_calls_and_segments(monkeypatch):
    monkeypatch.setattr(varlen_plan, "_MIN_PIECE_ROWS", 8)
    layout = ChunkLayout.for_video(4, 40)
    q, k, v = _qkv(layout, B=1, H=2)
    routing = route(q, k, layout, MoCConfig(top_k=2, local_window=0))
    row_cost, key_cost = call_costs(q, v)
    budget = 30 * row_cost + 40 * key_cost
    plan = build_varlen_plan(routing, q, v, budget=budget)
    backward_calls = plan.segment_calls(with_anchors=True)
    assert len(backward_calls) > 8 and len(plan.anchor_calls()) > 1
    pieces = [p for call in backward_calls for p in call]
    assert any(p.lo > 0 for p in pieces)  # a segment split into query ranges
    for call in backward_calls:  # every call within the budget (a call of one piece may hold more)
        cost = sum((p.hi - p.lo) * row_cost + 40 * key_cost for p in call)
        assert cost <= budget or len(call) == 1
        assert all(p.hi - p.lo >= 8 or p.hi == plan.routed_count[p.chunk][p.bh] + 40 for p in call)
    # Every attended pair is packed exactly once: in the backward's segments, and in the forward's anchor calls
    # (own chunk: 40 x 40 per chunk and head) plus routed segments.
    pairs = routing.attended_tokens().sum().item()
    assert sum(p.hi - p.lo for p in pieces) * 40 == plan.pairs() == pairs
    routed = sum(p.hi - p.lo for call in plan.segment_calls(with_anchors=False) for p in call)
    assert (routed + 4 * 40 * 2) * 40 == pairs
    rec = RecordingExecutor(TorchExecutor(), dtypes=None)
    out, _, grad, grads = _fwd_bwd(rec, q, k, v, routing, plan=plan)
    want = _reference(q, k, v, routing, grad)
    for got, ref in zip((out, *grads), want):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    n_calls = len(plan.anchor_calls()) + len(plan.segment_calls(False)) + len(backward_calls)
    assert rec.violations == [] and len(rec.calls) == n_calls


def test_plan_is_linear_in_tokens():
    layout = ChunkLayout.for_video(8, 16, shot_frames=[3, 5])
    q, k, v = _qkv(layout, B=1, H=2)
    routing = route(q, k, layout, MoCConfig(top_k=3))
    plan = build_varlen_plan(routing, q, v)
    # The only device tensor of the plan: the routed pairs (at most the routed slots), plus one scratch entry.
    assert plan.routed_rows.numel() <= routing.selected.numel() + 1


def _custom_routing(layout, B, H, selected, anchors):
    return MoCRouting(layout, selected, anchors)


def test_one_token_segments_and_chunks_no_query_attends(executor):
    layout = ChunkLayout.for_video(4, 5)
    B, H, L, C = 1, 2, layout.num_tokens, layout.num_chunks
    anchors = torch.eye(C, dtype=torch.bool)
    anchors[2, 2] = False  # chunk 2's keys: nobody's anchor ...
    selected = torch.full((B, H, L, 1), -1, dtype=torch.long)
    selected[:, :, 10:15, 0] = 0  # ... its queries route to chunk 0 instead
    selected[0, 0, 17, 0] = 1  # one token of one head routes to chunk 1: a one-token segment
    selected[0, 1, 3, 0] = 3  # a token routes to a later chunk
    routing = _custom_routing(layout, B, H, selected, anchors)
    q, k, v = _qkv(layout, B=B, H=H)
    plan = build_varlen_plan(routing, q, v)
    pieces = [p for call in plan.segment_calls(with_anchors=True) for p in call]
    assert all(p.chunk != 2 for p in pieces)  # no segment for the chunk no query attends
    assert any(p.chunk == 1 and p.bh == 0 and p.hi - p.lo == 6 for p in pieces)  # 5 anchors + the one routed token
    assert any(p.chunk == 3 and p.bh == 1 and p.hi - p.lo == 6 for p in pieces)
    out, _, grad, grads = _fwd_bwd(executor, q, k, v, routing)
    want = _reference(q, k, v, routing, grad)
    for got, ref in zip((out, *grads), want):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(grads[1][:, 10:15], torch.zeros_like(grads[1][:, 10:15]))  # unattended keys: no gradient


def test_single_token_routed_segment_alone():
    # top_k=1 with one query per chunk: every routed segment has one token.
    layout = ChunkLayout.for_video(6, 1)
    q, k, v = _qkv(layout, B=1, H=1)
    routing = route(q, k, layout, MoCConfig(top_k=1, local_window=0))
    rec = RecordingExecutor(TorchExecutor(), dtypes=None)
    out, _, grad, grads = _fwd_bwd(rec, q, k, v, routing)
    want = _reference(q, k, v, routing, grad)
    for got, ref in zip((out, *grads), want):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_duplicate_and_anchor_slots_count_once(executor):
    layout = ChunkLayout.for_video(3, 4)
    q, k, v = _qkv(layout, B=1, H=1)
    routing = route(q, k, layout, MoCConfig(top_k=1, local_window=0))
    sel = torch.stack([routing.selected[..., 0]] * 2 + [layout.token_chunks()[None, None]], -1)  # dup + own chunk
    dup = MoCRouting(layout, sel, routing.anchors)
    a = varlen_forward(q, k, v, routing, 0.4, executor)[0]
    b = varlen_forward(q, k, v, dup, 0.4, executor)[0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_top_k_beyond_candidates_is_dense(executor):
    layout = ChunkLayout.for_video(5, 3)
    q, k, v = _qkv(layout, B=1, H=2)
    routing = route(q, k, layout, MoCConfig(top_k=50, causal=False, local_window=0))
    out = varlen_forward(q, k, v, routing, 0.4, executor)[0]
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=0.4)
    torch.testing.assert_close(out, dense.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_value_head_size_may_differ():
    layout = ChunkLayout.for_video(4, 6)
    q, k, v = _qkv(layout, D=8, DV=4)
    routing = route(q, k, layout, MoCConfig(top_k=1))
    out, _, grad, grads = _fwd_bwd(TorchExecutor(), q, k, v, routing)
    want = _reference(q, k, v, routing, grad)
    for got, ref in zip((out, *grads), want):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_merges_in_float32(dtype, executor):
    # Many small chunks: every query merges ~14 partial results. A merge in the input dtype would round at every
    # step (about 10x the error of rounding the exact result once); in float32 only the partials and the result
    # are rounded (below 2x).
    layout = ChunkLayout.for_video(24, 8)
    q, k, v = _qkv(layout, B=1, H=2, D=16, dtype=dtype)
    routing = route(q, k, layout, MoCConfig(top_k=12, causal=False, local_window=0))
    rec = RecordingExecutor(executor)
    out, lse, grad, grads = _fwd_bwd(rec, q, k, v, routing, scale=0.25)
    want = _reference(q, k, v, routing, grad, scale=0.25)
    assert out.dtype == dtype and lse.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    err = (out.double() - want[0]).abs().mean()
    assert err < 3 * (want[0].to(dtype).double() - want[0]).abs().mean()
    for got, ref in zip(grads, want[1:]):
        torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=3e-2)
    assert rec.violations == []  # fp16 / bf16 calls satisfy flash-attn's contract, dtype included


def test_every_executor_call_satisfies_flash_attn_contract(rng, monkeypatch):
    monkeypatch.setattr(varlen_plan, "MEMORY_BUDGET_BYTES", 3000)
    monkeypatch.setattr(varlen_plan, "_MIN_PIECE_ROWS", 1)
    for trial, dtype in enumerate([torch.bfloat16, torch.float16] * 3):
        layout = random_layout(rng)
        q, k, v = _qkv(layout, D=16, dtype=dtype, seed=trial)
        routing = route(q, k, layout, _random_config(rng))
        rec = RecordingExecutor(TorchExecutor())
        _fwd_bwd(rec, q, k, v, routing)
        assert rec.calls and rec.violations == []
        assert {c["kind"] for c in rec.calls} == {"forward", "backward"}


def test_contract_checker_names_violations():
    q = torch.zeros(6, 1, 8, dtype=torch.bfloat16)
    k = torch.zeros(4, 1, 8, dtype=torch.bfloat16)
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 3, 4], dtype=torch.int32)
    assert varlen_contract_violations(q, k, k, cu_q, cu_k, 4, 3) == []
    bad = varlen_contract_violations(q.float(), k, k, cu_q.long(), cu_k, 3, 3)
    assert any("share one dtype" in b for b in bad) and any("int32" in b for b in bad)
    assert any("max_seqlen_q=3" in b for b in varlen_contract_violations(q, k, k, cu_q, cu_k, 3, 3))
    assert any("ends at" in b for b in varlen_contract_violations(q, k, k, cu_q, cu_k.flip(0).contiguous(), 4, 3))
    lse = torch.zeros(6, 1)  # (total_q, heads): the wrong layout
    assert any("softmax_lse" in b for b in varlen_contract_violations(q, k, k, cu_q, cu_k, 4, 3, lse=lse))


# ------------------------------------------------------------------ the flash executors, on stand-in kernels
@pytest.mark.parametrize("D", [16, 12])  # 12: padded to 16 for the kernel
def test_torch_flash_executor_end_to_end_on_stand_in_kernels(rng, monkeypatch, D):
    monkeypatch.setattr(
        executors, "_flash_ops", lambda: (flash_fakes.aten_flash_forward, flash_fakes.aten_flash_backward)
    )
    monkeypatch.setattr(varlen_plan, "MEMORY_BUDGET_BYTES", 4000)
    monkeypatch.setattr(varlen_plan, "_MIN_PIECE_ROWS", 1)
    for trial in range(3):
        layout = random_layout(rng)
        q, k, v = _qkv(layout, D=D, dtype=torch.bfloat16, seed=trial)
        routing = route(q, k, layout, _random_config(rng))
        out, _, grad, grads = _fwd_bwd(TorchFlashExecutor(), q, k, v, routing)
        want = _reference(q, k, v, routing, grad)
        for got, ref in zip((out, *grads), want):
            torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("version", ["2.8", "2.6", "4"])
def test_flash_attn_executor_end_to_end_on_stand_in_kernels(rng, monkeypatch, version):
    fakes = {
        "2.8": ("fa2", flash_fakes.fa28_varlen_forward, flash_fakes.fa28_varlen_backward, "2.8.3"),
        "2.6": ("fa2", flash_fakes.fa26_varlen_forward, flash_fakes.fa26_varlen_backward, "2.6.3"),
        "4": ("fa4", flash_fakes.fa4_fwd, flash_fakes.fa4_bwd, "4 (cute)"),
    }
    monkeypatch.setattr(fa_executors, "_interface", lambda: fakes[version])
    layout = random_layout(rng)
    q, k, v = _qkv(layout, D=16, dtype=torch.float16)
    routing = route(q, k, layout, MoCConfig(top_k=2))
    out, _, grad, grads = _fwd_bwd(FlashAttnExecutor(), q, k, v, routing)
    want = _reference(q, k, v, routing, grad)
    for got, ref in zip((out, *grads), want):
        torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=3e-2)


def test_flash_backend_falls_back_with_a_named_reason_on_cpu():
    layout = ChunkLayout.for_video(3, 4)
    q, k, v = _qkv(layout, B=1, H=1)
    routing = route(q, k, layout, MoCConfig(top_k=1))
    executors._WARNED.clear()
    with pytest.warns(UserWarning, match=r"'flash' runs the portable torch executor instead: .*CUDA"):
        out, _ = FLASH.forward(q, k, v, routing, 0.4)
    torch.testing.assert_close(out, reference_attention(q, k, v, routing, scale=0.4), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        FLASH.forward(q, k, v, routing, 0.4)


def test_flash_input_reasons():
    q = torch.zeros(1, 4, 1, 8)
    assert "float16 or bfloat16" in executors.flash_inputs_unsupported(q, q)
    h = q.half()
    assert "one head size" in executors.flash_inputs_unsupported(h, torch.zeros(1, 4, 1, 16).half())
    assert "up to 256" in executors.flash_inputs_unsupported(
        torch.zeros(1, 4, 1, 512).half(), torch.zeros(1, 4, 1, 512)
    )
    assert executors.flash_inputs_unsupported(h, h) is None
    assert "CUDA" in executors.torch_flash_unavailable("cpu")


def test_moc_attention_runs_every_backend_name(rng):
    layout = random_layout(rng)
    q, k, v = _qkv(layout)
    cfg = MoCConfig(top_k=2)
    ref = moc_attention(q, k, v, layout, cfg.replace(backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flash on the CPU: the named fallback
        for backend in ("torch", "flash"):
            out = moc_attention(q, k, v, layout, cfg.replace(backend=backend))
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_auto_picks_pytorch_flash_kernels_on_long_cuda_sequences_without_flash_attn(monkeypatch):
    from diffusers_moc.core import backends

    pretend_runs(monkeypatch, flash=True, flash_attn=False, triton=True, flex=False, flex_triton=False)
    assert backends.available_backends("cuda") == ["flash", "triton", "torch", "reference"]
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16, 179_400) == "triton"
    pretend_runs(monkeypatch, triton=False)
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16, 179_400) == "flash"
    assert backends.resolve_backend("auto", "cpu") == "torch"
    pretend_runs(monkeypatch, flash=False)
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16, 179_400) == "torch"


def test_missing_flash_attn_is_a_named_error(monkeypatch):
    from diffusers_moc.core import backends

    monkeypatch.setattr(fa_executors, "_interface", lambda: (None, "flash-attn is not installed (x)", None, None))
    with pytest.raises(RuntimeError, match=r"backend='flash_attn' is not available: flash-attn is not installed"):
        backends.load_kernel("flash_attn")
    layout = ChunkLayout.for_video(2, 3)
    q = torch.randn(1, 6, 1, 8)
    with pytest.raises(RuntimeError, match="flash_attn"):
        moc_attention(q, q, q, layout, MoCConfig(backend="flash_attn"))


@pytest.mark.parametrize(
    "names, reason",
    [
        (None, "has no aten._flash_attention_forward"),
        (["query", "key"], "unknown signature"),
    ],
)
def test_torch_without_flash_ops_is_detected(monkeypatch, names, reason):
    executors._torch_flash_missing.cache_clear()
    monkeypatch.setattr(executors, "_schema_names", lambda op: names)
    try:
        assert reason in executors.torch_flash_unavailable("cuda")
    finally:
        monkeypatch.undo()
        executors._torch_flash_missing.cache_clear()


def test_fused_triton_merge_equals_the_torch_merge():
    # The CUDA merge kernel, run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU).
    merge_triton = pytest.importorskip("diffusers_moc.core.kernels.merge_triton")
    import diffusers_moc.core.kernels.varlen as varlen

    if not torch.cuda.is_available() and type(merge_triton._merge_kernel).__name__ != "InterpretedFunction":
        pytest.skip("no GPU and Triton was imported without TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    N, Dv = 40, 24
    acc0 = torch.randn(N + 1, Dv, generator=g)
    lse0 = torch.randn(N + 1, generator=g)
    lse0[::3] = -torch.inf  # rows without a partial result yet: the first merge copies exactly
    rows = torch.randperm(N, generator=g)[:29]
    o = torch.randn(29, Dv, generator=g).to(torch.bfloat16)
    lse = torch.randn(29, generator=g)
    lse[4] = torch.nan
    want_acc, want_lse = acc0.clone(), lse0.clone()
    varlen._merge(want_acc, want_lse, rows, o.clone(), lse, varlen._Buffers())
    got_acc, got_lse = acc0.clone(), lse0.clone()
    merge_triton.merge(got_acc, got_lse, rows, o, lse)
    torch.testing.assert_close(got_acc, want_acc, atol=1e-6, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-6, rtol=1e-6, equal_nan=True)
    first = rows[lse0[rows].isneginf() & ~lse.isnan()]
    assert torch.equal(got_acc[first], o.float()[(lse0[rows].isneginf() & ~lse.isnan())])
    assert got_acc[rows[4]].isnan().all() and got_lse[rows[4]].isnan()


_MERGE_COMPILE = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from diffusers_moc.core.kernels import merge_triton as mt

sig = {"ACC": "*fp32", "LSE_ACC": "*fp32", "ROWS": "*i64", "PART": "*bf16", "LSE": "*fp32", "n": "i32", "DV": "i32",
       "s_acc": "i32", "s_o": "i32", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
src = ASTSource(fn=mt._merge_kernel, signature=sig, constexprs={"BLOCK_R": 32, "BLOCK_D": 128})
triton.compile(src, target=GPUTarget("cuda", 90, 32))
print("ok")
"""


def test_fused_merge_compiles_for_h100():
    # Without a GPU, compile the merge kernel for sm_90 ahead of time (what the interpreter cannot check).
    import shutil
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.isdir(ptxas) or shutil.which("ptxas", path=ptxas) is None:
        pytest.skip("this Triton build ships no NVIDIA ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _MERGE_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["ok"]
