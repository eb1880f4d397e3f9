r"""The one prepared GPU check of diffusers-moc (issue 9): one command, at most 8 minutes on one H100 or H200.

In one run it

1. checks every CUDA path (`flash`, `flash_attn` where installed, `triton`, `torch`) in bfloat16 and float16
   against the reference on small shapes: forward and gradients, every flash call against flash-attn's argument
   contract, NaN as in SDPA, and earlier shots bit-identical when later chunks re-route;
2. times attention at 32k, 90k and 180k tokens (B=1, H=12, D=128, bfloat16, Wan 1560-token frames in 8 shots,
   ~15% density, video-like and iid inputs, forward and forward+backward) for every MoC path against the fastest dense
   SDPA backend and FlexAttention with the same attended set (`benchmarks/bench_attention.py`), with peak memory;
3. times one forward of a Wan 2.1 1.3B-size transformer (the real config: 30 layers, 12 heads, dim 1536; random
   weights) dense vs MoC at 32k and 180k tokens, with peak memory;
4. prints the issue's targets at 180k tokens (attention forward >= 4x and forward+backward >= 3x the fastest dense
   SDPA, the transformer forward >= 2.5x, never slower than dense at 32k) as PASS / FAIL, and writes
   `gpu_<device>.json` and `.md` (to `--out`, by default `benchmarks/results/`).

A time budget (`--budget-s`, default 450 s) guards every stage: what would overrun is skipped and the output says so.

**What it needs beyond PyTorch and Triton**: `diffusers` (0.42) for stage 3, and nothing else (on Python 3.10+
diffusers' other requirements are already on the GPU image: huggingface-hub, safetensors, numpy, regex, requests,
Pillow). `flash-attn` is optional: without it the `flash_attn` rows are skipped (its 2.x releases build from source
against CUDA; flash-attn 4 needs nvidia-cutlass-dsl, far over the device tool's carry limit). The GPU machine cannot
download, so diffusers travels as a wheel, from the repository root:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1

(6.4 MB; `.whl/` is git-ignored) and the device tool's `run` gets `carry: [".whl"]`, `timeout_s: 560` and:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit; PYTHONUNBUFFERED=1 python3 \
        benchmarks/gpu_check.py --out $OUT 2>&1 | tee $OUT/gpu_check.log

then copy the returned `gpu_*.json` / `.md` into `benchmarks/results/`, commit them, and set `attention._AUTO_ORDER`
from what they show.

`--smoke` runs every stage on tiny shapes on whatever device there is (the CPU here; the test suite runs it), so the
script is known to run end to end before the first GPU call.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import warnings

import torch

try:  # run from a checkout without installing
    import diffusers_moc  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_attention as bench  # noqa: E402

from diffusers_moc import ChunkLayout, MoCConfig, MoCRouting, available_backends, resolve_backend, route  # noqa: E402
from diffusers_moc.attention import load_kernel  # noqa: E402
from diffusers_moc.kernels import kernel_attention, reference_attention  # noqa: E402
from diffusers_moc.kernels.executors import TorchFlashExecutor, torch_flash_unavailable  # noqa: E402
from diffusers_moc.kernels.flash_attn_executors import (  # noqa: E402
    FlashAttnExecutor,
    flash_attn_unavailable,
    flash_attn_version,
)
from diffusers_moc.kernels.varlen import varlen_backward, varlen_forward  # noqa: E402
from diffusers_moc.kernels.varlen_contract import RecordingExecutor  # noqa: E402

PATHS = ("flash", "flash_attn", "triton", "torch")
# Relative error bounds against the float32 reference (METHOD.md: bf16 operands land between 1e-3 and 1e-2).
TOLERANCE = {torch.bfloat16: (2e-2, 4e-2), torch.float16: (5e-3, 1e-2), torch.float32: (1e-5, 1e-4)}
WAN_13B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
WAN_TINY = dict(WAN_13B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2)
TARGETS = (
    ("attention forward at 180k tokens, vs the fastest dense SDPA", 4.0),
    ("attention forward+backward at 180k tokens, vs the fastest dense SDPA", 3.0),
    ("Wan 2.1 1.3B-size transformer forward at 180k tokens, vs dense", 2.5),
    ("never slower than dense at 32k tokens (attention forward and forward+backward)", 1.0),
)


class Budget:
    """Wall-clock budget of the whole check; `allows(what, seconds)` says whether `what` still fits."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, what: str, seconds: float, reserve: float = 0.0) -> bool:
        if seconds + reserve <= self.left():
            return True
        self.skipped.append(f"{what}: skipped, needs ~{seconds:.0f} s and {self.left() - reserve:.0f} s are left")
        print(f"  budget: {self.skipped[-1]}", flush=True)
        return False


