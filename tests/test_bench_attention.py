"""The attention benchmark script: its quick mode runs on CPU, and its helpers build what they claim."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from diffusers_moc import ChunkLayout, MoCConfig, route
from diffusers_moc.routing import expand_routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_attention", os.path.join(ROOT, "benchmarks", "bench_attention.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_table_and_writes_json(bench, tmp_path, capsys):
    result = bench.main(["--quick", "--check", "--inputs", "random", "--out", str(tmp_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "method" in printed and "speedup_vs_dense" in printed and "sdpa-dense" in printed
    assert "skipped: flex: compiled FlexAttention kernels need CUDA" in printed
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("bench_attention_cpu") and files[0].endswith(".json")
    with open(tmp_path / files[0]) as f:
        saved = json.load(f)
    assert saved["device"]["type"] == "cpu" and saved["settings"]["quick"] is True
    methods = {(r["method"], r["mode"]) for r in saved["rows"]}
    assert {("sdpa-dense", "fwd"), ("sdpa-dense", "fwd+bwd"), ("moc-torch", "fwd")} <= methods
    if any("moc-triton" in s for s in saved["skipped"]):
        assert ("moc-triton", "fwd") not in methods
    else:  # the Triton interpreter ran the real kernels; --check compared them to the torch backend
        assert {("moc-triton", "fwd"), ("moc-triton", "fwd+bwd")} <= methods
        triton_rows = [r for r in saved["rows"] if r["method"] == "moc-triton"]
        for row in triton_rows:
            assert max(row[f"max_err_{n}"] for n in ("out", "dq", "dk", "dv")) < 1e-4
            assert 0 < row["routing_share"] < 1 and row["overfetch"] >= 1
    for row in saved["rows"]:
        assert row["ms"] > 0
        if row["method"].startswith("moc"):
            assert 0 < row["density"] < 1 and row["top_k"] >= 1 and row["speedup_vs_dense"] > 0
    assert result["path"] == str(tmp_path / files[0])


def test_top_k_for_density_reaches_the_target(bench):
    layout = bench.make_layout(21 * 40, 40, 8)
    assert layout.num_chunks == 21 and layout.num_shots == 8
    base = MoCConfig(top_k=1, local_window=1)
    k = bench.top_k_for_density(layout, base, 0.3)
    q, key, _ = bench.make_inputs(layout, 40, 1, 8, "random", torch.float32, torch.device("cpu"))

    def density(top_k):
        return route(q, key, layout, base.replace(top_k=top_k)).density()

    assert density(k) >= 0.3 > density(k - 1)


def test_video_inputs_agree_more_than_random(bench):
    # The "video" inputs must make neighbouring tokens route alike (the case the masked-union scheme is built for).
    layout = bench.make_layout(12 * 64, 64, 2)
    cfg = MoCConfig(top_k=2)
    sel = {}
    for kind in ("video", "random"):
        q, k, _ = bench.make_inputs(layout, 64, 2, 16, kind, torch.float32, torch.device("cpu"))
        sel[kind] = route(q, k, layout, cfg).selected
    agree = {kind: (s[:, :, 1:] == s[:, :, :-1]).all(-1).float().mean().item() for kind, s in sel.items()}
    assert agree["video"] > 0.5 and agree["video"] > 2 * agree["random"]


def test_flex_block_mask_is_the_attended_set(bench):
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = ChunkLayout.concat(ChunkLayout.for_captions([5], [-1]), ChunkLayout.for_video(5, 12, shot_frames=[2, 3]))
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, layout.num_tokens, 2, 8, generator=g) for _ in range(2))
    routing = route(q, k, layout, MoCConfig(top_k=1))
    block = 16
    mask = bench.flex_block_mask(routing, block=block)
    dense = expand_routing(routing)  # (B, H, L, L), tiny
    L = layout.num_tokens
    n = -(-L // block)
    padded = torch.zeros(1, 2, n * block, n * block, dtype=torch.bool)
    padded[..., :L, :L] = dense
    valid = torch.zeros(n * block, n * block, dtype=torch.bool)
    valid[:L, :L] = True
    blocks = padded.view(1, 2, n, block, n, block)
    valid_b = valid.view(n, block, n, block)
    any_b = blocks.any(-1).any(-2)
    full_b = (blocks | ~valid_b).all(-1).all(-2) & any_b
    kv_num, kv_idx = mask.kv_num_blocks, mask.kv_indices
    full_num, full_idx = mask.full_kv_num_blocks, mask.full_kv_indices
    got_partial = torch.zeros_like(any_b)
    got_full = torch.zeros_like(any_b)
    for h in range(2):
        for i in range(n):
            got_partial[0, h, i, kv_idx[0, h, i, : kv_num[0, h, i]].long()] = True
            got_full[0, h, i, full_idx[0, h, i, : full_num[0, h, i]].long()] = True
    assert torch.equal(got_full, full_b)
    assert torch.equal(got_partial, any_b & ~full_b)
    # mask_mod reproduces the token-level set.
    b, h, qi, ki = torch.meshgrid(torch.arange(1), torch.arange(2), torch.arange(L), torch.arange(L), indexing="ij")
    assert torch.equal(mask.mask_mod(b, h, qi, ki), dense)
