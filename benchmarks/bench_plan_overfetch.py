"""Overfetch of the Triton backend's tile plans: pairs the kernels compute / pairs MoC attends. Runs on the CPU.

The Triton kernels walk, per tile of queries, the union of the chunks its tokens attend; tokens that disagree make
them compute pairs no token needs. This measures that factor from the plans alone (torch ops, no GPU), on the same
Wan-style layouts and inputs as `bench_attention.py`. Prints a table and writes JSON under `benchmarks/results/`.

    python benchmarks/bench_plan_overfetch.py                          # 32k and 180k tokens, H=12
    python benchmarks/bench_plan_overfetch.py --lengths 32k --heads 2  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import make_inputs, make_layout, parse_length, top_k_for_density  # noqa: E402
from bench_torch_backend import machine  # noqa: E402

from diffusers_moc import MoCConfig, route  # noqa: E402
from diffusers_moc.core.kernels.triton_moc import build_plan  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="32k,180k")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--frame-tokens", type=int, default=1560)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--density", type=float, default=0.15)
    p.add_argument("--out", type=Path, default=RESULTS / "plan_overfetch_cpu.json")
    args = p.parse_args(argv)

    rows = []
    for length in (parse_length(x) for x in args.lengths.split(",")):
        layout = make_layout(length, args.frame_tokens, args.shots)
        base = MoCConfig(local_window=1)
        config = base.replace(top_k=top_k_for_density(layout, base, args.density))
        for kind in ("video", "random"):
            q, k, _ = make_inputs(layout, args.frame_tokens, args.heads, args.head_dim, kind, torch.float32, "cpu")
            cases = [("token", 128, "auto"), ("token", 64, "auto"), ("token", 128, False)]
            cases.append(("block", 128, "auto"))
            for route_by, block_m, reorder in cases:
                cfg = config.replace(route_by=route_by, block_size=128)
                routing = route(q, k, layout, cfg)
                row = {
                    "tokens": layout.num_tokens,
                    "inputs": kind,
                    "route_by": route_by,
                    "tile": block_m,
                    "reorder": reorder,
                    "top_k": cfg.top_k,
                    "density": routing.density(),
                    "overfetch": build_plan(routing, block_m=block_m, reorder=reorder).overfetch(),
                }
                rows.append(row)
                print(
                    f"{row['tokens']:>7} {kind:<6} {route_by:<5} tile {block_m:>3} reorder {str(reorder):<5} "
                    f"density {row['density']:.3f} overfetch {row['overfetch']:.2f}",
                    flush=True,
                )
            del q, k
    header = "| tokens | inputs | route_by | tile | reorder | density | overfetch |\n|---|---|---|---|---|---|---|"
    table = "\n".join(
        [header]
        + [
            f"| {r['tokens']} | {r['inputs']} | {r['route_by']} | {r['tile']} | {r['reorder']} | {r['density']:.3f} "
            f"| {r['overfetch']:.2f} |"
            for r in rows
        ]
    )
    print(table)
    result = {
        "benchmark": "triton_plan_overfetch",
        "machine": machine(),
        "heads": args.heads,
        "head_dim": args.head_dim,
        "shots": args.shots,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(f"Machine: {result['machine']} ({result['date']})\n\n{table}\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
