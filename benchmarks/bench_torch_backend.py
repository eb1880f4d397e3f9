"""MoC `torch` backend against dense `scaled_dot_product_attention` on a Wan-like layout.

Frames of 1560 tokens (one Wan 480p latent frame) split into shots, one chunk per frame, causal routing with the own
chunk as anchor and `top_k` picked per length to give about 15% density. Prints a table and writes JSON (and the
table as Markdown) under `benchmarks/results/`.

    python benchmarks/bench_torch_backend.py                      # 8k, 16k, 32k tokens
    python benchmarks/bench_torch_backend.py --frames 5 --repeats 1   # one quick size

Each measurement runs in a fresh process; peak memory is its peak resident set size (CPU) or peak allocated memory
(CUDA) above what the inputs use. Times are the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_moc import ChunkLayout, MoCConfig, moc_attention, route

TOKENS_PER_FRAME = 1560
RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best wall time (s) over `repeats` runs and the peak extra memory (MiB) of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Resetting the peak RSS counter (Linux) lets one process measure each case on its own.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS") * 1024
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return best, (peak - base) / 2**20


def pick_top_k(q, k, layout, base: MoCConfig, target: float) -> tuple[MoCConfig, float]:
    best = None
    for top_k in range(layout.num_chunks + 1):
        cfg = base.replace(top_k=top_k)
        d = route(q, k, layout, cfg).density()
        if best is None or abs(d - target) < abs(best[1] - target):
            best = (cfg, d)
    return best


def make_case(frames: int, shots: int, heads: int, head_dim: int, dtype, device):
    shot_frames = [frames // shots + (1 if s < frames % shots else 0) for s in range(shots)]
    layout = ChunkLayout.for_video(frames, TOKENS_PER_FRAME, shot_frames)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, layout.num_tokens, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    return layout, q, k, v


def case_fn(name: str, layout, q, k, v, config: MoCConfig):
    """The function timed for one row entry: dense or MoC, forward or forward+backward."""
    if name.endswith("fwd_bwd"):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    if name.startswith("dense"):

        def attend():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    else:

        def attend():
            return moc_attention(q, k, v, layout, config)

    if name.endswith("fwd_bwd"):
        return lambda: attend().sum().backward()

    def forward():
        with torch.no_grad():
            attend()

    return forward


def worker(args) -> None:
    """Measure one (size, function) in this fresh process, so peak memory is this case's alone."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    layout, q, k, v = make_case(args.frames[0], args.shots, args.heads, args.head_dim, dtype, device)
    config = MoCConfig(top_k=args.top_k, local_window=0, causal=True, backend="torch")
    # Warm up thread pools and kernels on a small input of the same kind, outside the timed and measured run.
    small = ChunkLayout.for_video(2, 64)
    case_fn(args.worker, small, *(t[:, : small.num_tokens] for t in (q, k, v)), config.replace(top_k=1))()
    fn = case_fn(args.worker, layout, q, k, v, config)
    seconds, mib = measure(fn, device, args.repeats)
    print(json.dumps({"seconds": seconds, "peak_mib": mib}))


def run_case(frames: int, args, device) -> dict:
    shots = min(args.shots, frames)
    layout, q, k, _ = make_case(frames, shots, args.heads, args.head_dim, getattr(torch, args.dtype), device)
    config, density = pick_top_k(q, k, layout, MoCConfig(local_window=0, causal=True), args.density)
    L = layout.num_tokens
    row = {"tokens": L, "frames": frames, "shots": shots, "chunks": layout.num_chunks, "top_k": config.top_k}
    row["density"] = density
    for name in ("dense_fwd", "moc_fwd", "dense_fwd_bwd", "moc_fwd_bwd"):
        cmd = [sys.executable, __file__, "--worker", name, "--frames", str(frames), "--top-k", str(config.top_k)]
        cmd += ["--shots", str(shots), "--heads", str(args.heads), "--head-dim", str(args.head_dim)]
        cmd += ["--dtype", args.dtype, "--repeats", str(args.repeats), "--device", str(device)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        row[f"{name}_s"], row[f"{name}_peak_mib"] = res["seconds"], res["peak_mib"]
        print(f"  {L:>6} tokens  {name:<14} {res['seconds']:8.3f} s  peak +{res['peak_mib']:8.1f} MiB", flush=True)
    row["fwd_speedup"] = row["dense_fwd_s"] / row["moc_fwd_s"]
    row["fwd_bwd_speedup"] = row["dense_fwd_bwd_s"] / row["moc_fwd_bwd_s"]
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| tokens | chunks | top_k | density | dense fwd s | MoC fwd s | fwd speedup | dense fwd+bwd s | MoC fwd+bwd s "
        "| fwd+bwd speedup | dense fwd+bwd peak MiB | MoC fwd+bwd peak MiB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['chunks']} | {r['top_k']} | {r['density']:.3f} | {r['dense_fwd_s']:.3f} "
            f"| {r['moc_fwd_s']:.3f} | {r['fwd_speedup']:.2f}x | {r['dense_fwd_bwd_s']:.3f} | {r['moc_fwd_bwd_s']:.3f} "
            f"| {r['fwd_bwd_speedup']:.2f}x | {r['dense_fwd_bwd_peak_mib']:.0f} | {r['moc_fwd_bwd_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[5, 10, 21], help="latent frames (1560 tokens each)")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.15, help="target attended fraction")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--top-k", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    device = torch.device(args.device)
    print(f"MoC torch backend vs dense SDPA on {machine()} ({device}, {args.dtype}, H={args.heads}, D={args.head_dim})")
    rows = [run_case(f, args, device) for f in args.frames]
    result = {
        "benchmark": "torch_backend_vs_dense_sdpa",
        "machine": machine(),
        "device": str(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "tokens_per_frame": TOKENS_PER_FRAME,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    md = table(rows)
    print(md)
    out = args.out or RESULTS / f"torch_backend_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"Machine: {result['machine']} ({result['date']})\n\n{md}\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
