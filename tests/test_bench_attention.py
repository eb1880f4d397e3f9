"""The attention benchmark script: its quick mode runs on CPU, and its helpers build what they claim."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from diffusers_moc import MoCConfig, route

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
    assert "skipped: flex: compiled FlexAttention kernels with a backward need CUDA" in printed
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
