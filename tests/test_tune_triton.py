"""The Triton launch-settings benchmark: its smoke mode times every candidate on the CPU and names the fastest."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def tune():
    spec = importlib.util.spec_from_file_location("tune_triton", os.path.join(ROOT, "benchmarks", "tune_triton.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_best_compares_each_kernel_with_the_default(tune):
    rows = [
        {"tokens": 10, "setting": "default", "fwd_ms": 2.0, "bwd_ms": 8.0, "fwd_bwd_ms": 10.0},
        {"tokens": 10, "setting": "a", "fwd_ms": 1.0, "bwd_ms": 9.0, "fwd_bwd_ms": 10.0},
        {"tokens": 10, "setting": "b", "fwd_ms": 2.5, "bwd_ms": 4.0, "fwd_bwd_ms": 6.5},
        {"tokens": 10, "setting": "c", "error": "OutOfResources: shared memory"},
    ]
    best = tune.best(rows)
    assert best["10 fwd"] == {"setting": "a", "ms": 1.0, "vs_default": 2.0}
    assert best["10 bwd"] == {"setting": "b", "ms": 4.0, "vs_default": 2.0}


def test_smoke_run_times_every_candidate_and_writes_results(tune, tmp_path, capsys):
    result = tune.main(["--smoke", "--out", str(tmp_path)])
    names = [name for name, _ in tune.candidates(tune.tm._config(32, tune.torch.device("cpu")))]
    assert [r["setting"] for r in result["rows"]] == names
    assert all("fwd_ms" in r for r in result["rows"]), result["rows"]
    saved = json.loads((tmp_path / "tune_triton_cpu.json").read_text())
    assert saved["best"] == result["best"] and set(saved["best"]) == {"128 fwd", "128 bwd"}
    assert "| kernel | fastest setting |" in (tmp_path / "tune_triton_cpu.md").read_text()
    assert "fastest setting" in capsys.readouterr().out
