r"""The one prepared GPU check of diffusers-moc: one command, about 8 minutes on one H100 or H200.

In one run it

1. checks every CUDA path (`flash`, `flash_attn` where flash-attn is installed, `flex` on the kernels it chooses
   (FlashAttention-4 where flash-attn-4 is installed), `flex-triton` (the flex backend held to FlexAttention's
   Triton kernels), `triton`, `torch`) in bfloat16 and float16 against the float32 reference: forward and
   gradients, every flash-attn call against its argument contract, NaN as in SDPA, and earlier chunks bit-identical
   when the last chunk re-routes (the causal DAG property);
2. times attention at 32k, 180k and 90k tokens (B=1, H=12, D=128, bfloat16, Wan 1560-token frames in 8 shots, ~15%
   density, video-like and iid inputs, forward and forward+backward) for every path that passed, against the
   fastest dense SDPA backend (cuDNN, flash, memory-efficient: the row names the winner) and FlexAttention on the same
   attended set, with peak memory, the block mask's building cost, and at the longest length one profiled run per
   path (device time of the largest kernels, busy time against wall time: `benchmarks/bench_attention.py`);
3. times one forward of a Wan 2.1 1.3B-size transformer (the real config: 30 layers, 12 heads, dim 1536; random
   weights) dense and with MoC on each path that passed, fastest first, at 32k and 180k tokens, with peak memory;
4. measures one denoising step and one shot's decode of an 8-shot, ~180k-token Wan 2.1 1.3B long video
   (`benchmarks/long_video_memory.py`), if the budget allows;
5. prints the targets (attention forward >= 4x and forward+backward >= 3x the fastest dense SDPA at 180k tokens,
   never slower than dense at 32k, at least as fast as FlexAttention, the transformer forward >= 2.5x dense at 180k,
   forward+backward peak memory <= dense at every length) as PASS / FAIL, and the order `auto` should take per dtype
   (the fastest paths that passed), and writes `gpu_<device>.json` and `.md` to `--out` after every stage.

A time budget (`--budget-s`) guards every stage: what would overrun is skipped and the results say so. A path
that raises is reported and the others go on.

**What it needs beyond PyTorch (2.9 or newer) and Triton**: `diffusers` for stages 3 and 4. Optional:
`flash-attn-4` (with its `nvidia-cutlass-dsl`, `quack-kernels`, `apache-tvm-ffi`, `torch-c-dlpack-ext`) for the
FlashAttention-4 rows, or `flash-attn` 2.x. On a machine without internet, download the wheels elsewhere
(`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d wheels
diffusers==0.42.1 flash-attn-4 ...`), copy them over, and

    pip install --no-index --no-deps --target /tmp/site wheels/*.whl
    export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD/src
    python benchmarks/gpu_check.py --out results/

(a `--target` install skips `.pth` files, so the CUTLASS DSL's package folder goes on the path by hand).

`--smoke` runs every stage on tiny shapes on whatever device there is (the CPU in the test suite), so the script is
known to run end to end before it meets a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
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
# The var-len contract checker is the tests' (`tests/varlen_contract.py`); the check runs from a checkout.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import bench_attention as bench  # noqa: E402
from varlen_contract import RecordingExecutor  # noqa: E402

from diffusers_moc import (  # noqa: E402
    ChunkLayout,
    MoCConfig,
    MoCRouting,
    available_backends,
    moc_attention,
    resolve_backend,
    route,
)
from diffusers_moc.core.backends import load_kernel  # noqa: E402
from diffusers_moc.core.kernels import flex as flex_backend  # noqa: E402
from diffusers_moc.core.kernels.executors import TorchFlashExecutor, torch_flash_unavailable  # noqa: E402
from diffusers_moc.core.kernels.flash_attn_executors import (  # noqa: E402
    FlashAttnExecutor,
    flash_attn_unavailable,
    flash_attn_version,
)
from diffusers_moc.core.kernels.varlen import varlen_backward, varlen_forward  # noqa: E402

PATHS = ("flash", "flash_attn", "flex", "flex-triton", "triton", "torch")
# Relative error bounds against the float32 reference (bf16 operands land between 1e-3 and 1e-2).
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
    ("at least as fast as FlexAttention on the same attended set (every length, both modes)", 1.0),
    ("forward+backward peak memory at most dense's (every length; dense / MoC)", 1.0),
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


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- stage 0: environment
def environment(device: torch.device) -> dict:
    probe = torch.zeros(1, 1, 1, 128, device=device, dtype=torch.bfloat16)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "flash_attn": flash_attn_version(),
        "flash_attn_4": _version("flash-attn-4"),
        "cutlass_dsl": _version("nvidia-cutlass-dsl"),
        "backends": available_backends(device),
        "auto": resolve_backend("auto", device),
        "flash_unavailable": torch_flash_unavailable(device),
        "flash_attn_unavailable": flash_attn_unavailable(device),
        "flex_unavailable": flex_backend.flex_unavailable(),
        "flex_kernels_bf16_d128": list(flex_backend.flex_kernel_choice(probe, probe)),
    }
    for name in ("triton", "diffusers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError as e:
            env[name] = None
            env[f"{name}_error"] = str(e)
    return env


# ---------------------------------------------------------------------------------------------- stage 1: correctness
def _layout(smoke: bool) -> ChunkLayout:
    """Captions (global + per shot) and two shots of odd-sized frames: text anchors, shots and chunks that straddle
    the 128-token blocks. One layout for every check of a path, so a compiled path compiles once per dtype."""
    if smoke:
        return ChunkLayout.concat(ChunkLayout.for_captions([5, 3], [-1, 0]), ChunkLayout.for_video(4, 8, [2, 2]))
    captions = ChunkLayout.for_captions([77, 20, 20], [-1, 0, 1])
    return ChunkLayout.concat(captions, ChunkLayout.for_video(5, 300, shot_frames=[2, 3]))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grads(fn, q, k, v, grad):
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [x.grad for x in leaves]


def path_backend(path: str) -> str:
    """The backend of a checked path (`flex-triton`: the flex backend held to FlexAttention's Triton kernels)."""
    return "flex_triton" if path == "flex-triton" else path


def path_kernel(path: str):
    """The [`MoCKernel`] of a checked path."""
    return load_kernel(path_backend(path))


def _attend(backend: str, q, k, v, routing: MoCRouting) -> torch.Tensor:
    """MoC attention on one backend with a given routing, through the library's op (as a model runs it)."""
    return moc_attention(q, k, v, routing.layout, MoCConfig(backend=backend), routing=routing)


def correctness(device, dtypes, smoke: bool, budget: Budget, save, reserve: float = 0.0, paths=PATHS) -> list[dict]:
    """Forward and gradients of every path vs the float32 reference; contract, NaN and DAG checks; `reserve`
    seconds of the budget stay for later stages."""
    results = []
    B, H, D = (2, 2, 16) if smoke else (2, 4, 128)
    for dtype in dtypes:
        probe = torch.zeros(1, 1, 1, D, device=device, dtype=dtype)
        for path in paths:
            reason = bench.moc_unavailable(path, probe, probe)
            if reason is not None:
                results.append({"path": path, "dtype": str(dtype), "status": "skipped", "reason": reason})
                continue
            if not budget.allows(f"correctness {path} {dtype}", 15, reserve=reserve if not smoke else 0):
                continue
            t0 = time.monotonic()
            try:
                result = _check_path(path, dtype, device, (B, H, D), smoke)
            except Exception as e:  # noqa: BLE001  (a path that raises fails; the others go on)
                result = {"path": path, "dtype": str(dtype), "status": "FAIL", "failures": [f"{type(e).__name__}: {e}"]}
            result["seconds"] = time.monotonic() - t0
            results.append(result)
            print(f"  {path:<12} {str(dtype):<15} {result['status']}  {result.get('worst', '')}  "
                  f"{result['seconds']:.0f} s  {'; '.join(result.get('failures', []))[:300]}", flush=True)  # fmt: skip
            save(results)
    return results


def _check_path(path, dtype, device, shape, smoke) -> dict:
    kernel = path_kernel(path)
    B, H, D = shape
    out_tol, grad_tol = TOLERANCE[dtype]
    layout = _layout(smoke)
    worst, failures = 0.0, []
    g = torch.Generator().manual_seed(0)
    configs = [MoCConfig(top_k=2), MoCConfig(top_k=3, causal=False, local_window=0, anchor_own_shot=True)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cfg in configs:
            q, k, v = (torch.randn(B, layout.num_tokens, H, D, generator=g).to(device, dtype) for _ in range(3))
            grad = torch.randn(q.shape, generator=g).to(device, dtype)
            r = route(q, k, layout, cfg)
            want = _grads(lambda a, b, c, r=r: _attend("reference", a.float(), b.float(), c.float(), r), q, k, v, grad)
            got = _grads(lambda a, b, c, r=r: _attend(path_backend(path), a, b, c, r), q, k, v, grad)
            for what, a, b, tol in zip(("out", "dq", "dk", "dv"), got, want, (out_tol,) + (grad_tol,) * 3):
                err = _rel(a, b)
                worst = max(worst, err)
                if not err <= tol:  # NaN fails too
                    failures.append(f"top_k={cfg.top_k} causal={cfg.causal}: {what} rel err {err:.2e} > {tol:.0e}")
        failures += _nan_check(kernel, layout, device, dtype, shape)
        failures += _dag_check(kernel, layout, device, dtype, shape, seeds=3 if smoke else 6)
    failures += _fallbacks(path, [str(w.message) for w in caught], device)
    failures += _contract(path, dtype, device, shape, layout)
    kernels = flex_backend.flex_kernel_choice(q, v)[0] if path.startswith("flex") else None
    return {"path": path, "dtype": str(dtype), "status": "FAIL" if failures else "pass", "worst": f"{worst:.2e}",
            "failures": failures, "kernels": "TRITON" if path == "flex-triton" else kernels}  # fmt: skip


def _fallbacks(path: str, messages: list[str], device) -> list[str]:
    """On CUDA a path must run its own kernels: a named fallback to slower ones is a failure of the path."""
    if device.type != "cuda":
        return []
    markers = {"flash": "portable torch executor instead", "flash_attn": "portable torch executor instead",
               "flex": "instead of FlashAttention-4"}  # fmt: skip
    marker = markers.get(path)
    hits = [m for m in messages if marker is not None and marker in m]
    if path == "flex" and hits and "FLASH lowering failed" not in hits[0]:
        return []  # FlashAttention-4 not installed: flex runs Flex's Triton kernels by design, as it says
    return [f"fell back: {hits[0]}"] if hits else []


def _contract(path, dtype, device, shape, layout) -> list[str]:
    """Every real flash call of a forward and backward against flash-attn's documented argument contract."""
    executor = {"flash": TorchFlashExecutor, "flash_attn": FlashAttnExecutor}.get(path)
    if executor is None:
        return []
    rec = RecordingExecutor(executor())
    q, k, v = (torch.randn(1, layout.num_tokens, shape[1], shape[2], device=device, dtype=dtype) for _ in range(3))
    routing = route(q, k, layout, MoCConfig(top_k=2))
    out, lse = varlen_forward(q, k, v, routing, 0.1, rec)
    varlen_backward(torch.randn_like(out), q, k, v, out, lse, routing, 0.1, rec)
    return [f"contract: {v}" for v in rec.violations[:5]] + ([] if rec.calls else ["contract: no call recorded"])


def _nan_check(kernel, layout, device, dtype, shape) -> list[str]:
    B, H, D = shape
    q, k, v = (torch.randn(B, layout.num_tokens, H, D, device=device, dtype=dtype) for _ in range(3))
    tok = layout.offsets[-2] + 1  # a token of the last chunk
    q[0, 3, 0, 5] = math.nan  # query 3, head 0: its output row
    v[0, tok, 1, 7] = math.nan  # value column 7 of that token, head 1: the rows that attend the last chunk
    routing = route(q.nan_to_num(), k, layout, MoCConfig(top_k=1, local_window=0))
    out = kernel.forward(q, k, v, routing, 0.125)[0]
    from diffusers_moc.core.routing import expand_routing  # noqa: PLC0415

    attends = expand_routing(routing)[0, 1, :, tok]  # (L,): which queries of head 1 attend that token
    want = torch.zeros_like(out, dtype=torch.bool)
    want[0, 3, 0] = True
    want[0, attends, 1, 7] = True
    return [] if torch.equal(out.isnan(), want) else ["NaN reached other rows than those that depend on it"]


def _dag_check(kernel, layout, device, dtype, shape, seeds: int) -> list[str]:
    """Re-routing the last chunk's queries leaves every earlier query's output bit-identical."""
    B, H, D = shape
    last = slice(layout.offsets[-2], layout.offsets[-1])
    bad = 0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(B, layout.num_tokens, H, D, generator=g).to(device, dtype) for _ in range(3))
        routing = route(q, k, layout, MoCConfig(top_k=2, local_window=0))
        other = MoCRouting(layout, routing.selected.clone(), routing.anchors)
        shuffled = torch.randint(0, layout.num_chunks - 1, other.selected[:, :, last].shape, generator=g)
        other.selected[:, :, last] = shuffled.to(device)
        a, b = (kernel.forward(q, k, v, r, 0.125)[0] for r in (routing, other))
        bad += not torch.equal(a[:, : last.start], b[:, : last.start])
    return [f"earlier chunks changed when the last chunk re-routed in {bad}/{seeds} seeds"] if bad else []


def passed(checks: list[dict], dtype: str = "torch.bfloat16") -> list[str]:
    return [c["path"] for c in checks if c["status"] == "pass" and c["dtype"] == dtype]


# ---------------------------------------------------------------------------------------------- stage 2: attention
class MethodGuard:
    """`bench.run_case`'s guard: skips a method whose estimated cost would not fit the budget (keeping `reserve`
    seconds for later stages). The estimate scales the method's fastest run at its longest measured length by the
    squared length, plus, at a length it has not run yet, what compiling cost it before (the first input kind at a
    length compiles, the second does not)."""

    def __init__(self, budget: Budget, reserve: float):
        self.budget, self.reserve = budget, reserve
        self.seen: dict[str, dict[int, list[float]]] = {}
        self.open: tuple[str, int, float] | None = None

    def estimate(self, method: str, tokens: int) -> float:
        seen = self.seen.get(method)
        if not seen:
            return 0.0
        longest = max(seen)
        steady = min(seen[longest]) * (tokens / longest) ** 2
        compiling = max(max(t) - min(t) for t in seen.values())
        return steady + (compiling if tokens not in seen else 0.0)

    def __call__(self, method: str, tokens: int, kind: str) -> bool:
        self.close()
        if not self.budget.allows(f"{method} at {tokens} tokens ({kind} inputs)", self.estimate(method, tokens),
                                  self.reserve):  # fmt: skip
            return False
        self.open = (method, tokens, time.monotonic())
        return True

    def close(self) -> None:
        if self.open is not None:
            method, tokens, t0 = self.open
            self.seen.setdefault(method, {}).setdefault(tokens, []).append(time.monotonic() - t0)
            self.open = None


def attention(device, args, budget: Budget, paths: list[str], save) -> tuple[list[dict], list[str]]:
    bargs = bench.build_parser().parse_args([])
    bargs.heads, bargs.head_dim, bargs.frame_tokens, bargs.shots = args.heads, args.head_dim, args.frame_tokens, 8
    bargs.density, bargs.warmup, bargs.iters, bargs.check = 0.15, args.warmup, args.iters, args.smoke
    bargs.route_by, bargs.route_block = ["token"], 128
    bargs.moc, bargs.peers = paths, ["sdpa", "flex"]
    bargs.dense_cache = {}
    bargs.profile_tokens = max(args.lengths) - args.frame_tokens if device.type == "cuda" else math.inf
    if args.smoke:
        bargs.local_window, bargs.shots = 0, 2
    dtype = _dtype(args, device)
    guard = MethodGuard(budget, reserve=args.reserve_s)
    rows, skipped = [], []
    # Shortest first (cheap, and it gives the guard every method's cost), then the longest (the targets), then the
    # others while the budget lasts.
    lengths = sorted(set(args.lengths))
    for length in lengths[:1] + lengths[-1:] * (len(lengths) > 1) + lengths[1:-1]:
        for kind in ("video", "random"):
            print(f"  attention: {length} tokens, {kind} inputs ({budget.left():.0f} s left)", flush=True)
            rows.extend(bench.run_case(bargs, length, kind, device, dtype, skipped, guard=guard))
            guard.close()
            bench.add_speedups(rows)
            save(rows, skipped)
    return rows, list(dict.fromkeys(skipped))


def fastest(attn_rows: list[dict], paths: list[str]) -> list[str]:
    """User-selectable backends among `paths`, fastest first by forward time at the longest length measured (the worst
    input kind), then the others in their given order."""
    best: dict[str, float] = {}
    longest = max((r["tokens"] for r in attn_rows), default=0)
    for r in attn_rows:
        name = r["method"].removeprefix("moc-")
        if r["method"].startswith("moc-") and r["mode"] == "fwd" and r["tokens"] == longest and name in paths:
            best[name] = max(best.get(name, 0.0), r["ms"])
    ranked = sorted(best, key=best.get) + [p for p in paths if p not in best]
    return [p for p in ranked if p != "flex-triton"]


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


def _wan_model(config: dict, device, dtype):
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

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
    return model


def transformer(device, args, budget: Budget, dense_backend: str | None, backends: list[str], save) -> list[dict]:
    """One forward of a Wan 2.1 1.3B-size transformer (random weights) per length: dense, then MoC on each of
    `backends` (fastest first). MoC's first forward at a length warms up (compiling backends compile there)."""
    config = WAN_TINY if args.smoke else WAN_13B
    try:
        from diffusers_moc import apply_moc, moc_context, remove_moc  # noqa: PLC0415

        model = _wan_model(config, device, _dtype(args, device))
    except ImportError as e:
        budget.skipped.append(f"transformer: diffusers does not import ({e}); install it (see the docstring)")
        return []
    grid = (4, 4) if args.smoke else (30, 52)
    rows: list[dict] = []
    for length in args.wan_lengths:
        frames = max(1, round(length / (grid[0] * grid[1])))
        shots = bench.split_shots(frames, 2 if args.smoke else 8)
        layout = ChunkLayout.for_video(frames, grid[0] * grid[1], shots)
        base = MoCConfig(local_window=0 if args.smoke else 1)
        cfg = base.replace(top_k=bench.top_k_for_density(layout, base, 0.15))
        inputs = _wan_inputs(config, frames, grid, device, _dtype(args, device))
        for backend in ["dense"] + backends:
            dense_s = next((r["s"] for r in rows if r["tokens"] == layout.num_tokens and r["backend"] == "dense"), None)
            repeats = 1 if backend == "dense" and length > 40_000 and not args.smoke else 2
            est = (dense_s or _scaled(rows, layout.num_tokens)) * repeats * (0.6 if backend != "dense" else 1.0)
            if not budget.allows(f"transformer {backend} forward at {layout.num_tokens} tokens", est):
                continue
            if backend != "dense":
                apply_moc(model, cfg.replace(backend=backend))
            try:
                with moc_context(shot_frames=shots), sdpa_backend_context(dense_backend):
                    s, peak, finite = _timed_forward(model, inputs, device, repeats)
            except Exception as e:  # noqa: BLE001
                budget.skipped.append(f"transformer {backend} at {layout.num_tokens}: {type(e).__name__}: {e}"[:300])
                continue
            finally:
                if backend != "dense":
                    remove_moc(model)
            rows.append({"tokens": layout.num_tokens, "frames": frames, "shots": shots, "top_k": cfg.top_k,
                         "backend": backend, "s": s, "peak_mib": peak, "finite": finite,
                         "speedup": None if dense_s is None or backend == "dense" else dense_s / s})  # fmt: skip
            print(f"  transformer {backend:<10} {layout.num_tokens:>6} tokens  {s:.3f} s", flush=True)
            save(rows)
    return rows


def _dtype(args, device) -> torch.dtype:
    return bench.DTYPES[args.dtype] if device.type == "cuda" else torch.float32


def _scaled(rows: list[dict], tokens: int) -> float:
    """A dense forward's expected seconds at `tokens`, from the last dense row (quadratic), or 30 s."""
    dense = [r for r in rows if r["backend"] == "dense"]
    return dense[-1]["s"] * (tokens / dense[-1]["tokens"]) ** 2 * 1.2 if dense else 30.0


def sdpa_backend_context(backend_name: str | None):
    """Dense attention inside the transformer on the SDPA backend the attention stage found fastest."""
    import contextlib  # noqa: PLC0415

    if backend_name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    return sdpa_kernel([getattr(SDPBackend, backend_name)])


# ---------------------------------------------------------------------------------------------- stage 4: long video
def long_video(args, budget: Budget, backend: str) -> dict | None:
    """One denoising step and one shot's decode of an 8-shot ~180k-token Wan 2.1 1.3B video (real sizes)."""
    if not budget.allows("long-video memory (8 shots x 57 frames at 480p, Wan 2.1 1.3B)", 90):
        return None
    import long_video_memory  # noqa: PLC0415

    argv = ["--frames", "57", "--backend", backend, "--out", os.path.join(args.out, "long_video_memory_gpu.json")]
    if args.smoke:
        argv = ["--height", "32", "--width", "32", "--frames", "5", "--layers", "1", "--shots", "2",
                "--out", os.path.join(args.out, "long_video_memory_smoke.json")]  # fmt: skip
    try:
        return long_video_memory.main(argv)
    except Exception as e:  # noqa: BLE001
        budget.skipped.append(f"long-video memory: {type(e).__name__}: {e}"[:300])
        return None


# ---------------------------------------------------------------------------------------------- stage 5: targets
def _near(r: dict, tokens: int) -> bool:
    return abs(r["tokens"] - tokens) <= 1560  # lengths are rounded to whole frames


def targets(attn_rows: list[dict], wan_rows: list[dict], longest: int = 179400, shortest: int = 32760) -> list[dict]:
    """Each target, PASS / FAIL by the path whose worst case (over input kinds and lengths) is best; every path's
    worst case is listed too. The length targets read the rows at the lengths they name (180k and 32k tokens, in
    whole 1560-token frames), and are NOT MEASURED where a run timed neither."""
    moc = [r for r in attn_rows if r["method"].startswith("moc") and r.get("speedup_vs_dense")]
    wan = [{"method": f"moc-{r['backend']}", "speedup_vs_dense": r["speedup"]} for r in wan_rows
           if r.get("speedup") and _near(r, longest)]  # fmt: skip
    vs_flex = [dict(r, speedup_vs_dense=r["speedup_vs_flex"]) for r in moc if r.get("speedup_vs_flex")]
    return [
        _target(*TARGETS[0], [r for r in moc if _near(r, longest) and r["mode"] == "fwd"]),
        _target(*TARGETS[1], [r for r in moc if _near(r, longest) and r["mode"] == "fwd+bwd"]),
        _target(*TARGETS[2], wan),
        _target(*TARGETS[3], [r for r in moc if _near(r, shortest)]),
        _target(*TARGETS[4], vs_flex),
        _target(*TARGETS[5], _memory_ratios(attn_rows)),
    ]


def _memory_ratios(attn_rows: list[dict]) -> list[dict]:
    """Per MoC forward+backward row: dense peak / MoC peak (>= 1 meets the memory target)."""
    dense = {(r["tokens"], r["inputs"]): r.get("peak_mib") for r in attn_rows
             if r["method"] == "sdpa-dense" and r["mode"] == "fwd+bwd"}  # fmt: skip
    out = []
    for r in attn_rows:
        d = dense.get((r["tokens"], r["inputs"]))
        if r["method"].startswith("moc") and r["mode"] == "fwd+bwd" and d and r.get("peak_mib"):
            out.append({"method": r["method"], "speedup_vs_dense": d / r["peak_mib"]})
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


def path_stages(checks: list[dict], attn_rows: list[dict], wan_rows: list[dict]) -> dict[str, list[str]]:
    """Per path, how far it got: its correctness per dtype (or why it was skipped), the lengths it was timed at, and
    the transformer lengths it ran."""
    stages: dict[str, list[str]] = {}
    for c in checks:
        detail = c.get("reason") or "; ".join(c.get("failures", []))
        stages.setdefault(c["path"], []).append(f"correctness {c['dtype'].removeprefix('torch.')}: {c['status']}"
                                                + (f" ({detail})" if detail else ""))  # fmt: skip
    for path in stages:
        timed = sorted({r["tokens"] for r in attn_rows if r["method"] == f"moc-{path}"})
        if timed:
            stages[path].append(f"attention timed at {timed} tokens")
        ran = sorted({r["tokens"] for r in wan_rows if r["backend"] == path})
        if ran:
            stages[path].append(f"transformer at {ran} tokens")
    return stages


def auto_order(checks: list[dict], attn_rows: list[dict]) -> dict[str, list[str]]:
    """Per dtype, the user-selectable paths that passed the correctness stage, fastest first (forward+backward and
    forward at the longest length, worst input kind, bfloat16 timings), for `auto` to take."""
    order = {}
    for dtype in ("torch.bfloat16", "torch.float16"):
        ok = [p for p in passed(checks, dtype) if p != "flex-triton"]
        order[dtype.removeprefix("torch.")] = fastest(attn_rows, ok)
    return order


# ---------------------------------------------------------------------------------------------- report
def _cell(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# GPU check: {env['device']}",
        "",
        f"{result['date']}; torch {env['torch']}, triton {env.get('triton')}, diffusers {env.get('diffusers')}, "
        f"flash-attn {env['flash_attn']}, flash-attn-4 {env.get('flash_attn_4')}, "
        f"cutlass-dsl {env.get('cutlass_dsl')}; "
        f"flex kernels (bf16, D=128): {env.get('flex_kernels_bf16_d128')}; auto = `{env['auto']}`; "
        f"{result.get('elapsed_s', 0):.0f} s.",
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
    lines += ["", f"`auto` order from these numbers: {result.get('auto_order')}", "", "## Paths", ""]
    lines += [f"- `{path}`: " + "; ".join(done) for path, done in (result.get("path_stages") or {}).items()]
    lines.append("")
    lines += ["## Correctness (vs the float32 reference)", "", "| path | dtype | kernels | status | worst rel err | s "
              "| notes |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in result["correctness"]:
        notes = "; ".join(c.get("failures", [])) or c.get("reason", "")
        lines.append(f"| {c['path']} | {c['dtype']} | {c.get('kernels') or '-'} | {c['status']} | "
                     f"{c.get('worst', '-')} | {_cell(c, 'seconds', '{:.0f}')} | {notes} |")  # fmt: skip
    lines += ["", "## Attention", "", "```", bench.format_table(result["attention"]), "```", ""]
    lines += _profile_lines(result["attention"])
    lines += ["## Transformer", "", "| tokens | shots | top_k | backend | s | speedup | peak MiB |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in result["transformer"]:
        lines.append(f"| {r['tokens']} | {len(r['shots'])} | {r['top_k']} | {r['backend']} | {r['s']:.3f} | "
                     f"{_cell(r, 'speedup', '{:.2f}x')} | {_cell(r, 'peak_mib', '{:.0f}')} |")  # fmt: skip
    if result.get("long_video"):
        lines += ["", "## Long video (8 shots, Wan 2.1 1.3B)", "", "| stage | tokens | weights GiB | peak GiB | s |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in result["long_video"]["rows"]:
            lines.append(f"| {r['stage']} | {r['tokens'] or '-'} | {r['weights_gib']:.2f} | "
                         f"{_cell(r, 'peak_gib', '{:.2f}')} | {r['seconds']:.2f} |")  # fmt: skip
    if result["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def _profile_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        p = r.get("profile")
        if p:
            top = "; ".join(f"{name} {ms:.1f}" for name, ms in p["top_kernels_ms"].items())
            lines.append(f"- {r['method']} {r['mode']} {r['tokens']} ({r['inputs']}): wall {p['wall_ms']:.1f} ms, "
                         f"device busy {p['device_busy_ms']:.1f} ms, {p['launches']} kernels; top: {top}")  # fmt: skip
    return (["### Where the time goes (profiled, ms)", ""] + lines + [""]) if lines else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check")
    p.add_argument("--reserve-s", type=float, default=110.0, help="seconds the attention stage leaves for stages 3-4")
    p.add_argument("--lengths", default="32k,90k,180k")
    p.add_argument("--wan-lengths", default="32k,180k")
    p.add_argument("--wan-backends", type=int, default=3, help="how many of the fastest passing paths stage 3 runs")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--frame-tokens", type=int, default=1560)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--stages", default="correctness,attention,transformer,long_video")
    p.add_argument("--paths", default=",".join(PATHS), help="the MoC paths to check and time (comma list)")
    p.add_argument("--untimed", default="", help="paths to check for correctness only (comma list)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device, every stage (the tests run it)")
    return p


class Report:
    """The result, written (JSON and Markdown) after every stage, so that a run cut short leaves what it measured."""

    def __init__(self, args, env: dict):
        self.start = time.monotonic()
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.result = {"benchmark": "gpu_check", "date": now,
                       "smoke": args.smoke, "environment": env, "correctness": [], "attention": [], "transformer": [],
                       "long_video": None, "targets": [], "auto_order": None, "path_stages": {},
                       "skipped": []}  # fmt: skip
        name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in env["device"])
        name += "-smoke" if args.smoke else ""
        os.makedirs(args.out, exist_ok=True)
        self.path = os.path.join(args.out, f"gpu_{name}.json")

    def save(self, **changes) -> None:
        self.result.update(changes)
        self.result["elapsed_s"] = time.monotonic() - self.start
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.result, f, indent=2, default=str)
        os.replace(tmp, self.path)
        with open(self.path[:-5] + ".md", "w", encoding="utf-8") as f:
            f.write(markdown(self.result))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.lengths, args.wan_lengths, args.frame_tokens, args.heads, args.head_dim = "128", "64", 16, 2, 32
        args.warmup, args.iters = 0, 1
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"--paths: unknown {unknown}; choose from {list(PATHS)}")
    args.lengths = [bench.parse_length(x) for x in args.lengths.split(",")]
    args.wan_lengths = [bench.parse_length(x) for x in args.wan_lengths.split(",")]
    stages = set(args.stages.split(","))
    budget = Budget(args.budget_s)
    report = Report(args, environment(device))
    env = report.result["environment"]
    print(f"GPU check on {env['device']}: torch {env['torch']}, triton {env.get('triton')}, diffusers "
          f"{env.get('diffusers')}, flash-attn {env['flash_attn']}, flash-attn-4 {env['flash_attn_4']}; backends "
          f"{env['backends']}, auto={env['auto']}, flex kernels {env['flex_kernels_bf16_d128']}",
          flush=True)  # fmt: skip
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: this is not a GPU check (use --smoke for the CPU run of the script)")
    # bfloat16 (the timed dtype) is checked first; float16 after the timings, so that a short budget costs the
    # float16 checks rather than the targets.
    dtypes = [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32]
    checks: list[dict] = []

    def check(dtype_list, reserve):
        if "correctness" in stages:
            save = lambda partial: report.save(correctness=checks + partial)  # noqa: E731
            checks.extend(correctness(device, dtype_list, args.smoke, budget, save, reserve, args.paths))
        report.save(correctness=checks, skipped=list(budget.skipped))

    print("stage 1: correctness", flush=True)
    check(dtypes[:1], reserve=args.reserve_s + 150)
    paths = passed(checks, str(dtypes[0])) if "correctness" in stages else list(args.paths)
    paths = [p for p in paths if p not in args.untimed.split(",")]
    print(f"stage 2: attention ({paths})", flush=True)
    attn, skipped = [], []
    if "attention" in stages:
        attn, skipped = attention(device, args, budget, paths, lambda rows, sk: report.save(attention=rows))
    report.save(attention=attn, skipped=skipped + budget.skipped)
    dense = [r for r in attn if r["method"] == "sdpa-dense" and r["mode"] == "fwd"]
    dense_backend = dense[-1].get("backend") if dense and device.type == "cuda" else None
    ranked = fastest(attn, paths)[: args.wan_backends]
    print(f"stage 3: transformer ({ranked})", flush=True)
    wan = []
    if "transformer" in stages:
        wan = transformer(device, args, budget, dense_backend, ranked, lambda rows: report.save(transformer=rows))
    print("stage 1b: correctness of the other dtypes", flush=True)
    check(dtypes[1:], reserve=60)
    print("stage 4: long video", flush=True)
    lv = long_video(args, budget, ranked[0] if ranked else "auto") if "long_video" in stages else None
    report.save(transformer=wan, long_video=lv, skipped=skipped + budget.skipped,
                targets=targets(attn, wan) if device.type == "cuda" else [],
                auto_order=auto_order(checks, attn), path_stages=path_stages(checks, attn, wan))  # fmt: skip
    result = report.result
    print(markdown(result))
    for t in result["targets"]:
        measured = _cell(t, "measured", "{:.2f}x")
        print(f"TARGET {t['status']:<12} {t['target']}: goal {t['goal']}x, measured {measured} ({t.get('path', '-')})")
    print(f"auto order: {result['auto_order']}")
    print(f"wrote {report.path} and .md in {result['elapsed_s']:.0f} s")
    result["path"] = report.path
    return result


if __name__ == "__main__":
    main()
