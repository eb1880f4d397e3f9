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
    assert "stage 1: correctness" in printed and "stage 3: transformer" in printed
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].startswith("gpu_") and files[0].endswith("-smoke.json")
    saved = json.loads((tmp_path / files[0]).read_text())
    assert (tmp_path / files[1]).read_text().startswith("# GPU check")
    by_path = {c["path"]: c for c in saved["correctness"]}
    assert by_path["torch"]["status"] == "pass"
    if saved["environment"]["flash_unavailable"]:  # no CUDA here: skipped with the reason, not silently
        assert by_path["flash"]["status"] == "skipped" and by_path["flash"]["reason"]
        assert any(s.startswith("moc-flash:") for s in saved["skipped"])
    methods = {(r["method"], r["mode"]) for r in saved["attention"]}
    assert {("moc-torch", "fwd"), ("moc-torch", "fwd+bwd"), ("sdpa-dense", "fwd"), ("sdpa-dense", "fwd+bwd")} <= methods
    for row in saved["attention"]:  # every other MoC path is compared with the torch backend in the smoke run
        if row["method"].startswith("moc-") and row["method"] != "moc-torch":
            assert max(row[f"max_err_{n}"] for n in ("out", "dq", "dk", "dv")) < 1e-4
    (wan,) = saved["transformer"]
    assert wan["dense_s"] > 0 and wan["moc_s"] > 0 and wan["dense_finite"] and wan["moc_finite"]
    assert result["path"] == str(tmp_path / files[0])


def test_budget_guard_skips_and_says_so(gpu_check, tmp_path):
    result = gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0", "--stages", "correctness"])
    assert result["correctness"] == [c for c in result["correctness"] if c["status"] == "skipped"]
    assert any("skipped, needs" in s for s in result["skipped"])


def test_targets_pass_and_fail_by_the_worst_input_kind(gpu_check):
    def row(method, tokens, inputs, mode, speedup):
        return dict(method=method, tokens=tokens, inputs=inputs, mode=mode, speedup_vs_dense=speedup)

    attn = [
        row("moc-flash", 179400, "video", "fwd", 5.0),
        row("moc-flash", 179400, "random", "fwd", 4.2),
        row("moc-triton", 179400, "video", "fwd", 6.0),
        row("moc-triton", 179400, "random", "fwd", 1.5),
        row("moc-flash", 179400, "video", "fwd+bwd", 2.9),
        row("moc-flash", 179400, "random", "fwd+bwd", 3.4),
        row("moc-flash", 32760, "video", "fwd", 1.2),
        row("moc-flash", 32760, "random", "fwd+bwd", 0.9),
    ]
    wan = [{"tokens": 179400, "backend": "flash", "speedup": 2.6}]
    fwd, fwd_bwd, transformer, short = gpu_check.targets(attn, wan, [32760, 90480, 179400])
    assert fwd["status"] == "PASS" and fwd["path"] == "moc-flash" and fwd["measured"] == 4.2
    assert fwd["per_path"] == {"moc-flash": 4.2, "moc-triton": 1.5}
    assert fwd_bwd["status"] == "FAIL" and fwd_bwd["measured"] == 2.9
    assert transformer["status"] == "PASS"
    assert short["status"] == "FAIL" and short["measured"] == 0.9
    assert gpu_check.targets([], [], [32760])[0]["status"] == "NOT MEASURED"