# ---------------------------------------------------------------------------------------------- stage 0: environment
def environment(device: torch.device) -> dict:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "flash_attn": flash_attn_version(),
        "backends": available_backends(device),
        "auto": resolve_backend("auto", device),
        "flash_unavailable": torch_flash_unavailable(device),
        "flash_attn_unavailable": flash_attn_unavailable(device),
    }
    for name in ("triton", "diffusers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError as e:
            env[name] = None
            env[f"{name}_error"] = str(e)
    return env


# ---------------------------------------------------------------------------------------------- stage 1: correctness
def _layouts(smoke: bool) -> list[tuple[str, ChunkLayout]]:
    if smoke:
        return [("video", ChunkLayout.for_video(4, 8, shot_frames=[2, 2]))]
    captions = ChunkLayout.for_captions([77, 20, 20], [-1, 0, 1])
    return [
        ("video-2-shots", ChunkLayout.for_video(6, 256, shot_frames=[2, 4])),
        ("captions+video", ChunkLayout.concat(captions, ChunkLayout.for_video(5, 300, shot_frames=[2, 3]))),
        ("odd-chunks", ChunkLayout.from_chunks([1, 7, 130, 65, 3, 200], [0, 0, 0, 1, 1, 1])),
    ]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grads(fn, q, k, v, grad):
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [x.grad for x in leaves]


def _reference_fn(routing):
    return lambda a, b, c: reference_attention(a.float(), b.float(), c.float(), routing)


def _kernel_fn(kernel, routing, scale):
    return lambda a, b, c: kernel_attention(kernel, a, b, c, routing, scale)[0]


def _path_runnable(path: str, q: torch.Tensor) -> str | None:
    return bench.moc_unavailable(path, q, q)


def correctness(device, dtypes, smoke: bool, budget: Budget) -> list[dict]:
    """Forward and gradients of every path vs the float32 reference; contract, NaN and DAG checks."""
    results = []
    H, D = (2, 16) if smoke else (4, 128)
    configs = [MoCConfig(top_k=2), MoCConfig(top_k=3, causal=False, local_window=0, anchor_own_shot=True)]
    for dtype in dtypes:
        for path in PATHS:
            probe = torch.zeros(1, 1, 1, D, device=device, dtype=dtype)
            reason = _path_runnable(path, probe)
            if reason is not None:
                results.append({"path": path, "dtype": str(dtype), "status": "skipped", "reason": reason})
                continue
            if not budget.allows(f"correctness {path} {dtype}", 20, reserve=200 if not smoke else 0):
                continue
            results.append(_check_path(path, dtype, device, H, D, configs, smoke))
            print(f"  {path:<10} {str(dtype):<15} {results[-1]['status']}  {results[-1].get('worst', '')}", flush=True)
    return results


def _check_path(path, dtype, device, H, D, configs, smoke) -> dict:
    kernel = load_kernel(path)
    out_tol, grad_tol = TOLERANCE[dtype]
    worst, failures, notes = 0.0, [], []
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for (name, layout), cfg in ((lc, c) for lc in _layouts(smoke) for c in configs):
            q, k, v = (torch.randn(2, layout.num_tokens, H, D, generator=g).to(device, dtype) for _ in range(3))
            grad = torch.randn(q.shape, generator=g).to(device, dtype)
            routing = route(q, k, layout, cfg)
            want = _grads(_reference_fn(routing), q, k, v, grad)
            got = _grads(_kernel_fn(kernel, routing, 1 / math.sqrt(D)), q, k, v, grad)
            for what, a, b, tol in zip(("out", "dq", "dk", "dv"), got, want, (out_tol,) + (grad_tol,) * 3):
                err = _rel(a, b)
                worst = max(worst, err)
                if not err <= tol:  # NaN fails too
                    failures.append(f"{name} {cfg.top_k}/{cfg.causal}: {what} rel err {err:.2e} > {tol:.0e}")
    fallbacks = [str(w.message) for w in caught if "portable torch executor instead" in str(w.message)]
    if fallbacks and path in ("flash", "flash_attn"):
        failures.append(f"fell back to the portable executor: {fallbacks[0]}")
    failures += _contract(path, dtype, device, H, D, smoke)
    failures += _nan_check(kernel, dtype, device)
    failures += _dag_check(kernel, dtype, device, seeds=3 if smoke else 10)
    return {"path": path, "dtype": str(dtype), "status": "FAIL" if failures else "pass", "worst": f"{worst:.2e}",
            "failures": failures, "notes": notes}  # fmt: skip


def _contract(path, dtype, device, H, D, smoke) -> list[str]:
    """Every real flash call of a forward and backward against flash-attn's documented argument contract."""
    executor = {"flash": TorchFlashExecutor, "flash_attn": FlashAttnExecutor}.get(path)
    if executor is None:
        return []
    rec = RecordingExecutor(executor())
    layout = _layouts(smoke)[-1][1]
    q, k, v = (torch.randn(1, layout.num_tokens, H, D, device=device, dtype=dtype) for _ in range(3))
    routing = route(q, k, layout, MoCConfig(top_k=2))
    out, lse = varlen_forward(q, k, v, routing, 0.1, rec)
    varlen_backward(torch.randn_like(out), q, k, v, out, lse, routing, 0.1, rec)
    return [f"contract: {v}" for v in rec.violations[:5]] + ([] if rec.calls else ["contract: no call recorded"])


def _nan_check(kernel, dtype, device) -> list[str]:
    layout = ChunkLayout.for_video(4, 16, shot_frames=[2, 2])
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 128, device=device, dtype=dtype) for _ in range(3))
    q[0, 3, 0, 5] = math.nan  # query 3, head 0: its output row
    v[0, 40, 1, 7] = math.nan  # value of token 40 (chunk 2), head 1, column 7: rows attending chunk 2
    routing = route(q.nan_to_num(), k, layout, MoCConfig(top_k=1, local_window=0))
    out = kernel.forward(q, k, v, routing, 0.125)[0]
    from diffusers_moc.routing import expand_routing  # noqa: PLC0415

    attends = expand_routing(routing)[0, 1, :, 40]  # (L,): which queries of head 1 attend token 40
    want = torch.zeros_like(out, dtype=torch.bool)
    want[0, 3, 0] = True
    want[0, attends, 1, 7] = True
    return [] if torch.equal(out.isnan(), want) else ["NaN reached other rows than those that depend on it"]


