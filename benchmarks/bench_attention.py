r"""MoC attention (every backend) against dense and sparse peers, on Wan-style multi-shot video sequences.

Rows, per sequence length and input kind (video-like or iid random), forward and forward+backward:

- `moc-flash`, `moc-flash_attn`, `moc-flex`, `moc-triton`, `moc-torch`: `diffusers_moc` routing + one backend
  (PyTorch's flash var-len kernels, the flash-attn package, FlexAttention with the routing's block mask on the
  kernels the backend chooses (`kernels` column: FLASH is FlashAttention-4), the Triton kernels, the portable torch
  backend); `moc-flex-triton`: the flex backend held to FlexAttention's Triton kernels (CUDA only); the time
  includes routing and its share is reported; rows whose backend cannot run here are skipped with the reason;
- `sdpa-dense`: the fastest dense `scaled_dot_product_attention` backend (cuDNN, flash or memory-efficient);
- `flex`: FlexAttention's Triton kernels (compiled) with the flex backend's block mask of the same routing, its own
  autograd, the mask built outside the timing (`block_mask_ms` says what building it costs);
- `vsa`: Video Sparse Attention from the `fastvideo-kernel` package at about the same density (its own routing),
  where it imports.

`benchmarks/gpu_check.py` runs this as part of the one prepared GPU check.

Effective TFLOP/s count the attended pairs only (4 * pairs * D forward, 3.5x that forward+backward, as FlashAttention
counts them). Results go to a table on stdout and to JSON in `benchmarks/results/`.

    python benchmarks/bench_attention.py                  # B=1, H=12, D=128, bf16, L = 32k, 90k, 180k (CUDA)
    python benchmarks/bench_attention.py --lengths 32k    # one length
    python benchmarks/bench_attention.py --quick          # tiny smoke run; works on CPU (GPU-only rows skipped)
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
from collections.abc import Callable

import torch

try:  # run from a checkout without installing
    import diffusers_moc  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from diffusers_moc import ChunkLayout, MoCConfig, moc_attention, route
from diffusers_moc.core.kernels import flex as flex_backend
from diffusers_moc.core.kernels.executors import torch_flash_unsupported
from diffusers_moc.core.kernels.flash_attn_executors import flash_attn_unsupported
from diffusers_moc.core.kernels.flex_mask import flex_block_mask

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------------- inputs
def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


def split_shots(num_frames: int, shots: int) -> list[int]:
    shots = max(1, min(shots, num_frames))
    base, extra = divmod(num_frames, shots)
    return [base + 1] * extra + [base] * (shots - extra)


def frame_grid(tokens: int) -> tuple[int, int]:
    """(height, width) of a frame: Wan 480p is 30 x 52 = 1560; otherwise the most square factorisation."""
    if tokens == 1560:
        return 30, 52
    h = int(math.isqrt(tokens))
    while tokens % h:
        h -= 1
    return h, tokens // h


def make_layout(length: int, frame_tokens: int, shots: int) -> ChunkLayout:
    frames = max(1, round(length / frame_tokens))
    return ChunkLayout.for_video(frames, frame_tokens, shot_frames=split_shots(frames, shots))


def top_k_for_density(layout: ChunkLayout, config: MoCConfig, density: float) -> int:
    """Smallest `top_k` whose attended fraction (anchors + routed, exact for the layout) reaches `density`."""
    anchors = layout.anchor_mask(config.local_window, config.anchor_own_shot, config.text_anchors)
    cands = layout.candidate_mask(config.local_window, config.anchor_own_shot, config.text_anchors, config.causal)
    sizes = layout.chunk_sizes().double()
    L = layout.num_tokens
    n_cand = cands.sum(1)
    for k in range(layout.num_chunks + 1):
        # Routed chunks are of frame size here (all chunks equal), so the count is exact.
        att = (anchors.double() @ sizes) + torch.minimum(n_cand, torch.tensor(k)).double() * sizes.mean()
        if float((att * sizes).sum() / (L * L)) >= density:
            return k
    return layout.num_chunks


def make_inputs(
    layout: ChunkLayout, frame_tokens: int, heads: int, head_dim: int, kind: str, dtype, device, seed: int = 0
) -> list[torch.Tensor]:
    r"""
    `q, k, v` `(1, L, H, D)`. `"random"`: iid normal. `"video"`: smooth, low-rank content: every token is its shot's
    vector, a slow drift over frames, and a few low-frequency spatial patterns (so neighbouring tokens agree on their
    chunks, as on real video latents), plus a little noise.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    L = layout.num_tokens
    frames = L // frame_tokens
    out = []
    for _ in range(3):
        if kind == "random":
            x = torch.randn(1, L, heads, head_dim, generator=g)
        else:
            gh, gw = frame_grid(frame_tokens)
            yy, xx = torch.meshgrid(torch.arange(gh) / gh, torch.arange(gw) / gw, indexing="ij")
            freqs = [(0, 1), (1, 0), (1, 1), (2, 1)]
            basis = torch.stack([torch.cos(math.pi * (u * yy + v * xx)).flatten() for u, v in freqs], -1)  # (P, R)
            shot_of_frame = torch.tensor([layout.shots[f] for f in range(frames)])
            shot_vec = torch.randn(max(layout.shots) + 1, heads, head_dim, generator=g)[shot_of_frame]
            drift = torch.randn(frames, heads, head_dim, generator=g).cumsum(0) / math.sqrt(frames)
            coeff = torch.randn(frames, len(freqs), heads, head_dim, generator=g) * 0.3 + torch.randn(
                1, len(freqs), heads, head_dim, generator=g
            )
            spatial = torch.einsum("pr,frhd->fphd", basis, coeff)
            x = (shot_vec + 0.5 * drift)[:, None] + spatial
            x = x + 0.1 * torch.randn(x.shape, generator=g)
            x = (x / x.std()).reshape(1, L, heads, head_dim)
        out.append(x.to(device=device, dtype=dtype))
    return out


