"""The `triton` backend against the reference, forward and backward.

Without CUDA the kernels run in the Triton interpreter: `tests/conftest.py` sets `TRITON_INTERPRET=1` before Triton is
first imported (Triton reads it at import and when kernels are decorated and run).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="backend='triton' needs the optional `triton` package")

from _kernels import reference_attention, triton_attention  # noqa: E402
from conftest import random_layout  # noqa: E402

from diffusers_moc import ChunkLayout, MoCConfig, moc_attention  # noqa: E402
from diffusers_moc.core.routing import MoCRouting, expand_routing, route  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODULE = "diffusers_moc.core.kernels.triton_moc"


try:
    tm = importlib.import_module(MODULE)
except ImportError as e:  # e.g. a Triton without host tensor descriptors (needs triton>=3.4)
    pytest.skip(f"the Triton backend does not import: {e}", allow_module_level=True)
if DEVICE.type == "cpu" and not tm._INTERPRETED:
    pytest.skip(
        "no GPU and Triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it before collection; "
        "set it in the environment when running this file on its own)",
        allow_module_level=True,
    )


def _layout(frame_tokens: int = 12) -> ChunkLayout:
    # Global caption, a shot caption, then 3 shots (a one-frame shot first): uneven chunks that fill query tiles
    # (16 slots in the interpreter) and key blocks partly. The interpreter is slow: keep it small.
    return ChunkLayout.concat(
        ChunkLayout.for_captions([5, 7], [-1, 0]), ChunkLayout.for_video(5, frame_tokens, shot_frames=[1, 2, 2])
    )


def _inputs(layout, B=1, H=2, D=16, dtype=torch.float32, seed=0, DV=None, smooth=False):
    g = torch.Generator().manual_seed(seed)
    L = layout.num_tokens
    if smooth:  # video-like: neighbouring tokens nearly equal, so tiles agree on their chunks
        base = torch.randn(B, L // 8 + 1, H, D, generator=g).repeat_interleave(8, dim=1)[:, :L]
        q = base + 0.01 * torch.randn(B, L, H, D, generator=g)
    else:
        q = torch.randn(B, L, H, D, generator=g)
    k = torch.randn(B, L, H, D, generator=g)
    v = torch.randn(B, L, H, DV or D, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


def _grads(fn, q, k, v, routing, grad_out):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, routing)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


CASES = {
    "causal_two_tiles_per_frame": (MoCConfig(top_k=2), 20, 1),
    "noncausal_topk_gt_candidates_batch2": (MoCConfig(top_k=50, causal=False, local_window=0), 12, 2),
    "shot_anchors_text_shot": (MoCConfig(top_k=1, local_window=0, anchor_own_shot=True, text_anchors="shot"), 12, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_fp32_match_reference(name):
    config, frame_tokens, batch = CASES[name]
    layout = _layout(frame_tokens)
    q, k, v = _inputs(layout, B=batch)
    routing = route(q, k, layout, config)
    grad_out = torch.randn_like(q)
    ref = _grads(reference_attention, q, k, v, routing, grad_out)
    out = _grads(triton_attention, q, k, v, routing, grad_out)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(out[1:], ref[1:]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_random_layouts_match_reference(rng):
    # Random layouts from conftest: chunks of 1-6 tokens (several chunks per query tile), captions first or last,
    # one-frame shots; random routing settings, top_k sometimes above the candidates.
    for trial in range(6):
        layout = random_layout(rng)
        config = MoCConfig(
            top_k=rng.randint(0, 6),
            local_window=rng.randint(0, 2),
            anchor_own_shot=rng.random() < 0.3,
            text_anchors=rng.choice(["all", "shot"]),
            causal=rng.random() < 0.5,
        )
        q, k, v = _inputs(layout, seed=trial)
        routing = route(q, k, layout, config)
        grad_out = torch.randn_like(q)
        ref = _grads(reference_attention, q, k, v, routing, grad_out)
        out = _grads(triton_attention, q, k, v, routing, grad_out)
        where = f"{layout} {config}"
        torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5, msg=lambda m, where=where: f"{where}: {m}")
        for got, want in zip(out[1:], ref[1:]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, where=where: f"{where}: {m}")


def test_dense_when_everything_routed():
    # top_k above the candidates and causal=False: MoC is dense attention (spec section 2.6).
    layout = _layout()
    q, k, v = _inputs(layout)
    out = triton_attention(q, k, v, route(q, k, layout, MoCConfig(top_k=100, causal=False, local_window=0)))
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reorder", [True, False])
def test_tokens_of_a_tile_disagree(reorder):
    # iid random queries over many small chunks: tokens of one tile pick different chunks, so the union of a tile
    # is larger than each token's set and the per-token mask is what makes the result exact.
    layout = ChunkLayout.for_video(8, 16, shot_frames=[3, 5])
    q, k, v = _inputs(layout, seed=3)
    routing = route(q, k, layout, MoCConfig(top_k=2, local_window=0))
    plan = tm.build_plan(routing, block_m=16, reorder=reorder)
    assert plan.overfetch() > 1.2
    grad_out = torch.randn_like(q)
    ref = _grads(reference_attention, q, k, v, routing, grad_out)
    out = _grads(lambda *a: triton_attention(*a, plan=plan), q, k, v, routing, grad_out)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_reorder_groups_tokens_with_equal_sets():
    # Alternate tokens of every chunk route to two different chunks: unsorted tiles hold both, sorted tiles one.
    layout = ChunkLayout.for_video(4, 32)
    B, H, L = 1, 1, layout.num_tokens
    selected = torch.full((B, H, L, 1), -1, dtype=torch.long)
    tok_chunk = layout.token_chunks()
    late = tok_chunk >= 2
    selected[0, 0, late, 0] = torch.arange(L)[late] % 2  # chunk 0 or 1
    anchors = torch.eye(4, dtype=torch.bool)
    routing = MoCRouting(layout=layout, selected=selected.to(DEVICE), anchors=anchors.to(DEVICE))
    # Unsorted: each late tile (16 queries) computes its own chunk + chunks 0 and 1 (96 keys) but attends 64.
    computed, attended = 4 * 16 * 32 + 4 * 16 * 96, 4 * 16 * 32 + 4 * 16 * 64
    assert tm.build_plan(routing, block_m=16, reorder=False).overfetch() == pytest.approx(computed / attended)
    assert tm.build_plan(routing, block_m=16, reorder=True).overfetch() == 1.0
    assert tm.build_plan(routing, block_m=16).overfetch() == 1.0  # "auto" picks the grouped order here
    q, k, v = _inputs(layout, H=1)
    torch.testing.assert_close(
        triton_attention(q, k, v, routing), reference_attention(q, k, v, routing), atol=1e-5, rtol=1e-5
    )


def test_plan_is_linear_in_tokens():
    layout = _layout()
    q, k, v = _inputs(layout)
    routing = route(q, k, layout, MoCConfig(top_k=2))
    plan = tm.build_plan(routing, block_m=16)
    L, C = layout.num_tokens, layout.num_chunks
    for name, value in vars(plan).items():
        if isinstance(value, torch.Tensor):
            assert value.numel() <= 2 * L * max(C, 8), name
    # The union lists are sorted per tile and cover exactly the chunks some token of the tile attends.
    attend = routing.chunk_mask().reshape(2, L, C)
    perm = plan.perm.long()
    for bh in range(2):
        for t in range(plan.num_tiles):
            toks = perm[bh, plan.tile_start[t] : plan.tile_end[t]]
            want = attend[bh, toks].any(0).nonzero().flatten().tolist()
            got = plan.chunks[plan.cu[bh * plan.num_tiles + t] : plan.cu[bh * plan.num_tiles + t + 1]].tolist()
            assert got == want


def test_fp16_forward_backward_loose():
    layout = _layout()
    q, k, v = _inputs(layout, dtype=torch.float16, smooth=True)
    routing = route(q, k, layout, MoCConfig(top_k=2))
    grad_out = torch.randn_like(q)
    ref = _grads(reference_attention, q.float(), k.float(), v.float(), routing, grad_out.float())
    out = _grads(triton_attention, q, k, v, routing, grad_out)
    assert out[0].dtype == torch.float16
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(
    DEVICE.type != "cuda", reason="bf16 needs CUDA: the Triton 3.9 interpreter's tl.dot is wrong on bf16"
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_forward_backward_on_cuda(head_dim):
    layout = ChunkLayout.concat(ChunkLayout.for_captions([77], [-1]), ChunkLayout.for_video(6, 300, shot_frames=[2, 4]))
    q, k, v = _inputs(layout, H=3, D=head_dim, dtype=torch.bfloat16, smooth=True)
    routing = route(q, k, layout, MoCConfig(top_k=2))
    grad_out = torch.randn_like(q)
    ref = _grads(reference_attention, q.float(), k.float(), v.float(), routing, grad_out.float())
    out = _grads(triton_attention, q, k, v, routing, grad_out)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_training_routing_and_block_routing():
    layout = _layout()
    q, k, v = _inputs(layout, seed=5)
    gen = torch.Generator(DEVICE).manual_seed(0)
    cfg = MoCConfig(top_k=2, drop_off=0.5, drop_in=1.0)
    routing = route(q, k, layout, cfg, training=True, generator=gen)
    assert routing.selected.shape[-1] > 2  # drop-in added slots
    torch.testing.assert_close(
        triton_attention(q, k, v, routing), reference_attention(q, k, v, routing), atol=1e-5, rtol=1e-5
    )
    for block_size in (8, 16):
        block = route(q, k, layout, MoCConfig(top_k=2, route_by="block", block_size=block_size))
        torch.testing.assert_close(
            triton_attention(q, k, v, block), reference_attention(q, k, v, block), atol=1e-5, rtol=1e-5
        )
    # Blocks of the tile size: every tile is pure, so "auto" keeps token order and computes only attended pairs.
    plan = tm.build_plan(block, block_m=16)
    assert plan.overfetch() == 1.0 and torch.equal(plan.perm.long(), torch.arange(layout.num_tokens).expand(2, -1))


def test_log_sum_exp_and_odd_head_sizes():
    # Head size 12 (the tiny Wan model) and a value head size of 20: both padded to 16/32 inside.
    layout = _layout()
    q, k, v = _inputs(layout, D=12, DV=20)
    routing = route(q, k, layout, MoCConfig(top_k=2))
    out, lse = triton_attention(q, k, v, routing, scale=0.3, return_lse=True)
    assert out.shape == v.shape and lse.shape == (1, 2, layout.num_tokens)
    torch.testing.assert_close(out, reference_attention(q, k, v, routing, scale=0.3), atol=1e-5, rtol=1e-5)
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) * 0.3
    scores = scores.masked_fill(~expand_routing(routing), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    # Gradients flow through the padding.
    grad_out = torch.randn_like(v)
    ref = _grads(lambda *a: reference_attention(*a, scale=0.3), q, k, v, routing, grad_out)
    got = _grads(lambda *a: triton_attention(*a, scale=0.3), q, k, v, routing, grad_out)
    for a, b in zip(got[1:], ref[1:]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_moc_attention_dispatches_to_triton():
    layout = _layout()
    q, k, v = _inputs(layout)
    cfg = MoCConfig(top_k=2, backend="triton")
    out, routing = moc_attention(q, k, v, layout, cfg, return_routing=True)
    torch.testing.assert_close(out, reference_attention(q, k, v, routing), atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_problem(monkeypatch):
    layout = _layout()
    q, k, v = _inputs(layout)
    routing = route(q, k, layout, MoCConfig(top_k=2))
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        triton_attention(q.double(), k.double(), v.double(), routing)
    with pytest.raises(ValueError, match="routing is for"):
        triton_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], routing)
    with pytest.raises(ValueError, match="share one dtype"):
        triton_attention(q, k.half(), v, routing)
    with pytest.raises(ValueError, match="power of two"):
        triton_attention(q, k, v, routing, block_m=24)
    with pytest.raises(ValueError, match="reorder must be"):
        tm.build_plan(routing, reorder="sometimes")
    if DEVICE.type == "cpu":
        monkeypatch.setattr(tm, "_INTERPRETED", False)
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            triton_attention(q, k, v, routing)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from diffusers_moc.core.kernels import triton_moc as tm

    cfg = tm._config(128, torch.device("cuda"))
    ints = ("H", "L", "T", "W", "C", "NKB", "DV")
    ptrs = {"BITS": "*i64", "LSE": "*fp32", "DELTA": "*fp32"}

    def compile(fn, consts, descs, launch, mma=True):
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n in descs:
                sig[n] = descs[n]
            elif n in ptrs:
                sig[n] = ptrs[n]
            elif n in ("qk_scale", "sm_scale"):
                sig[n] = "fp32"
            elif n.isupper() and n not in ints:
                sig[n] = "*bf16" if n in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV_") else "*i32"
            else:
                sig[n] = "i32"
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=launch[0], num_stages=launch[1]))
        assert not mma or "wgmma" in k.asm["ptx"], fn
        print(fn.fn.__name__, "ok")

    common = dict(D=128, DV=128, BLOCK_D=128, BLOCK_DV=128, PRECISION="tf32", IDX=tl.int32)
    desc = f"tensordesc<bf16[1, {cfg.block_n}, 1, 128]>"
    compile(tm._fwd_kernel, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common), {"K": desc, "V": desc}, cfg.fwd)
    compile(tm._dq_kernel, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common), {"K": desc, "V": desc}, cfg.dq)
    compile(tm._dkdv_kernel, dict(BLOCK_M=cfg.block_m_kv, BLOCK_N=cfg.block_n_kv, **common), {}, cfg.dkdv)
    compile(tm._delta_kernel, dict(BLOCK=64, BLOCK_DV=128), {}, (4, 1), mma=False)
    """
)


def test_kernels_compile_for_h100():
    # Without a GPU, compile the real (bf16, head size 128) kernels for sm_90 ahead of time: catches what the
    # interpreter cannot (types across loops, layouts, shared memory, wgmma lowering).
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.isdir(ptxas) or shutil.which("ptxas", path=ptxas) is None:
        pytest.skip("this Triton build ships no NVIDIA ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["_fwd_kernel", "ok", "_dq_kernel", "ok", "_dkdv_kernel", "ok", "_delta_kernel", "ok"]
