r"""Launch settings of the `triton` backend's kernels, measured: forward and backward time per candidate setting.

The backend's tile sizes and warp counts (`kernels/triton_moc._config`) were first chosen so that the kernels compile
without register spills. This script times each kernel under a few candidate settings, one setting changed at a time
from the current default, on a Wan-style multi-shot sequence (bf16, B=1, H=12, D=128, 1560-token frames in 8 shots,
~15% density, video-like inputs), and reports the fastest setting of each kernel. All candidates run on the same
inputs and routing, in one process, through `moc_attention` (the plan is built in each call, as in a model): the
ratios are what to trust.

    python benchmarks/tune_triton.py                     # 180k tokens on CUDA
    python benchmarks/tune_triton.py --lengths 32k,180k
    python benchmarks/tune_triton.py --smoke             # tiny shapes; CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import (  # noqa: E402
    RESULTS_DIR,
    Case,
    fwd_bwd,
    parse_length,
    time_fn,
)

from diffusers_moc import moc_attention  # noqa: E402
from diffusers_moc.core.kernels import triton_moc as tm  # noqa: E402


def candidates(default: tm._Config) -> list[tuple[str, tm._Config]]:
    """The default, then one kernel's setting changed at a time (`fwd` and `dq` share `block_n`)."""
    r = dataclasses.replace
    return [
        ("default", default),
        ("fwd/dq block_n=128, stages 2", r(default, block_n=128, fwd=(8, 2), dq=(8, 2))),
        ("fwd stages 4", r(default, fwd=(default.fwd[0], 4))),
        ("fwd 4 warps", r(default, fwd=(4, default.fwd[1]))),
        ("dq stages 3", r(default, dq=(default.dq[0], 3))),
        ("dkdv keys 128", r(default, block_n_kv=128)),
        ("dkdv keys 128, queries 32", r(default, block_n_kv=128, block_m_kv=32)),
        ("dkdv queries 128", r(default, block_m_kv=128)),
        ("dkdv queries 32, 4 warps", r(default, block_m_kv=32, dkdv=(4, 2))),
        ("dkdv 4 warps", r(default, dkdv=(4, default.dkdv[1]))),
        ("dkdv stages 3", r(default, dkdv=(default.dkdv[0], 3))),
        ("dkdv keys 32, 4 warps", r(default, block_n_kv=32, dkdv=(4, 2))),
    ]


def _time_config(case: Case, cfg: tm._Config, args) -> dict:
    original = tm._config
    triton = case.config.replace(backend="triton")
    tm._config = lambda *a, **k: cfg  # the kernels read their settings here; restored below
    try:
        moc = lambda a, b, c: moc_attention(a, b, c, case.layout, triton, routing=case.routing)  # noqa: E731
        fwd = time_fn(lambda: moc(case.q, case.k, case.v), case.device, args.warmup, args.iters)
        both = time_fn(fwd_bwd(moc, case.q, case.k, case.v, case.grad), case.device, args.warmup, args.iters)
    finally:
        tm._config = original
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, "bwd_ms": both - fwd}


def run_length(args, length: int, device, dtype, deadline: float) -> list[dict]:
    case = Case(args, length, "video", device, dtype)
    default = tm._config(args.head_dim, device, dtype)
    rows = []
    for name, cfg in candidates(default):
        if time.monotonic() > deadline:
            rows.append({"tokens": case.layout.num_tokens, "setting": name, "skipped": "out of time"})
            continue
        row = {"tokens": case.layout.num_tokens, "setting": name, "config": dataclasses.asdict(cfg)}
        try:
            row.update(_time_config(case, cfg, args))
        except Exception as e:  # a setting that does not compile (shared memory, registers) is a finding
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    if "fwd_ms" not in row:
        return f"{row['tokens']:>7}  {row['setting']:<32}  {row.get('error') or row.get('skipped')}"
    times = "  ".join(f"{row[k]:9.2f}" for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"))
    return f"{row['tokens']:>7}  {row['setting']:<32}  {times}"


def best(rows: list[dict]) -> dict:
    """Per length: the fastest setting for the forward and for the backward, with the ratio to the default."""
    out = {}
    for tokens in sorted({r["tokens"] for r in rows}):
        timed = [r for r in rows if r["tokens"] == tokens and "fwd_ms" in r]
        base = next((r for r in timed if r["setting"] == "default"), None)
        if base is None:
            continue
        for key in ("fwd_ms", "bwd_ms"):
            top = min(timed, key=lambda r: r[key])
            ratio = base[key] / top[key]
            out[f"{tokens} {key[:-3]}"] = {"setting": top["setting"], "ms": top[key], "vs_default": ratio}
    return out


def markdown(result: dict) -> str:
    lines = [f"# Triton launch settings: {result['device']}", "", result["environment"], ""]
    lines += ["| tokens | setting | fwd ms | bwd ms | fwd+bwd ms |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if "fwd_ms" in r:
            times = " | ".join(f"{r[k]:.2f}" for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"))
            lines.append(f"| {r['tokens']} | {r['setting']} | {times} |")
        else:
            lines.append(f"| {r['tokens']} | {r['setting']} | {r.get('error') or r.get('skipped')} | | |")
    lines += ["", "| kernel | fastest setting | ms | vs default |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['setting']} | {v['ms']:.2f} | {v['vs_default']:.2f}x |" for k, v in result["best"].items()]
    return "\n".join(lines) + "\n"


def save(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in result["device"])
    stem = os.path.join(out_dir, f"tune_triton_{name}")
    for ext, text in ((".json", json.dumps(result, indent=2)), (".md", markdown(result))):
        with open(stem + ext + ".tmp", "w", encoding="utf-8") as f:  # whole files or none
            f.write(text)
        os.replace(stem + ext + ".tmp", stem + ext)
    return stem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="180k")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--frame-tokens", type=int, default=1560)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--density", type=float, default=0.15)
    p.add_argument("--local-window", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=170.0, help="settings left when this is spent are skipped")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one iteration (CPU under TRITON_INTERPRET=1)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        args.lengths, args.frame_tokens, args.shots, args.local_window, args.density = "128", 16, 2, 0, 0.25
        args.heads, args.head_dim, args.warmup, args.iters = 2, 32, 0, 1
    deadline = time.monotonic() + args.budget_s
    rows = []
    for length in (parse_length(x) for x in args.lengths.split(",")):
        rows += run_length(args, length, device, dtype, deadline)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env = f"{now}; torch {torch.__version__}, triton {tm.triton.__version__}; {dtype}; B=1, H={args.heads}, "
    env += f"D={args.head_dim}, video-like inputs"
    result = {"benchmark": "tune_triton", "device": name, "environment": env, "smoke": args.smoke, "rows": rows}
    result["best"] = best(rows)
    save(result, args.out)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