def _dag_check(kernel, dtype, device, seeds: int) -> list[str]:
    layout = ChunkLayout.for_video(4, 20)
    last = slice(layout.offsets[-2], layout.offsets[-1])
    bad = 0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, layout.num_tokens, 2, 128, generator=g).to(device, dtype) for _ in range(3))
        routing = route(q, k, layout, MoCConfig(top_k=2, local_window=0))
        other = MoCRouting(layout, routing.selected.clone(), routing.anchors)
        other.selected[:, :, last] = torch.randint(0, 3, other.selected[:, :, last].shape, generator=g).to(device)
        a, b = (kernel.forward(q, k, v, r, 0.125)[0] for r in (routing, other))
        bad += not torch.equal(a[:, : last.start], b[:, : last.start])
    return [f"earlier shots changed when later chunks re-routed in {bad}/{seeds} seeds"] if bad else []


# ---------------------------------------------------------------------------------------------- stage 2: attention
class MethodGuard:
    """`bench.run_case`'s guard: skips a method whose measured cost at a shorter length, scaled by the squared
    length, would not fit the budget (keeping `reserve` seconds for later stages). FlexAttention's cost is mostly
    compilation, once per length: it is estimated unscaled."""

    def __init__(self, budget: Budget, reserve: float):
        self.budget, self.reserve = budget, reserve
        self.per_token2: dict[str, float] = {}
        self.last_tokens: dict[str, int] = {}
        self.open: tuple[str, int, float] | None = None

    def __call__(self, method: str, tokens: int, kind: str) -> bool:
        self.close()
        guess = self.per_token2.get(method, 0.0) * (
            tokens**2 if method != "flex" else self.last_tokens.get(method, 1) ** 2
        )
        if not self.budget.allows(f"{method} at {tokens} tokens ({kind} inputs)", guess, self.reserve):
            return False
        self.open = (method, tokens, time.monotonic())
        return True

    def close(self) -> None:
        if self.open is not None:
            method, tokens, t0 = self.open
            self.per_token2[method] = max(self.per_token2.get(method, 0.0), (time.monotonic() - t0) / tokens**2)
            self.last_tokens[method] = tokens
            self.open = None