# ---------------------------------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device, warmup: int, iters: int) -> float:
    """Median wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_mib(fn: Callable[[], object], device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def fwd_bwd(fn: Callable[..., torch.Tensor], q, k, v, grad):
    def run():
        qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        fn(qq, kk, vv).backward(grad)

    return run


# ---------------------------------------------------------------------------------------------------------- peers
def sdpa_runner(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
        return out.transpose(1, 2)

    return run


def vsa_runner(density: float):
    import inspect

    from fastvideo_kernel import video_sparse_attn  # noqa: PLC0415  (optional peer)

    params = inspect.signature(video_sparse_attn).parameters

    def run(q, k, v):
        L = q.shape[1]
        pad = (-L) % 64
        qh, kh, vh = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).transpose(1, 2).contiguous() for x in (q, k, v))
        nb = qh.shape[2] // 64
        sizes = torch.full((nb,), 64, dtype=torch.int32, device=q.device)
        sizes[-1] = 64 - pad
        kwargs = dict(variable_block_sizes=sizes, topk=max(1, round(density * nb)), block_size=64)
        if "q_variable_block_sizes" in params:
            kwargs["q_variable_block_sizes"] = sizes
        return video_sparse_attn(qh, kh, vh, **kwargs)[:, :, :L].transpose(1, 2)

    return run


# ---------------------------------------------------------------------------------------------------------- main
def _row(name, length, kind, mode, ms, pairs, head_dim, **extra):
    flops = 4.0 * pairs * head_dim * (3.5 if mode == "fwd+bwd" else 1.0)
    row = dict(method=name, tokens=length, inputs=kind, mode=mode, ms=ms, tflops=None, **extra)
    if ms is not None:
        row["tflops"] = flops / (ms * 1e-3) / 1e12
    return row


def moc_unavailable(backend: str, q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why a MoC backend cannot run these inputs natively (no fallback is timed), or `None`. `flex-triton` is the
    flex backend forced onto FlexAttention's Triton kernels (CUDA only)."""
    if backend == "flash":
        return torch_flash_unsupported(q, v)
    if backend == "flash_attn":
        return flash_attn_unsupported(q, v)
    if backend in ("flex", "flex-triton"):
        reason = flex_backend.flex_unavailable()
        if reason is None and backend == "flex-triton" and q.device.type != "cuda":
            reason = "FlexAttention's Triton kernels need CUDA"
        return reason
    if backend == "triton":
        try:
            from diffusers_moc.core.kernels import triton_moc as tm  # noqa: PLC0415
        except ImportError as e:
            return f"triton does not import ({e})"
        if q.device.type != "cuda" and not tm._INTERPRETED:
            return "needs CUDA (or TRITON_INTERPRET=1 set before Triton is imported)"
        if q.device.type != "cuda" and q.dtype == torch.bfloat16:
            return "bfloat16 is wrong in the Triton interpreter"
        if q.device.type != "cuda" and _interpreter_numpy_clash():
            return "Triton 3.6's interpreter cannot run loops bounded by loaded values under NumPy 2.4+"
        return None
    if backend == "torch":
        return None
    return f"unknown backend {backend!r}"


