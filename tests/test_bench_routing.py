"""The routing benchmark script runs (tiny sizes) and reports what it claims."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_routing_benchmark_writes_both_tables(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_routing", os.path.join(ROOT, "benchmarks", "bench_routing.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--frames", "2", "--repeats", "1", "--heads", "2", "--head-dim", "8", "--dtypes", "fp32"]
    result = bench.main([*args, "--device", "cpu", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "before_ms" in printed and "forward_reads" in printed
    assert sorted(os.listdir(tmp_path)) == ["routing_cpu.json", "routing_cpu.md"]
    with open(tmp_path / "routing_cpu.json") as f:
        assert json.load(f)["routing"] == result["routing"]
    (row,) = result["routing"]
    assert row["tokens"] == 2 * 1560 and row["before_ms"] > 0 and row["after_ms"] > 0
    reads = {(r["backend"], r["routing"], r["padding"]): r for r in result["host_reads_inside_the_op"]}
    # The torch backend reads a fixed number of tensors per call (its plan's anchor matrix and routed counts, the NaN
    # check), however many chunks there are and whatever was routed; the reference only its NaN check.
    more_chunks = {(r["backend"], r["routing"], r["padding"]): r for r in bench.host_read_rows(12, verbose=False)}
    sparse = reads["torch", "sparse", "none"]
    for key in (("torch", "sparse", "none"), ("torch", "dense", "none")):
        assert more_chunks[key]["chunks"] > reads[key]["chunks"]
        for direction in ("forward_reads", "backward_reads"):
            assert 0 < more_chunks[key][direction] == reads[key][direction] == sparse[direction]
    assert reads["reference", "sparse", "none"]["forward_reads"] == 1
    assert reads["reference", "sparse", "per-sample caption padding"]["forward_reads"] > 1