def attention(device, args, budget: Budget) -> tuple[list[dict], list[str]]:
    bargs = bench.build_parser().parse_args([])
    bargs.heads, bargs.head_dim, bargs.frame_tokens, bargs.shots = args.heads, args.head_dim, args.frame_tokens, 8
    bargs.density, bargs.warmup, bargs.iters, bargs.check = 0.15, args.warmup, args.iters, args.smoke
    bargs.block_m, bargs.route_by, bargs.route_block = [128], ["token"], 128
    bargs.moc, bargs.peers = list(PATHS), ["sdpa", "flex"]
    bargs.dense_cache = {}
    if args.smoke:
        bargs.local_window, bargs.block_m, bargs.shots = 0, [16], 2
    dtype = bench.DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    guard = MethodGuard(budget, reserve=args.reserve_s)
    rows, skipped = [], []
    # Shortest first (cheap, and it gives the guard every method's cost), then the longest (the targets), then the
    # others while the budget lasts.
    lengths = sorted(set(args.lengths))
    for length in lengths[:1] + lengths[-1:] * (len(lengths) > 1) + lengths[1:-1]:
        for kind in ("video", "random"):
            print(f"  attention: {length} tokens, {kind} inputs", flush=True)
            rows.extend(bench.run_case(bargs, length, kind, device, dtype, skipped, guard=guard))
            guard.close()
    bench.add_speedups(rows)
    return rows, list(dict.fromkeys(skipped))


# ---------------------------------------------------------------------------------------------- stage 3: transformer
def _wan_inputs(config: dict, frames: int, grid: tuple[int, int], device, dtype):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config["in_channels"], frames, 2 * grid[0], 2 * grid[1], generator=g)
    text = torch.randn(1, 512, config["text_dim"], generator=g)
    return latents.to(device, dtype), torch.tensor([500], device=device), text.to(device, dtype)


def _timed_forward(model, inputs, device, repeats: int) -> tuple[float, float | None, bool]:
    best, finite = math.inf, True
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(*inputs, return_dict=False)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
        finite = finite and bool(torch.isfinite(out).all())
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return best, peak, finite