def _interpreter_numpy_clash() -> bool:
    """Triton's interpreter before 3.7 turns a loaded scalar into a one-element array, which NumPy 2.4+ refuses to
    convert to an index (seen with Triton 3.6 and NumPy 2.4; Triton 3.9 runs the kernels)."""
    import numpy  # noqa: PLC0415
    import triton  # noqa: PLC0415

    version = lambda text: tuple(int(x) for x in text.split(".")[:2] if x.isdigit())  # noqa: E731
    return version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)


def _failed(skipped: list[str], what: str, e: Exception) -> None:
    """Record an error of one method and go on (a benchmark reports, it does not abort); free what it held."""
    skipped.append(f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Case:
    """One benchmark case: layout, config, inputs and routing of one length and input kind."""

    def __init__(self, args, length: int, kind: str, device, dtype):
        self.args, self.kind, self.device = args, kind, device
        self.layout = make_layout(length, args.frame_tokens, args.shots)
        L = self.layout.num_tokens
        base = MoCConfig(top_k=1, local_window=args.local_window, causal=True, text_anchors="all")
        self.config = base.replace(top_k=top_k_for_density(self.layout, base, args.density))
        self.q, self.k, self.v = make_inputs(
            self.layout, args.frame_tokens, args.heads, args.head_dim, kind, dtype, device, seed=args.seed
        )
        self.grad = torch.randn_like(self.q)
        self.routing = route(self.q, self.k, self.layout, self.config)
        self.pairs = int(self.routing.attended_tokens().sum().item())
        self.common = dict(density=self.pairs / (args.heads * L * L), top_k=self.config.top_k,
                           chunks=self.layout.num_chunks)  # fmt: skip
        self.t_route = time_fn(lambda: route(self.q, self.k, self.layout, self.config), device, args.warmup, args.iters)
        self._mask_ms: dict[bool, float] = {}

    def mask_ms(self, compute_q_blocks: bool) -> float:
        """What building the flex block mask of this routing costs (timed once per case; with or without the
        transposed lists a backward needs)."""
        if compute_q_blocks not in self._mask_ms:
            build = lambda: flex_block_mask(self.routing, compute_q_blocks=compute_q_blocks)  # noqa: E731
            self._mask_ms[compute_q_blocks] = time_fn(build, self.device, self.args.warmup, self.args.iters)
        return self._mask_ms[compute_q_blocks]


def run_case(args, length, kind, device, dtype, skipped: list[str], guard=None) -> list[dict]:
    r"""
    Rows for one length and input kind. `guard(method, tokens, kind) -> bool`, when given, may skip a method (the
    GPU check's time budget). A method that raises is reported in `skipped`, and the others go on.
    """
    case = Case(args, length, kind, device, dtype)
    L, q, v = case.layout.num_tokens, case.q, case.v
    rows = []
    for backend in args.moc:  # MoC, every backend that runs here
        reason = moc_unavailable(backend, q, v)
        if reason is not None:
            skipped.append(f"moc-{backend}: {reason}; row skipped")
        elif guard is None or guard(f"moc-{backend}", L, kind):
            try:
                rows.extend(_triton_rows(case) if backend == "triton" else _moc_rows(backend, case))
            except Exception as e:  # noqa: BLE001
                _failed(skipped, f"moc-{backend} at {L} tokens ({kind} inputs)", e)
    # Dense SDPA: the fastest backend that runs (timed once per length: its speed does not depend on the values).
    cache = getattr(args, "dense_cache", None)
    if cache is not None and L in cache:
        rows.extend(dict(r, inputs=kind, timed_on=r["inputs"]) for r in cache[L])
    elif guard is None or guard("sdpa-dense", L, kind):
        dense = _dense_rows(args, case.q, case.k, case.v, case.grad, L, kind, skipped)
        rows.extend(dense)
        if cache is not None:
            cache[L] = dense
    if "flex" in args.peers:
        rows.extend(_flex_peer_rows(case, skipped, guard))
    if "vsa" in args.peers:
        rows.extend(_vsa_rows(case, skipped))
    return rows


def _flex_peer_rows(case: Case, skipped: list[str], guard) -> list[dict]:
    """FlexAttention's Triton kernels with the flex backend's block mask, its own autograd."""
    L, device, args = case.layout.num_tokens, case.device, case.args
    if device.type != "cuda":
        skipped.append("flex: compiled FlexAttention kernels with a backward need CUDA (row skipped)")
        return []
    if flex_backend.flex_unavailable() is not None or (guard is not None and not guard("flex", L, case.kind)):
        return []
    t_mask, t_mask_fwd = case.mask_ms(True), case.mask_ms(False)
    mask = flex_block_mask(case.routing)
    scale = 1.0 / math.sqrt(case.q.shape[-1])

    def flex_run(a, b, c, lse=False):  # the forward asks for the log-sum-exp, as the flex backend's forward does
        return flex_backend._flex(a, b, c, mask, scale, "TRITON", lse=lse)[0]

    rows = []
    for mode in ("fwd", "fwd+bwd"):
        run = (
            (lambda: flex_run(case.q, case.k, case.v, lse=True))
            if mode == "fwd"
            else fwd_bwd(flex_run, case.q, case.k, case.v, case.grad)
        )
        try:
            t = time_fn(run, device, args.warmup, args.iters)
            rows.append(
                _row("flex", L, case.kind, mode, t, case.pairs, case.q.shape[-1], block_mask_ms=t_mask,
                     block_mask_fwd_ms=t_mask_fwd, peak_mib=peak_mib(run, device), **case.common)
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001
            _failed(skipped, f"flex {mode} L={L}", e)
    return rows


def _vsa_rows(case: Case, skipped: list[str]) -> list[dict]:
    """Video Sparse Attention (fastvideo-kernel) at about the same density, with its own block routing."""
    if case.device.type != "cuda":
        skipped.append("vsa: fastvideo-kernel needs CUDA (row skipped)")
        return []
    try:
        vsa = vsa_runner(case.common["density"])
    except ImportError as e:
        skipped.append(f"vsa: fastvideo-kernel does not import ({e}); row skipped")
        return []
    rows, L = [], case.layout.num_tokens
    for mode in ("fwd", "fwd+bwd"):
        run = (lambda: vsa(case.q, case.k, case.v)) if mode == "fwd" else fwd_bwd(vsa, case.q, case.k, case.v,
                                                                                   case.grad)  # fmt: skip
        try:
            t = time_fn(run, case.device, case.args.warmup, case.args.iters)
            rows.append(_row("vsa", L, case.kind, mode, t, case.pairs, case.q.shape[-1],
                             peak_mib=peak_mib(run, case.device), **case.common))  # fmt: skip
        except Exception as e:  # noqa: BLE001
            _failed(skipped, f"vsa {mode} L={L}", e)
    return rows


def _dense_rows(args, q, k, v, grad, L, kind, skipped) -> list[dict]:
    from torch.nn.attention import SDPBackend

    device, D, warm, iters = q.device, q.shape[-1], args.warmup, args.iters
    candidates = (
        [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        if device.type == "cuda"
        else [SDPBackend.MATH]
    )
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        best = None
        for backend in candidates:
            fn = sdpa_runner(backend)
            run = (lambda fn=fn: fn(q, k, v)) if mode == "fwd" else fwd_bwd(fn, q, k, v, grad)
            try:
                t = time_fn(run, device, warm, iters)
            except RuntimeError as e:  # backend not available for this shape / device
                skipped.append(f"sdpa {backend.name} {mode} L={L}: {str(e).splitlines()[0][:100]}")
                continue
            if best is None or t < best[0]:
                best = (t, backend.name, run)
        if best is not None:
            rows.append(
                _row("sdpa-dense", L, kind, mode, best[0], q.shape[2] * L * L, D, backend=best[1],
                     peak_mib=peak_mib(best[2], device), density=1.0)
            )  # fmt: skip
    return rows


def _moc_functions(backend: str, case: Case):
    """`(with the routing given, routing included)`: MoC attention on one backend, as functions of `q, k, v`
    (`flex-triton`: the `flex_triton` backend)."""
    layout, cfg, routing = case.layout, case.config.replace(backend=backend.replace("-", "_")), case.routing
    return (
        lambda a, b, c: moc_attention(a, b, c, layout, cfg, routing=routing),
        lambda a, b, c: moc_attention(a, b, c, layout, cfg),
    )


def _flex_extras(backend: str, case: Case) -> dict:
    """The flex rows' kernels and what building the block mask costs (forward: without the transposed lists)."""
    if not backend.startswith("flex"):
        return {}
    kernels = "TRITON" if backend == "flex-triton" else flex_backend.flex_kernel_choice(case.q, case.v)[0]
    return {"kernels": kernels, "block_mask_fwd_ms": case.mask_ms(False)}


def _moc_rows(backend: str, case: Case) -> list[dict]:
    """Forward and forward+backward rows of one backend (`flash`, `flash_attn`, `flex`, `flex-triton`, `torch`)."""
    args, device, q, k, v, grad = case.args, case.device, case.q, case.k, case.v, case.grad
    moc, moc_routed = _moc_functions(backend, case)
    check = _check_against_torch(moc, q, k, v, grad, case.routing) if args.check and backend != "torch" else {}
    extras = _flex_extras(backend, case)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        run = (lambda: moc(q, k, v)) if mode == "fwd" else fwd_bwd(moc, q, k, v, grad)
        t_k = time_fn(run, device, args.warmup, args.iters)
        mem = peak_mib((lambda: moc_routed(q, k, v)) if mode == "fwd" else fwd_bwd(moc_routed, q, k, v, grad), device)
        total = case.t_route + t_k
        row = _row(f"moc-{backend}", case.layout.num_tokens, case.kind, mode, total, case.pairs, q.shape[-1],
                   route_ms=case.t_route, kernel_ms=t_k, routing_share=case.t_route / total, peak_mib=mem, **check,
                   **extras, **case.common)  # fmt: skip
        if "block_mask_fwd_ms" in extras and mode == "fwd":
            row["block_mask_share"] = extras["block_mask_fwd_ms"] / t_k
        if case.layout.num_tokens >= getattr(args, "profile_tokens", math.inf):
            row["profile"] = profile_cuda(run, device)
        rows.append(row)
    return rows


def profile_cuda(run: Callable[[], object], device, top: int = 8) -> dict | None:
    """One profiled run: device time per kernel name (the `top` largest), their sum, and the wall time, so that the
    time the GPU sits idle (host work, synchronisations, launches) shows as wall minus busy."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        _sync(device)
        wall = (time.perf_counter() - t0) * 1e3
    launched = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kernels: dict[str, float] = {}
    for e in launched:
        kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + e.device_time / 1e3
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])
    return {"wall_ms": wall, "device_busy_ms": sum(kernels.values()), "launches": len(launched),
            "top_kernels_ms": dict(ranked[:top])}  # fmt: skip


def _triton_rows(case: Case) -> list[dict]:
    """Triton rows: one row pair per routing granularity (`--route-by`)."""
    from diffusers_moc.core.kernels import triton_moc as tm  # noqa: PLC0415

    args, q, k, layout = case.args, case.q, case.k, case.layout
    rows = []
    for route_by in args.route_by:
        if route_by == "token":
            cfg, routing, pairs, t_route = case.config, case.routing, case.pairs, case.t_route
        else:  # the named approximation: tiles of `route_block` tokens share one selection
            cfg = case.config.replace(route_by="block", block_size=args.route_block)
            routing = route(q, k, layout, cfg)
            pairs = int(routing.attended_tokens().sum().item())
            t_route = time_fn(lambda cfg=cfg: route(q, k, layout, cfg), case.device, args.warmup, args.iters)
        common = dict(case.common, density=pairs / (q.shape[2] * layout.num_tokens**2), route_by=route_by)
        rows.extend(_moc_triton_rows(tm, case, cfg.replace(backend="triton"), routing, t_route, pairs, common))
    return rows


def _moc_triton_rows(tm, case: Case, config, routing, t_route, pairs, common) -> list[dict]:
    args, device, q, k, v, grad, layout = case.args, case.device, case.q, case.k, case.v, case.grad, case.layout
    warm, iters = args.warmup, args.iters
    tiles = tm._config(q.shape[-1], device, q.dtype)
    plan = tm.build_plan(routing, block_m=tiles.block_m)
    # Planning runs inside each call (timed with the kernels); timed apart too, to report routing's share.
    t_plan = time_fn(lambda: tm.build_plan(routing, block_m=tiles.block_m), device, warm, iters)
    t_transposed = time_fn(lambda: plan.transposed(tiles.block_n_kv, layout.offsets), device, warm, iters)

    def moc(a, b, c):
        return moc_attention(a, b, c, layout, config, routing=routing)

    def moc_routed(a, b, c):  # routing included, for peak memory
        return moc_attention(a, b, c, layout, config)

    runs = {"fwd": lambda: moc(q, k, v), "fwd+bwd": fwd_bwd(moc, q, k, v, grad)}
    times = {mode: time_fn(run, device, warm, iters) for mode, run in runs.items()}
    check = _check_against_torch(moc, q, k, v, grad, routing) if args.check else {}
    rows = []
    for mode, t_extra in (("fwd", 0.0), ("fwd+bwd", t_transposed)):
        total = t_route + times[mode]
        mem = peak_mib((lambda: moc_routed(q, k, v)) if mode == "fwd" else fwd_bwd(moc_routed, q, k, v, grad), device)
        row = _row("moc-triton", layout.num_tokens, case.kind, mode, total, pairs, q.shape[-1], block_m=plan.block_m,
                   route_ms=t_route, plan_ms=t_plan, kernel_ms=times[mode] - t_plan,
                   routing_share=(t_route + t_plan + t_extra) / total, overfetch=plan.overfetch(), peak_mib=mem,
                   **check, **common)  # fmt: skip
        if layout.num_tokens >= getattr(args, "profile_tokens", math.inf):
            row["profile"] = profile_cuda(runs[mode], device)
        rows.append(row)
    return rows


def _check_against_torch(moc, q, k, v, grad, routing) -> dict:
    """Largest absolute difference to the portable torch backend (output and gradients), for `--check`."""
    ref = [x.detach().requires_grad_(True) for x in (q, k, v)]
    got = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out_ref = moc_attention(*ref, routing.layout, MoCConfig(backend="torch"), routing=routing)
    out_ref.backward(grad)
    out = moc(*got)
    out.backward(grad)
    err = {"max_err_out": (out.float() - out_ref.float()).abs().max().item()}
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        err[f"max_err_{name}"] = (a.grad.float() - b.grad.float()).abs().max().item()
    return err


def add_speedups(rows: list[dict]) -> None:
    """`speedup_vs_dense` and `speedup_vs_flex` on every MoC row (same length, inputs and mode)."""
    index = {(r["method"], r["tokens"], r["inputs"], r["mode"]): r for r in rows}
    for r in rows:
        if not r["method"].startswith("moc") or r["ms"] is None:
            continue
        for peer, key in (("sdpa-dense", "speedup_vs_dense"), ("flex", "speedup_vs_flex")):
            other = index.get((peer, r["tokens"], r["inputs"], r["mode"]))
            if other is not None and other["ms"]:
                r[key] = other["ms"] / r["ms"]


COLUMNS = [
    ("method", "{}"),
    ("tokens", "{}"),
    ("inputs", "{}"),
    ("mode", "{}"),
    ("density", "{:.3f}"),
    ("ms", "{:.2f}"),
    ("tflops", "{:.1f}"),
    ("routing_share", "{:.1%}"),
    ("overfetch", "{:.2f}"),
    ("route_by", "{}"),
    ("block_m", "{}"),
    ("max_err_out", "{:.1e}"),
    ("speedup_vs_dense", "{:.2f}x"),
    ("speedup_vs_flex", "{:.2f}x"),
    ("peak_mib", "{:.0f}"),
    ("block_mask_share", "{:.1%}"),
    ("backend", "{}"),
    ("kernels", "{}"),
]


def format_table(rows: list[dict]) -> str:
    cells = [[name for name, _ in COLUMNS]]
    for r in rows:
        cells.append([fmt.format(r[name]) if r.get(name) is not None else "-" for name, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    device = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in result["device"]["name"])
    path = os.path.join(out_dir, f"bench_attention_{device}_{stamp}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", default="32k,90k,180k", help="sequence lengths, rounded to whole frames (e.g. 32k)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--frame-tokens", type=int, default=1560, help="tokens per latent frame (Wan 480p: 30 x 52)")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--density", type=float, default=0.15, help="target attended fraction; sets top_k")
    p.add_argument("--local-window", type=int, default=1)
    p.add_argument("--inputs", default="video,random", help="comma list of: video, random")
    p.add_argument("--peers", default="sdpa,flex,vsa", help="comma list of peers to run: sdpa, flex, vsa")
    p.add_argument("--moc", default="flash,flash_attn,flex,flex-triton,triton,torch",
                   help="comma list of MoC backends to run")  # fmt: skip
    p.add_argument("--route-by", default="token,block", help="MoC routing granularities to run: token, block")
    p.add_argument("--route-block", type=int, default=128, help="query block size for --route-by block")
    p.add_argument("--check", action="store_true", help="also compare MoC outputs and gradients to backend='torch'")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=RESULTS_DIR, help="folder for the JSON results")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 iteration: a smoke run (CPU is fine)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        # 8 frames of 16 tokens in 2 shots; no local window so that top_k routing has something to choose.
        args.lengths, args.frame_tokens, args.shots, args.local_window, args.density = "128", 16, 2, 0, 0.25
        args.heads, args.head_dim, args.warmup, args.iters = 2, 32, 0, 1
        if device.type == "cpu":
            args.dtype = "fp32"
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    args.moc = [m.strip() for m in args.moc.split(",") if m.strip()]
    args.route_by = [x.strip() for x in args.route_by.split(",") if x.strip()]
    for route_by in args.route_by:
        if route_by not in ("token", "block"):
            raise SystemExit(f"--route-by: unknown granularity {route_by!r}; choose from token, block")
    if args.quick and device.type == "cpu":
        args.route_block = 16  # the interpreter's tile size
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    kinds = [x.strip() for x in args.inputs.split(",") if x.strip()]
    for kind in kinds:
        if kind not in ("video", "random"):
            raise SystemExit(f"--inputs: unknown input kind {kind!r}; choose from video, random")

    skipped: list[str] = []
    if device.type != "cuda":
        skipped.append("no CUDA device: GPU-only rows are skipped and CPU timings say nothing about GPU speed")
    rows = []
    for length in lengths:
        for kind in kinds:
            rows.extend(run_case(args, length, kind, device, dtype, skipped))
    add_speedups(rows)
    skipped = list(dict.fromkeys(skipped))  # each reason once

    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "device": {
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}",
            "type": device.type,
        },
        "versions": {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()},
        "settings": {
            "lengths": lengths,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "dtype": str(dtype).replace("torch.", ""),
            "frame_tokens": args.frame_tokens,
            "shots": args.shots,
            "density_target": args.density,
            "local_window": args.local_window,
            "inputs": kinds,
            "warmup": args.warmup,
            "iters": args.iters,
            "quick": args.quick,
            "route_by": args.route_by,
            "route_block": args.route_block,
            "moc_config": {"local_window": args.local_window, "causal": True, "route_by": "token"},
        },
        "rows": rows,
        "skipped": skipped,
    }
    print(f"device: {result['device']['name']}  torch {torch.__version__}  triton {triton_version}")
    print(format_table(rows))
    for line in skipped:
        print(f"skipped: {line}")
    path = write_json(result, args.out)
    print(f"wrote {path}")
    result["path"] = path
    return result


if __name__ == "__main__":
    main()
