"""MoC `torch` backend against dense `scaled_dot_product_attention` on the CPU, in the paper's two settings.

- **Wan**: frames of 1560 tokens (one Wan 480p latent frame) in 3 shots, one chunk per frame, causal routing with the
  own chunk as anchor and no local window, `top_k` picked per length for about 15% density (8k, 16k, 32k tokens).
- **single shot** (the paper's short-clip setting): ~6.5k tokens (26 latent frames of 16 x 16), 256-token chunks,
  `top_k=3`, no causal routing, no intra-shot anchor, no local window (~15% density; the FLOP ratio allows ~6.5x).

12 heads of 128, float32, forward (routing included, its share reported) and forward+backward. Each measurement runs
in a fresh process; peak memory is its peak resident set size above what the inputs use. Times are the best of
`--repeats` runs; speedups are ratios measured in one run. Prints a table, the backend's CPU targets as PASS / FAIL and
whether MoC's peak stays at or below dense's, and writes JSON and Markdown under `benchmarks/results/`.

The *kernel alone* column times PyTorch's fused CPU attention kernel by itself on as many query-key pairs as MoC
attends, in one batched call of 256-row query blocks, each against one chunk's keys: no routing, gathers, merges or
per-call work. It is a reference for what the kernel gives on chunk-sized key ranges (below the FLOP ratio: a short
key range amortises the kernel's per-block work less than dense attention's long one), not a strict bound: MoC's own
segments of a 1560-token chunk hold more than 256 rows and run faster than these blocks. The machine's
load average is recorded: these CPUs may be shared, and a loaded machine slows MoC's many mid-sized calls more than
dense attention's single one.

    python benchmarks/bench_torch_backend.py                        # both settings (about 10 minutes)
    python benchmarks/bench_torch_backend.py --frames 5 --repeats 1  # one quick Wan size, plus the single shot
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
SINGLE_SHOT = {"frames": 26, "tokens_per_frame": 256, "chunk_tokens": 256}
SINGLE_SHOT_CONFIG = dict(top_k=3, causal=False, anchor_own_shot=False, local_window=0)
# The torch backend's CPU targets: (setting, tokens, forward speedup over dense SDPA).
TARGETS = (("wan", 32760, 5.0), ("single-shot", 6656, 4.0))


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
    """Best wall time (s) over `repeats` runs and the peak extra memory (MiB) of the first one (in a fresh process
    the C allocator has not yet kept freed blocks, so the resident set's peak is what the run needed at once)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Resetting the peak RSS counter (Linux) lets one process measure each case on its own.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS") * 1024
    best, peak = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        if peak is None:
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


def make_case(setting: str, frames: int, shots: int, heads: int, head_dim: int, dtype, device):
    if setting == "single-shot":
        layout = ChunkLayout.for_video(
            SINGLE_SHOT["frames"], SINGLE_SHOT["tokens_per_frame"], chunk_tokens=SINGLE_SHOT["chunk_tokens"]
        )
    else:
        shot_frames = [frames // shots + (1 if s < frames % shots else 0) for s in range(shots)]
        layout = ChunkLayout.for_video(frames, TOKENS_PER_FRAME, shot_frames)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, layout.num_tokens, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    return layout, q, k, v


def base_config(setting: str) -> MoCConfig:
    if setting == "single-shot":
        return MoCConfig(**SINGLE_SHOT_CONFIG, backend="torch")
    return MoCConfig(local_window=0, causal=True, backend="torch")


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

        def forward_backward():
            attend().sum().backward()
            q.grad = k.grad = v.grad = None  # runs do not accumulate gradients

        return forward_backward

    def forward():
        with torch.no_grad():
            attend()

    return forward


def kernel_alone_fn(args, device, dtype):
    """The fused kernel alone on `args.pairs` query-key pairs: blocks of 256 query rows against one chunk each."""
    rows = -(-args.pairs // (args.heads * args.chunk))
    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(-(-rows // 256), args.heads, n, args.head_dim) for n in (256, args.chunk, args.chunk)]
    q, k, v = (torch.randn(s, generator=gen).to(device, dtype) for s in shapes)

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    return forward


def worker(args) -> None:
    """Measure one (setting, size, function) in this fresh process, so peak memory is this case's alone."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.worker == "kernel_fwd":
        seconds, mib = measure(kernel_alone_fn(args, device, dtype), device, args.repeats)
        print(json.dumps({"seconds": seconds, "peak_mib": mib}))
        return
    layout, q, k, v = make_case(args.setting, args.frames[0], args.shots, args.heads, args.head_dim, dtype, device)
    config = base_config(args.setting).replace(top_k=args.top_k)
    # Warm up thread pools and kernels on a small input of the same kind, outside the timed and measured run.
    small = ChunkLayout.for_video(2, 64)
    case_fn(args.worker, small, *(t[:, : small.num_tokens] for t in (q, k, v)), config.replace(top_k=1))()
    fn = case_fn(args.worker, layout, q, k, v, config)
    seconds, mib = measure(fn, device, args.repeats)
    res = {"seconds": seconds, "peak_mib": mib}
    if args.worker == "moc_fwd":  # routing's share of the MoC forward
        res["route_s"] = min(_time(lambda: route(q, k, layout, config)) for _ in range(max(1, args.repeats)))
    print(json.dumps(res))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_case(setting: str, frames: int, args, device) -> dict:
    shots = 1 if setting == "single-shot" else min(args.shots, frames)
    layout, q, k, _ = make_case(setting, frames, shots, args.heads, args.head_dim, getattr(torch, args.dtype), device)
    if setting == "single-shot":
        config = base_config(setting)
        density = route(q, k, layout, config).density()
    else:
        config, density = pick_top_k(q, k, layout, base_config(setting), args.density)
    L = layout.num_tokens
    pairs = int(route(q, k, layout, config).attended_tokens().sum())
    chunk = int(layout.chunk_sizes().max())
    row = {"setting": setting, "tokens": L, "frames": frames, "shots": shots, "chunks": layout.num_chunks}
    row.update(top_k=config.top_k, density=density, load_before=os.getloadavg()[0])
    for name in ("dense_fwd", "moc_fwd", "kernel_fwd", "dense_fwd_bwd", "moc_fwd_bwd"):
        cmd = [sys.executable, __file__, "--worker", name, "--setting", setting, "--frames", str(frames)]
        cmd += ["--pairs", str(pairs), "--chunk", str(chunk)]
        cmd += ["--top-k", str(config.top_k), "--shots", str(shots), "--heads", str(args.heads)]
        cmd += ["--head-dim", str(args.head_dim), "--dtype", args.dtype, "--repeats", str(args.repeats)]
        cmd += ["--device", str(device)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        row[f"{name}_s"], row[f"{name}_peak_mib"] = res["seconds"], res["peak_mib"]
        if "route_s" in res:
            row["route_s"] = res["route_s"]
        print(f"  {setting:<11} {L:>6} tokens  {name:<14} {res['seconds']:8.3f} s  peak +{res['peak_mib']:8.1f} MiB")
    row["load_after"] = os.getloadavg()[0]
    row["fwd_speedup"] = row["dense_fwd_s"] / row["moc_fwd_s"]
    row["fwd_bwd_speedup"] = row["dense_fwd_bwd_s"] / row["moc_fwd_bwd_s"]
    row["kernel_alone_speedup"] = row["dense_fwd_s"] / row["kernel_fwd_s"]
    row["route_share"] = row["route_s"] / row["moc_fwd_s"]
    for mode in ("fwd", "fwd_bwd"):
        row[f"{mode}_peak_at_or_below_dense"] = row[f"moc_{mode}_peak_mib"] <= row[f"dense_{mode}_peak_mib"]
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| setting | tokens | chunks | top_k | density | dense fwd s | MoC fwd s | fwd speedup "
        "| kernel alone | routing share "
        "| dense fwd+bwd s | MoC fwd+bwd s | fwd+bwd speedup | dense / MoC fwd peak MiB "
        "| dense / MoC fwd+bwd peak MiB | MoC peak <= dense (fwd, fwd+bwd) | load avg |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    yes = {True: "yes", False: "NO"}
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['tokens']} | {r['chunks']} | {r['top_k']} | {r['density']:.3f} "
            f"| {r['dense_fwd_s']:.3f} | {r['moc_fwd_s']:.3f} | {r['fwd_speedup']:.2f}x "
            f"| {r['kernel_alone_speedup']:.2f}x | {r['route_share']:.0%} "
            f"| {r['dense_fwd_bwd_s']:.3f} | {r['moc_fwd_bwd_s']:.3f} | {r['fwd_bwd_speedup']:.2f}x "
            f"| {r['dense_fwd_peak_mib']:.0f} / {r['moc_fwd_peak_mib']:.0f} "
            f"| {r['dense_fwd_bwd_peak_mib']:.0f} / {r['moc_fwd_bwd_peak_mib']:.0f} "
            f"| {yes[r['fwd_peak_at_or_below_dense']]}, {yes[r['fwd_bwd_peak_at_or_below_dense']]} "
            f"| {r['load_before']:.1f}-{r['load_after']:.1f} |"
        )
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    for setting, tokens, goal in TARGETS:
        row = next((r for r in rows if r["setting"] == setting and r["tokens"] == tokens), None)
        if row is None:
            lines.append(f"TARGET NOT MEASURED {setting} at {tokens} tokens: forward >= {goal}x dense")
            continue
        status = "PASS" if row["fwd_speedup"] >= goal else "FAIL"
        share = row["route_share"]
        speedup = row["fwd_speedup"]
        lines.append(
            f"TARGET {status} {setting} at {tokens} tokens: forward {speedup:.2f}x dense (goal {goal}x; "
            f"routing {share:.0%} of the MoC forward; the fused kernel alone on as many pairs: "
            f"{row['kernel_alone_speedup']:.2f}x)"
        )
    for r in rows:
        if not r["fwd_bwd_peak_at_or_below_dense"]:
            moc, dense = r["moc_fwd_bwd_peak_mib"], r["dense_fwd_bwd_peak_mib"]
            lines.append(f"MEMORY {r['setting']} at {r['tokens']} tokens: MoC fwd+bwd peak {moc:.0f} > {dense:.0f} MiB")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[5, 10, 21], help="Wan latent frames (1560 each)")
    parser.add_argument("--no-single-shot", action="store_true", help="skip the paper's single-shot setting")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.15, help="target attended fraction (Wan setting)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="wan", help=argparse.SUPPRESS)
    parser.add_argument("--top-k", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    device = torch.device(args.device)
    print(f"MoC torch backend vs dense SDPA on {machine()} ({device}, {args.dtype}, H={args.heads}, D={args.head_dim})")
    rows = [] if args.no_single_shot else [run_case("single-shot", SINGLE_SHOT["frames"], args, device)]
    rows += [run_case("wan", f, args, device) for f in args.frames]
    result = {
        "benchmark": "torch_backend_vs_dense_sdpa",
        "machine": machine(),
        "device": str(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "tokens_per_frame": TOKENS_PER_FRAME,
        "single_shot": {**SINGLE_SHOT, **SINGLE_SHOT_CONFIG},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    md = table(rows)
    lines = target_lines(rows)
    result["targets"] = lines
    print(md)
    print("\n".join(lines))
    out = args.out or RESULTS / f"torch_backend_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    note = "\n".join(f"    {line}" for line in lines)
    out.with_suffix(".md").write_text(f"Machine: {result['machine']} ({result['date']})\n\n{md}\n\n{note}\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
