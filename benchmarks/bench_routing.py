r"""The cost of MoC routing before and after the exact-tie fix, and the host reads inside the attention op per call.

**Routing** (`route`): Wan-style frames of 1560 tokens in shots, one chunk per frame, causal, `top_k` 3, on one device.

- `before`: routing as of commit 5f76f78 (chunk means by `index_add_` in float32, scores by one einsum, stable sort);
  reproduced here as `route_before`, the reference the fix is measured against;
- `after`: `diffusers_moc.route` now: chunk means exact for identical keys (a component on which a chunk's keys
  agree is that value; the rest a fixed-order sum per chunk), descriptor canonicalisation (equal descriptors read
  one score column), NaN-safe selection, static shapes throughout.

On random inputs the two select the same chunks except for a handful of near-ties that their summation orders round
apart (counted in the table).

**Host reads** inside the op `diffusers_moc::attention` (the only place MoC reads device tensors back): the
`.item()`, `bool(tensor)`, `.tolist()` and `nonzero` calls of one forward and one backward, per backend, on a sparse
and a dense routing, with and without caption padding. Outside the op a transformer forward makes none (asserted by
`tests/test_processor_core.py`).

Prints both tables and writes `benchmarks/results/routing_<device>.json` and `.md`.

    python benchmarks/bench_routing.py                    # 8k, 16k, 32k tokens, fp32 and bf16, CPU
    python benchmarks/bench_routing.py --frames 3 --repeats 1   # a quick run
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

try:  # run from a checkout without installing
    import diffusers_moc  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import diffusers_moc.core.attention as attention
from diffusers_moc import ChunkLayout, MoCConfig, MoCRouting, route

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch_backend import machine  # noqa: E402

TOKENS_PER_FRAME = 1560
RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- routing before
def route_before(q: torch.Tensor, k: torch.Tensor, layout: ChunkLayout, config: MoCConfig) -> MoCRouting:
    """Routing as of commit 5f76f78 (inference path): float32 `index_add_` means, one einsum, stable sort."""
    B, L, H, D = q.shape
    C = layout.num_chunks
    anchors = layout.anchor_mask(config.local_window, config.anchor_own_shot, config.text_anchors, q.device)
    cands = layout.candidate_mask(
        config.local_window, config.anchor_own_shot, config.text_anchors, config.causal, q.device
    )
    tok_chunk = layout.token_chunks(q.device)
    n_slots = min(config.top_k, C)
    with torch.no_grad():
        work = torch.promote_types(k.dtype, torch.float32)
        sums = torch.zeros(B, C, H, D, device=q.device, dtype=work)
        sums.index_add_(1, tok_chunk, k.to(work))
        phi = sums / layout.chunk_sizes(q.device).to(work)[None, :, None, None]
        selected = torch.empty(B, H, L, n_slots, dtype=torch.long, device=q.device)
        for start in range(0, L, 8192):
            end = min(start + 8192, L)
            scores = torch.einsum("bthd,bchd->bhtc", q[:, start:end].to(work), phi)
            scores.masked_fill_(~cands[tok_chunk[start:end]], float("-inf"))
            values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
            values, order = values[..., :n_slots], order[..., :n_slots]
            selected[:, :, start:end] = torch.where(torch.isneginf(values), -1, order)
    return MoCRouting(layout, selected, anchors)


def best_times(fns, args: tuple, device: torch.device, repeats: int) -> list[float]:
    """Best wall time of each function; the functions alternate within every repeat, so that load from other
    processes on a shared machine hits them alike."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn(*args)  # warm-up
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(*args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def routing_rows(frames_list, dtypes, heads, head_dim, repeats, device) -> list[dict]:
    rows = []
    config = MoCConfig(top_k=3, local_window=1)
    for frames in frames_list:
        shots = [frames - frames // 2, frames // 2] if frames > 1 else [1]
        layout = ChunkLayout.for_video(frames, TOKENS_PER_FRAME, shots)
        for dtype_name in dtypes:
            g = torch.Generator(device).manual_seed(0)
            q, k = (
                torch.randn(1, layout.num_tokens, heads, head_dim, generator=g, device=device).to(DTYPES[dtype_name])
                for _ in range(2)
            )
            before, after = best_times((route_before, route), (q, k, layout, config), device, repeats)
            # Rows (query, head) whose selection differs: near-ties that the two summation orders round apart.
            differ = (route_before(q, k, layout, config).selected != route(q, k, layout, config).selected).any(-1)
            rows.append(
                {
                    "tokens": layout.num_tokens,
                    "chunks": layout.num_chunks,
                    "heads": heads,
                    "head_dim": head_dim,
                    "dtype": dtype_name,
                    "before_ms": round(before * 1e3, 2),
                    "after_ms": round(after * 1e3, 2),
                    "after_over_before": round(after / before, 2),
                    "rows": differ.numel(),
                    "rows_selecting_differently": int(differ.sum()),
                }
            )
            print(_format_row(rows[-1], ROUTING_COLUMNS), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- host reads
class _Reads(TorchFunctionMode):
    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def host_read_rows(frames: int = 6, verbose: bool = True) -> list[dict]:
    """Host reads of the op's forward and backward bodies, run directly under a counting mode, on two shots of
    `frames // 2` frames and a caption."""
    shots = [frames // 2, frames - frames // 2]
    layout = ChunkLayout.concat(ChunkLayout.for_video(frames, 8, shots), ChunkLayout.for_captions([6], [-1]))
    rows = []
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.num_tokens, 2, 8, generator=g) for _ in range(3))
    padded = torch.ones(2, layout.num_tokens, dtype=torch.bool)
    padded[0, -2:] = False
    for backend in ("torch", "reference"):
        for density, config in (("sparse", MoCConfig(top_k=1)), ("dense", MoCConfig(top_k=100, causal=False))):
            for padding in (None, padded):
                routing = route(q, k, layout, config, padding_mask=padding)
                static = (list(layout.sizes), list(layout.shots), list(layout.is_text), 0.35, backend)
                with _Reads() as fwd:
                    out, lse = attention._forward_impl(q, k, v, routing.selected, routing.anchors, padding, *static)
                with _Reads() as bwd:
                    attention._backward_impl(
                        torch.ones_like(out), q, k, v, out, lse, routing.selected, routing.anchors, padding, *static
                    )
                rows.append(
                    {
                        "backend": backend,
                        "routing": density,
                        "padding": "per-sample caption padding" if padding is not None else "none",
                        "chunks": layout.num_chunks,
                        "batch": q.shape[0],
                        "forward_reads": sum(fwd.counts.values()),
                        "backward_reads": sum(bwd.counts.values()),
                        "forward_by_kind": dict(fwd.counts),
                        "backward_by_kind": dict(bwd.counts),
                    }
                )
                if verbose:
                    print(_format_row(rows[-1], READ_COLUMNS), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- output
ROUTING_COLUMNS = [
    "tokens",
    "chunks",
    "heads",
    "head_dim",
    "dtype",
    "before_ms",
    "after_ms",
    "after_over_before",
    "rows",
    "rows_selecting_differently",
]
READ_COLUMNS = ["backend", "routing", "padding", "chunks", "batch", "forward_reads", "backward_reads"]


def _format_row(row: dict, columns: list[str]) -> str:
    return "| " + " | ".join(str(row[c]) for c in columns) + " |"


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + [_format_row(r, columns) for r in rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[5, 10, 21], help="latent frames of 1560 tokens")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    print("| " + " | ".join(ROUTING_COLUMNS) + " |")
    routing = routing_rows(args.frames, args.dtypes, args.heads, args.head_dim, args.repeats, device)
    print()
    print("| " + " | ".join(READ_COLUMNS) + " |")
    reads = host_read_rows()
    result = {
        "machine": machine(),
        # Other processes share the machine: its load average says how noisy the timings are.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "device": device.type,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "routing": routing,
        "host_reads_inside_the_op": reads,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"routing_{device.type}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(
            f"Machine: {result['machine']} ({result['date']}, torch {result['torch']}, load average "
            f"{result['load_average_1min']} when done)\n\n"
        )
        f.write("Routing cost, before (commit 5f76f78) and after the exact-tie fix (best of runs):\n\n")
        f.write(_table(routing, ROUTING_COLUMNS) + "\n\n")
        f.write("Host reads inside `diffusers_moc::attention`, one forward and one backward call:\n\n")
        f.write(_table(reads, READ_COLUMNS) + "\n")
    return result


if __name__ == "__main__":
    main()
