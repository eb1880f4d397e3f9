"""The prepared GPU check runs end to end (its `--smoke` mode, tiny shapes on the CPU) and judges targets right."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_covers_every_stage_and_writes_results(gpu_check, tmp_path, capsys):
    result = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for stage in ("stage 1: correctness", "stage 2: attention", "stage 3: transformer", "stage 4: long video"):
        assert stage in printed
    files = sorted(os.listdir(tmp_path))
    assert files == ["gpu_cpu-x86_64-smoke.json", "gpu_cpu-x86_64-smoke.md", "long_video_memory_smoke.json"]
    saved = json.loads((tmp_path / files[0]).read_text())
    assert (tmp_path / files[1]).read_text().startswith("# GPU check")
    by_path = {c["path"]: c for c in saved["correctness"]}
    assert by_path["torch"]["status"] == "pass"
    assert by_path["flex"]["status"] == "pass" and by_path["flex"]["kernels"] == "TORCH"
    if saved["environment"]["flash_unavailable"]:  # no CUDA here: skipped with the reason, not silently
        assert by_path["flash"]["status"] == "skipped" and by_path["flash"]["reason"]
        assert by_path["flex-triton"]["status"] == "skipped" and "need CUDA" in by_path["flex-triton"]["reason"]
    methods = {(r["method"], r["mode"]) for r in saved["attention"]}
    for method in ("moc-torch", "moc-flex", "sdpa-dense"):
        assert {(method, "fwd"), (method, "fwd+bwd")} <= methods
    for row in saved["attention"]:  # every other MoC path is compared with the torch backend in the smoke run
        if row["method"].startswith("moc-") and row["method"] != "moc-torch":
            assert max(row[f"max_err_{n}"] for n in ("out", "dq", "dk", "dv")) < 1e-4
    flex_fwd = next(r for r in saved["attention"] if r["method"] == "moc-flex" and r["mode"] == "fwd")
    assert flex_fwd["kernels"] == "TORCH" and flex_fwd["block_mask_fwd_ms"] > 0
    backends = {r["backend"] for r in saved["transformer"]}
    assert {"dense", "flex", "torch"} <= backends
    assert all(r["s"] > 0 and r["finite"] for r in saved["transformer"])
    assert [r["stage"] for r in saved["long_video"]["rows"]] == ["denoising step (cond + uncond)",
                                                                  "VAE decode of one shot (fp32)"]  # fmt: skip
    assert saved["path_stages"]["torch"][0] == "correctness float32: pass"
    assert saved["path_stages"]["torch"][1] == "attention timed at [128] tokens"
    assert saved["path_stages"]["flash"][0].startswith("correctness float32: skipped (")
    assert result["path"] == str(tmp_path / files[0])


def test_budget_guard_skips_and_says_so(gpu_check, tmp_path):
    result = gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0", "--stages", "correctness"])
    assert all(c["status"] == "skipped" for c in result["correctness"])  # those that cannot run here, with reasons
    assert any("correctness torch" in s and "skipped, needs" in s for s in result["skipped"])


def _row(method, tokens, inputs, mode, speedup, **extra):
    return dict(method=method, tokens=tokens, inputs=inputs, mode=mode, speedup_vs_dense=speedup, **extra)


def test_targets_pass_and_fail_by_the_worst_case(gpu_check):
    attn = [
        _row("moc-flash", 179400, "video", "fwd", 5.0, speedup_vs_flex=1.3),
        _row("moc-flash", 179400, "random", "fwd", 4.2, speedup_vs_flex=1.1),
        _row("moc-triton", 179400, "video", "fwd", 6.0),
        _row("moc-triton", 179400, "random", "fwd", 1.5),
        _row("moc-flash", 179400, "video", "fwd+bwd", 2.9, peak_mib=900),
        _row("moc-flash", 179400, "random", "fwd+bwd", 3.4, peak_mib=900),
        _row("sdpa-dense", 179400, "video", "fwd+bwd", None, peak_mib=1000),
        _row("sdpa-dense", 179400, "random", "fwd+bwd", None, peak_mib=800),
        _row("moc-flash", 32760, "video", "fwd", 1.2, speedup_vs_flex=0.9),
        _row("moc-flash", 32760, "random", "fwd+bwd", 0.9),
    ]
    wan = [{"tokens": 179400, "backend": "flash", "speedup": 2.6}]
    fwd, fwd_bwd, transformer, short, vs_flex, memory = gpu_check.targets(attn, wan)
    assert fwd["status"] == "PASS" and fwd["path"] == "moc-flash" and fwd["measured"] == 4.2
    assert fwd["per_path"] == {"moc-flash": 4.2, "moc-triton": 1.5}
    assert fwd_bwd["status"] == "FAIL" and fwd_bwd["measured"] == 2.9
    assert transformer["status"] == "PASS"
    assert short["status"] == "FAIL" and short["measured"] == 0.9
    assert vs_flex["status"] == "FAIL" and vs_flex["measured"] == 0.9
    assert memory["status"] == "FAIL" and memory["measured"] == pytest.approx(800 / 900)
    assert gpu_check.targets([], [])[0]["status"] == "NOT MEASURED"
    # A run at 180k alone measures nothing at 32k: its 180k rows do not stand in for the 32k target.
    only_long = [r for r in attn if r["tokens"] == 179400]
    assert gpu_check.targets(only_long, wan)[3]["status"] == "NOT MEASURED"


def test_auto_order_takes_the_fastest_paths_that_passed_per_dtype(gpu_check):
    checks = [
        {"path": p, "dtype": f"torch.{d}", "status": s}
        for p, d, s in [("flash", "bfloat16", "pass"), ("flex", "bfloat16", "pass"), ("triton", "bfloat16", "FAIL"),
                        ("flash", "float16", "pass"), ("flex", "float16", "FAIL"), ("flex-triton", "bfloat16", "pass")]
    ]  # fmt: skip
    attn = [
        dict(method="moc-flash", tokens=179400, inputs="video", mode="fwd", ms=80.0),
        dict(method="moc-flash", tokens=179400, inputs="random", mode="fwd", ms=90.0),
        dict(method="moc-flex", tokens=179400, inputs="video", mode="fwd", ms=60.0),
        dict(method="moc-flex", tokens=179400, inputs="random", mode="fwd", ms=70.0),
        dict(method="moc-triton", tokens=179400, inputs="video", mode="fwd", ms=10.0),
        dict(method="moc-flex-triton", tokens=179400, inputs="video", mode="fwd", ms=5.0),
        dict(method="moc-flash", tokens=32760, inputs="video", mode="fwd", ms=1.0),
    ]
    assert gpu_check.auto_order(checks, attn) == {"bfloat16": ["flex", "flash"], "float16": ["flash"]}