def transformer(device, args, budget: Budget, dense_backend: str | None) -> list[dict]:
    """One forward of a Wan 2.1 1.3B-size transformer (random weights), dense vs MoC, per length."""
    try:
        from diffusers import WanTransformer3DModel  # noqa: PLC0415

        from diffusers_moc import apply_moc, moc_context, remove_moc  # noqa: PLC0415
    except ImportError as e:
        budget.skipped.append(f"transformer: diffusers does not import ({e}); carry its wheel (see the docstring)")
        return []
    config = WAN_TINY if args.smoke else WAN_13B
    dtype = bench.DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = WanTransformer3DModel(**config).eval()
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():  # as from_pretrained(torch_dtype=...) casts
        if not any(part in keep for part in name.split(".")) and not list(module.children()):
            module.to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # small random matrices: 30 random layers stay finite in bfloat16
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    grid = (4, 4) if args.smoke else (30, 52)
    rows = []
    for length in args.wan_lengths:
        frames = max(1, round(length / (grid[0] * grid[1])))
        shots = bench.split_shots(frames, 2 if args.smoke else 8)
        layout = ChunkLayout.for_video(frames, grid[0] * grid[1], shots)
        base = MoCConfig(local_window=0 if args.smoke else 1, backend=resolve_backend(args.wan_backend, device))
        cfg = base.replace(top_k=bench.top_k_for_density(layout, base, 0.15))
        inputs = _wan_inputs(config, frames, grid, device, dtype)
        repeats = 2 if length <= 40_000 or args.smoke else 1  # the first 32k run warms up
        row = {"tokens": layout.num_tokens, "frames": frames, "shots": shots, "top_k": cfg.top_k,
               "backend": cfg.backend}  # fmt: skip
        for mode in ("dense", "moc"):
            est = rows[-1][f"{mode}_s"] * (layout.num_tokens / rows[-1]["tokens"]) ** 2 * 1.3 if rows else 30
            if not budget.allows(f"transformer {mode} forward at {layout.num_tokens} tokens", est * repeats):
                continue
            if mode == "moc":
                apply_moc(model, cfg)
            context = sdpa_backend_context(dense_backend)
            with moc_context(shot_frames=shots), context:
                row[f"{mode}_s"], row[f"{mode}_peak_mib"], row[f"{mode}_finite"] = _timed_forward(
                    model, inputs, device, repeats
                )
            if mode == "moc":
                remove_moc(model)
            print(f"  transformer {mode:<5} {layout.num_tokens:>6} tokens  {row[f'{mode}_s']:.3f} s", flush=True)
        if "dense_s" in row and "moc_s" in row:
            row["speedup"] = row["dense_s"] / row["moc_s"]
        rows.append(row)
    return rows


def sdpa_backend_context(backend_name: str | None):
    """Dense attention inside the transformer on the SDPA backend the attention stage found fastest."""
    import contextlib  # noqa: PLC0415

    if backend_name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    return sdpa_kernel([getattr(SDPBackend, backend_name)])


# ---------------------------------------------------------------------------------------------- stage 4: targets
def targets(attn_rows: list[dict], wan_rows: list[dict], lengths: list[int]) -> list[dict]:
    """Each of the issue's targets, PASS / FAIL by the path whose worst case (over input kinds) is best; every path's
    worst case is listed too."""
    moc = [r for r in attn_rows if r["method"].startswith("moc") and r.get("speedup_vs_dense")]
    near = lambda r, tokens: abs(r["tokens"] - tokens) <= 1560  # noqa: E731  (lengths are rounded to frames)
    longest, shortest = max(lengths), min(lengths)
    out = [
        _target(*TARGETS[0], [r for r in moc if near(r, longest) and r["mode"] == "fwd"]),
        _target(*TARGETS[1], [r for r in moc if near(r, longest) and r["mode"] == "fwd+bwd"]),
        _target(
            *TARGETS[2],
            [
                {"method": f"moc-{r['backend']}", "speedup_vs_dense": r["speedup"]}
                for r in wan_rows
                if "speedup" in r and near(r, longest)
            ],
        ),  # fmt: skip
        _target(*TARGETS[3], [r for r in moc if near(r, shortest)]),
    ]
    return out


def _target(what: str, goal: float, rows: list[dict]) -> dict:
    per_path: dict[str, float] = {}
    for r in rows:
        per_path[r["method"]] = min(per_path.get(r["method"], math.inf), r["speedup_vs_dense"])
    if not per_path:
        return {"target": what, "goal": goal, "measured": None, "status": "NOT MEASURED", "per_path": {}}
    path = max(per_path, key=per_path.get)
    value = per_path[path]
    status = "PASS" if value >= goal else "FAIL"
    return {"target": what, "goal": goal, "measured": value, "path": path, "status": status, "per_path": per_path}


# ---------------------------------------------------------------------------------------------- report
_WAN_COLUMNS = (
    ("dense_s", "{:.3f}"),
    ("moc_s", "{:.3f}"),
    ("speedup", "{:.2f}x"),
    ("dense_peak_mib", "{:.0f}"),
    ("moc_peak_mib", "{:.0f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# GPU check: {env['device']}",
        "",
        f"{result['date']}; torch {env['torch']}, triton {env.get('triton')}, diffusers {env.get('diffusers')}, "
        f"flash-attn {env['flash_attn']}; auto = `{env['auto']}`; {result['elapsed_s']:.0f} s.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | best path (every path's worst case) | status |",
        "|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        others = ", ".join(f"{p} {v:.2f}x" for p, v in t["per_path"].items())
        lines.append(f"| {t['target']} | {t['goal']}x | {_cell(t, 'measured', '{:.2f}x')} | {t.get('path', '-')} "
                     f"({others}) | {t['status']} |")  # fmt: skip
    lines += ["", "## Correctness (vs the float32 reference)", "", "| path | dtype | status | worst rel err | notes |"]
    lines.append("|---|---|---|---|---|")
    for c in result["correctness"]:
        notes = "; ".join(c.get("failures", [])) or c.get("reason", "")
        lines.append(f"| {c['path']} | {c['dtype']} | {c['status']} | {c.get('worst', '-')} | {notes} |")
    lines += ["", "## Attention", "", "```", bench.format_table(result["attention"]), "```", "", "## Transformer", ""]
    lines.append("| tokens | shots | top_k | backend | dense s | MoC s | speedup | dense peak MiB | MoC peak MiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in result["transformer"]:
        cells = [_cell(r, key, fmt) for key, fmt in _WAN_COLUMNS]
        lines.append(
            f"| {r['tokens']} | {len(r['shots'])} | {r['top_k']} | {r['backend']} | " + " | ".join(cells) + " |"
        )
    if result["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check")
    p.add_argument("--reserve-s", type=float, default=90.0, help="seconds the attention stage leaves for stage 3")
    p.add_argument("--lengths", default="32k,90k,180k")
    p.add_argument("--wan-lengths", default="32k,180k")
    p.add_argument("--wan-backend", default="auto", help="MoC backend of the transformer run (auto: flash on CUDA)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--frame-tokens", type=int, default=1560)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--stages", default="correctness,attention,transformer")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device, every stage (the tests run it)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.lengths, args.wan_lengths, args.frame_tokens, args.heads, args.head_dim = "128", "64", 16, 2, 32
        args.warmup, args.iters = 0, 1
    args.lengths = [bench.parse_length(x) for x in args.lengths.split(",")]
    args.wan_lengths = [bench.parse_length(x) for x in args.wan_lengths.split(",")]
    stages = set(args.stages.split(","))
    budget = Budget(args.budget_s)
    env = environment(device)
    print(
        f"GPU check on {env['device']}: torch {env['torch']}, triton {env.get('triton')}, diffusers "
        f"{env.get('diffusers')}, flash-attn {env['flash_attn']}; backends {env['backends']}, auto={env['auto']}"
    )
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: this is not a GPU check (use --smoke for the CPU run of the script)")
    dtypes = [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32]
    print("stage 1: correctness", flush=True)
    checks = correctness(device, dtypes, args.smoke, budget) if "correctness" in stages else []
    print("stage 2: attention", flush=True)
    attn, skipped = attention(device, args, budget) if "attention" in stages else ([], [])
    dense = [r for r in attn if r["method"] == "sdpa-dense" and r["mode"] == "fwd"]
    dense_backend = dense[-1].get("backend") if dense and device.type == "cuda" else None
    print("stage 3: transformer", flush=True)
    wan = transformer(device, args, budget, dense_backend) if "transformer" in stages else []
    result = {
        "benchmark": "gpu_check",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "environment": env,
        "correctness": checks,
        "attention": attn,
        "transformer": wan,
        "targets": targets(attn, wan, args.lengths) if device.type == "cuda" else [],
        "skipped": skipped + budget.skipped,
    }
    result["elapsed_s"] = time.monotonic() - start
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in env["device"]) + ("-smoke" if args.smoke else "")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu_{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    md = markdown(result)
    with open(path[:-5] + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    for t in result["targets"]:
        measured = _cell(t, "measured", "{:.2f}x")
        print(f"TARGET {t['status']:<12} {t['target']}: goal {t['goal']}x, measured {measured} ({t.get('path', '-')})")
    print(f"wrote {path} and .md in {result['elapsed_s']:.0f} s")
    result["path"] = path
    return result


if __name__ == "__main__":
    main()
