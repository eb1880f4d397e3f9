r"""Memory per GPU and FLOPs per step of Wan 2.1 T2V 1.3B, Wan 2.2 T2V-A14B and Wan 2.2 TI2V-5B with MoC, at 32k-360k
tokens on 1-8 GPUs: inference, and LoRA training with and without gradient checkpointing. A plan on paper.

The memory is not a hand formula: the real code (diffusers' `WanTransformer3DModel` at the released configs, MoC's
processors, PEFT's LoRA, autograd, gradient checkpointing) runs on fake tensors (`fake_memory.py`), which tracks the
size and lifetime of every tensor it creates. Parameter counts come from the same models. MoC's attended density
comes from the library's routing on a multi-shot layout. Where an H200 measured the same quantity
(`benchmarks/results/gpu_NVIDIA_H200_run*.json`), the table takes the measurement and marks it; the model's error
against every measurement is listed too. The assumptions are printed with the tables.

Prints the tables and writes `benchmarks/results/scale_plan.json` and `.md`.

    python benchmarks/scale_plan.py                   # 3 models x 4 lengths, about 5 minutes on 2 CPU cores
    python benchmarks/scale_plan.py --models wan2.1-t2v-1.3b --tokens 32k 180k --gpus 1 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

try:  # run from a checkout without installing
    import diffusers_moc  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import diffusers

from diffusers_moc import ChunkLayout, MoCConfig, apply_moc, moc_context, route
from diffusers_moc.core.atomic import write_text_atomic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import split_shots  # noqa: E402
from fake_memory import FAKE, LiveMemory, attention_region, to_fake  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
TEXT_TOKENS = 512  # Wan pads every caption to 512 umt5 tokens
TEXT_DIM = 4096
#: nvidia-smi's totals: H100 80 GB (81,559 MiB) and H200 141 GB (143,771 MiB).
GPU_GIB = {"H100": 79.6, "H200": 140.4}
#: Share of a GPU's memory the plan fills at most: the rest for the CUDA context, kernels' workspaces, the allocator's
#: fragmentation and communication buffers, which the model does not count.
FILL = 0.9
#: LoRA as `diffusers-moc train` sets it up by default (training/config.py).
LORA_RANK = 32
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: FlashAttention's backward runs 5 matrix products to the forward's 2.
ATTENTION_BACKWARD = 2.5
_WAN = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=TEXT_DIM, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """A released Wan model: its transformer config (as in its `transformer/config.json`) and the video it makes."""

    name: str
    title: str
    repo_id: str
    config: dict
    height: int
    width: int
    fps: int
    vae_spatial: int  # the VAE's compression in space (x8 for Wan 2.1's VAE, x16 for Wan 2.2's 48-channel one)
    vae_temporal: int = 4
    experts: int = 1  # Wan 2.2 A14B: two transformers of one config, one active per denoising step
    per_token_timesteps: bool = False  # TI2V-5B (`expand_timesteps`): a timestep, hence a modulation, per token

    @property
    def tokens_per_frame(self) -> int:
        p = self.config["patch_size"]
        return (self.height // self.vae_spatial // p[1]) * (self.width // self.vae_spatial // p[2])

    @property
    def heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def dim(self) -> int:
        return self.config["num_attention_heads"] * self.config["attention_head_dim"]


MODELS = {
    m.name: m
    for m in (
        ModelSpec(
            "wan2.1-t2v-1.3b", "Wan 2.1 T2V 1.3B", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            dict(_WAN, num_attention_heads=12, ffn_dim=8960, num_layers=30), 480, 832, 16, 8,
        ),
        ModelSpec(
            "wan2.2-t2v-a14b", "Wan 2.2 T2V-A14B", "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
            dict(_WAN, num_attention_heads=40, ffn_dim=13824, num_layers=40), 720, 1280, 16, 8, experts=2,
        ),
        ModelSpec(
            "wan2.2-ti2v-5b", "Wan 2.2 TI2V-5B", "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            dict(_WAN, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
            704, 1280, 24, 16, per_token_timesteps=True,
        ),
    )
}  # fmt: skip

#: Modes: what runs, and what each GPU holds. `offload`: A14B with the idle expert on the CPU.
MODES = {
    "inference": "inference",
    "inference_offload": "inference, idle expert on the CPU",
    "lora": "LoRA training, no checkpointing",
    "lora_ckpt": "LoRA training, gradient checkpointing",
}


def parse_tokens(text: str) -> int:
    """`32k`, `180k`, `90000` -> tokens."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kK]?)", text.strip())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"token counts look like 32k or 90000, got {text!r}")
    return int(float(m.group(1)) * (1000 if m.group(2) else 1))


# ---------------------------------------------------------------------------------------------- models on fake tensors
def build(spec: ModelSpec, layers: int, lora: bool, all_bf16: bool = False) -> torch.nn.Module:
    r"""The transformer with `layers` blocks on fake tensors, cast as `from_pretrained(torch_dtype=torch.bfloat16)`
    casts (diffusers' `_keep_in_fp32_modules` stay float32, unless `all_bf16`); with `lora`, the LoRA adapter of
    `diffusers-moc train` (float32) and the base frozen."""
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

    with torch.device("meta"):
        model = WanTransformer3DModel(**dict(spec.config, num_layers=layers))
    model.requires_grad_(False)
    keep = set(model._keep_in_fp32_modules or ())
    fp32 = {id(m) for name, m in model.named_modules() if not all_bf16 and any(p in keep for p in name.split("."))}
    if lora:
        from peft import LoraConfig  # noqa: PLC0415

        model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS))
    to_fake(model, lambda m, p: torch.float32 if p.requires_grad or id(m) in fp32 else torch.bfloat16)
    return model


def parameter_facts(spec: ModelSpec) -> dict:
    """Exact counts and bytes of one transformer (one expert), from the model itself: the whole model on the meta
    device, the LoRA adapter (on the blocks only) from a one-block model."""
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

    with torch.device("meta"):
        model = WanTransformer3DModel(**spec.config)
    keep = set(model._keep_in_fp32_modules or ())
    nbytes = {
        name: sum(p.numel() * (4 if any(k in keep for k in name.split(".")) else 2) for p in m.parameters(False))
        for name, m in model.named_modules()
    }
    one_block = build(spec, 1, lora=True)
    lora = sum(p.numel() for p in one_block.parameters() if p.requires_grad)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(nbytes.values()),
        "block_weight_bytes": sum(v for k, v in nbytes.items() if k == "blocks.0" or k.startswith("blocks.0.")),
        "lora_parameters": lora * spec.config["num_layers"],
    }


def moc_config(args) -> MoCConfig:
    return MoCConfig(top_k=args.top_k, anchor_own_shot=args.anchor_own_shot, backend="torch")


def moc_density(frames: int, shots: list[int], config: MoCConfig) -> float:
    """The attended fraction of the query-key pairs, from the library's routing. With one chunk per frame (all chunks
    of a size) it does not depend on the frame's size, so the layout routes one token per frame; random keys leave no
    ties, so every query takes `top_k` of its candidates, as on real inputs."""
    layout = ChunkLayout.for_video(frames, 1, shots)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, frames, 1, 8, generator=g) for _ in range(2))
    return route(q, k, layout, config).density()


@dataclass
class Run:
    """One simulated forward (inference) or training step of a transformer."""

    spec: ModelSpec
    frames: int
    mode: str  # "inference", "lora" or "lora_ckpt"
    moc: MoCConfig | None  # None: dense attention
    shots: list[int] = field(default_factory=list)
    text_tokens: int = TEXT_TOKENS
    caption_spans: list | None = None  # per-shot captions (LongVideoPipeline's conditional pass)
    all_bf16: bool = False
    passes: int = 1  # inference forwards in a row (the long-video check runs conditional and unconditional)


def _inputs(run: Run, text_tokens: int) -> tuple:
    h, w = run.spec.height // run.spec.vae_spatial, run.spec.width // run.spec.vae_spatial
    latents = torch.empty(1, run.spec.config["in_channels"], run.frames, h, w, dtype=torch.bfloat16)
    text = torch.empty(1, text_tokens, TEXT_DIM, dtype=torch.bfloat16)
    tokens = run.frames * run.spec.tokens_per_frame
    timestep = torch.full((1, tokens) if run.spec.per_token_timesteps else (1,), 500, dtype=torch.long)
    return latents, timestep, text


def simulate(run: Run, layers: int) -> dict:
    """Peak bytes (beyond weights, gradients and optimizer state), the attention's bytes at that peak, and matmul
    FLOPs of `run` with `layers` blocks."""
    model = build(run.spec, layers, lora=run.mode != "inference", all_bf16=run.all_bf16)
    with FAKE:
        if run.moc is not None:
            apply_moc(model, run.moc)
        model.train(run.mode != "inference")
        if run.mode == "lora_ckpt":
            model.enable_gradient_checkpointing()
        for p in model.parameters():  # gradients exist from the first step on: not part of the step's peak
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        texts = [run.text_tokens] + [TEXT_TOKENS] * (run.passes - 1)
        inputs = [_inputs(run, t) for t in texts]
    existing = [*model.parameters(), *model.buffers(), *[p.grad for p in model.parameters() if p.grad is not None]]
    tracker = LiveMemory(existing + [t for i in inputs for t in i])
    spans = dict(caption_spans=run.caption_spans, global_caption_span=(0, TEXT_TOKENS)) if run.caption_spans else {}
    with FAKE, tracker, attention_region(tracker):
        outputs = []
        for i, (latents, timestep, text) in enumerate(inputs):
            with moc_context(shot_frames=run.shots or None, **(spans if i == 0 else {})):
                if run.mode == "inference":
                    with torch.no_grad():
                        outputs.append(model(latents, timestep, text, return_dict=False)[0])
                    continue
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(latents, timestep, text, return_dict=False)[0]
                (out.float() - latents.float()).pow(2).mean().backward()
        del outputs
    return {
        "peak": tracker.peak,
        "attention": tracker.at_peak["attention"],
        "matmul_flops": tracker.flops["activation"],
        "routing_flops": tracker.flops["attention"],
        "input_bytes": sum(t.numel() * t.element_size() for i in inputs for t in i),
    }


_CACHE: dict = {}


def simulate_full_depth(run: Run) -> dict:
    """`simulate` at the model's depth, from 2 and 3 blocks: the blocks are identical, so every figure is affine in
    the depth from 2 blocks on (checkpointing's peak is one block's recomputation plus every block's input)."""
    key = repr(run)
    if key not in _CACHE:
        simulate(run, 1)  # MoC caches small per-layout tensors on first use: both runs below find them made
        two, three = simulate(run, 2), simulate(run, 3)
        n = run.spec.config["num_layers"]
        _CACHE[key] = {k: two[k] + (n - 2) * (three[k] - two[k]) for k in two}
    return _CACHE[key]


# ---------------------------------------------------------------------------------------------- the plan
def ulysses_blocker(spec: ModelSpec, tokens: int, gpus: int) -> str | None:
    """Why Ulysses context parallelism cannot split this over `gpus`, or None."""
    if spec.heads % gpus:
        fit = ", ".join(str(n) for n in range(2, spec.heads + 1) if spec.heads % n == 0 and n <= 16)
        return f"{spec.heads} heads do not split over {gpus} GPUs (Ulysses splits the heads; {fit} GPUs would)"
    if tokens % gpus:
        return f"{tokens} tokens do not split over {gpus} GPUs"
    return None


def state_bytes(spec: ModelSpec, facts: dict, mode: str, gpus: int) -> float:
    """Per GPU: weights (inference, replicated), or weights, LoRA weights, gradients and AdamW moments (training,
    sharded by FSDP over the GPUs, plus two blocks' gathered weights: the one running and the one prefetched)."""
    if mode.startswith("inference"):
        return facts["weight_bytes"] * (1 if mode == "inference_offload" else spec.experts)
    per_expert = facts["weight_bytes"] + facts["lora_parameters"] * (4 + 4 + 8)
    sharded = spec.experts * per_expert / gpus
    return sharded + (2 * facts["block_weight_bytes"] if gpus > 1 else 0)


def modes_of(spec: ModelSpec, runs: list[str]) -> list[str]:
    """The table's columns for `spec` when `runs` (of "inference", "lora", "lora_ckpt") are simulated."""
    return [m for m in MODES if _run_of(m) in runs and (m != "inference_offload" or spec.experts > 1)]


def _run_of(mode: str) -> str:
    return mode.removesuffix("_offload")


def kernel_flops(spec: ModelSpec, tokens: int, density: float) -> float:
    """One forward of every attention kernel: self-attention over the attended pairs, cross-attention to the
    caption (two matrix products of 2 FLOPs per multiply-add each)."""
    layers, dim = spec.config["num_layers"], spec.dim
    return 4 * tokens * dim * layers * (tokens * density + TEXT_TOKENS)


#: Passes of the attention kernels per step, in forwards: training adds the backward (and, checkpointed, a forward).
KERNEL_PASSES = {"inference": 1, "lora": 1 + ATTENTION_BACKWARD, "lora_ckpt": 2 + ATTENTION_BACKWARD}


def flops(spec: ModelSpec, tokens: int, density: float, sims: dict) -> dict:
    """Per step, all GPUs together: matmuls as counted on the fake run, attention kernels from the attended pairs.
    Inference: one denoising step, conditional and unconditional forward. Training: forward and backward (and the
    checkpointed forward recomputed)."""
    out = {"self_attention_dense_forward": kernel_flops(spec, tokens, 1.0) - kernel_flops(spec, tokens, 0.0)}
    for (run, attn), sim in sims.items():
        kernels = KERNEL_PASSES[run] * kernel_flops(spec, tokens, 1.0 if attn == "dense" else density)
        out[f"{run}_{attn}"] = sim["matmul_flops"] + sim["routing_flops"] + kernels
        if run == "inference":
            out[f"forward_{attn}"] = out[f"{run}_{attn}"]
            out[f"{run}_{attn}"] *= 2  # classifier-free guidance
    return out


def length_rows(spec: ModelSpec, facts: dict, target: int, args) -> tuple[dict, list[dict]]:
    """The FLOPs row and the memory rows (every GPU count and mode) of one model at one length."""
    frames = max(1, round(target / spec.tokens_per_frame))
    tokens = frames * spec.tokens_per_frame
    shots = split_shots(frames, args.shots)
    config = moc_config(args)
    density = moc_density(frames, shots, config)
    sims = {
        (run, attn): simulate_full_depth(Run(spec, frames, run, config if attn == "moc" else None, shots))
        for run in args.modes
        for attn in ("dense", "moc")
    }
    pixel_frames = (frames - 1) * spec.vae_temporal + 1
    video = dict(tokens=tokens, frames=frames, pixel_frames=pixel_frames, seconds=round(pixel_frames / spec.fps, 1))
    flop_row = dict(model=spec.name, target=target, **video, shots=shots, moc_density=density)
    flop_row.update(flops(spec, tokens, density, sims))
    rows = []
    for gpus in args.gpus:
        blocker = ulysses_blocker(spec, tokens, gpus)
        for mode in modes_of(spec, args.modes):
            row = dict(model=spec.name, target=target, tokens=tokens, gpus=gpus, mode=mode, possible=blocker is None)
            if blocker:
                rows.append({**row, "why_not": blocker})
                continue
            moc, dense = sims[_run_of(mode), "moc"], sims[_run_of(mode), "dense"]
            row.update(
                state_gib=state_bytes(spec, facts, mode, gpus) / GIB,
                activation_gib=moc["peak"] / gpus / GIB,
                attention_gib=moc["attention"] / gpus / GIB,
                dense_activation_gib=dense["peak"] / gpus / GIB,
                source="model",
            )
            rows.append(row)
    return flop_row, rows


def finish(row: dict) -> dict:
    if row["possible"]:
        row["total_gib"] = row["state_gib"] + row["activation_gib"]
        row["dense_total_gib"] = row["state_gib"] + row["dense_activation_gib"]
    return row


def fewest_gpus(memory: list[dict], gpus: list[int]) -> list[dict]:
    """Per model, mode and length: the fewest GPUs (of those planned) on which the plan fits, per GPU kind."""
    out = []
    keys = dict.fromkeys((r["model"], r["mode"], r["target"], r["tokens"]) for r in memory)
    for model, mode, target, tokens in keys:
        rows = [r for r in memory if (r["model"], r["mode"], r["tokens"]) == (model, mode, tokens) and r["possible"]]
        row = {"model": model, "mode": mode, "target": target, "tokens": tokens}
        for kind, gib in GPU_GIB.items():
            fit = [r["gpus"] for r in rows if r["total_gib"] <= FILL * gib]
            row[kind] = min(fit) if fit else None
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- measurements
def measurements(folder: Path) -> list[dict]:
    """What the GPU runs measured of the same quantities, on a Wan 2.1 1.3B-config transformer with random weights:
    the peak of one forward above the weights (`gpu_check.py`), and the peak of `LongVideoPipeline`'s denoising step
    (`long_video_memory.py`, weights included)."""
    out = []
    for path in sorted(folder.glob("gpu_*_run*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("smoke"):
            continue
        for r in data.get("transformer") or []:
            if r.get("peak_mib") is not None:
                out.append({"kind": "transformer forward", "file": path.name, "device": data["environment"]["device"],
                            **{k: r[k] for k in ("tokens", "shots", "top_k", "backend", "s")},
                            "measured_gib": r["peak_mib"] / 1024})  # fmt: skip
    for path in sorted(folder.glob("long_video_memory_*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["args"]["model"] != "1.3b" or data["args"]["layers"] is not None:
            continue
        for r in data["rows"]:
            if r["tokens"] is not None and r["peak_gib"] is not None:
                out.append({"kind": "long-video denoising step", "file": path.name, "device": data["device"],
                            "tokens": r["tokens"], "args": data["args"], "moc_config": data["moc_config"],
                            "measured_gib": r["peak_gib"]})  # fmt: skip
    return out


def model_of_measurement(m: dict, spec: ModelSpec, facts: dict) -> dict:
    """The plan's model of one measurement, run as the measuring script ran it."""
    if m["kind"] == "transformer forward":
        frames = m["tokens"] // spec.tokens_per_frame
        moc = None if m["backend"] == "dense" else MoCConfig(top_k=m["top_k"], local_window=1, backend="torch")
        sim = simulate_full_depth(Run(spec, frames, "inference", moc, list(m["shots"])))
        density = 1.0 if moc is None else moc_density(frames, list(m["shots"]), moc)
        forward = sim["matmul_flops"] + sim["routing_flops"] + kernel_flops(spec, m["tokens"], density)
        return {"modelled_gib": sim["peak"] / GIB, "implied_tflop_per_s": forward / m["s"] / 1e12}
    a = m["args"]
    frames_per_shot = (a["frames"] - 1) // 4 + 1
    spans = [((s + 1) * TEXT_TOKENS, (s + 2) * TEXT_TOKENS) for s in range(a["shots"])]
    moc = MoCConfig.from_dict({**m["moc_config"], "backend": "torch"})
    run = Run(spec, a["shots"] * frames_per_shot, "inference", moc, [frames_per_shot] * a["shots"],
              text_tokens=(a["shots"] + 1) * TEXT_TOKENS, caption_spans=spans, all_bf16=True, passes=2)  # fmt: skip
    sim = simulate_full_depth(run)
    # That script casts every weight to bfloat16 and counts its inputs.
    return {"modelled_gib": (sim["peak"] + sim["input_bytes"] + 2 * facts["parameters"]) / GIB}


def use_measurements(memory: list[dict], measured: list[dict]) -> None:
    """Where a GPU measured a plan's figure (one GPU, inference, Wan 2.1 1.3B), the plan takes the measurement."""
    for row in memory:
        if (row["model"], row["mode"], row["gpus"], row["possible"]) != ("wan2.1-t2v-1.3b", "inference", 1, True):
            continue
        same = [m for m in measured if m["kind"] == "transformer forward" and m["tokens"] == row["tokens"]]
        moc = [m for m in same if m["backend"] != "dense"]
        dense = [m for m in same if m["backend"] == "dense"]
        if moc:
            worst = max(moc, key=lambda m: m["measured_gib"])
            row["activation_gib"] = worst["measured_gib"]
            row["source"] = (
                f"measured on an {worst['device']}: {worst['file']}, forward with MoC (top_k {worst['top_k']}, "
                f"backend {worst['backend']}; the largest of {len(moc)})"
            )
        if dense:
            row["dense_activation_gib"] = max(m["measured_gib"] for m in dense)


def plan(args) -> dict:
    specs = [MODELS[name] for name in args.models]
    facts = {spec.name: parameter_facts(spec) for spec in specs}
    flop_rows, memory = [], []
    for spec in specs:
        for target in args.tokens:
            print(f"  {spec.title}: {target:,} tokens", flush=True)
            flop_row, rows = length_rows(spec, facts[spec.name], target, args)
            flop_rows.append(flop_row)
            memory += rows
    checks = []
    if "wan2.1-t2v-1.3b" in args.models and args.measurements:
        spec = MODELS["wan2.1-t2v-1.3b"]
        measured = measurements(Path(args.measurements))
        for m in measured:
            modelled = model_of_measurement(m, spec, facts[spec.name])
            checks.append({**m, **modelled, "model_over_measured": modelled["modelled_gib"] / m["measured_gib"]})
        use_measurements(memory, measured)
    memory = [finish(r) for r in memory]
    models = {
        s.name: {"title": s.title, "repo_id": s.repo_id, "config": s.config, "tokens_per_frame": s.tokens_per_frame,
                 "resolution": f"{s.width}x{s.height}", "fps": s.fps, "experts": s.experts, **facts[s.name]}
        for s in specs
    }  # fmt: skip
    return {
        "benchmark": "scale_plan",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "settings": {"gpus": args.gpus, "modes": args.modes, "moc": moc_config(args).to_dict(), "shots": args.shots,
                     "lora_rank": LORA_RANK, "lora_targets": LORA_TARGETS, "gpu_gib": GPU_GIB, "fill": FILL},
        "assumptions": assumptions(args),
        "models": models,
        "memory": memory,
        "flops": flop_rows,
        "fewest_gpus": fewest_gpus(memory, args.gpus),
        "measurements": checks,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- output
def assumptions(args) -> list[str]:
    moc = moc_config(args)
    return [
        "The transformer alone, batch 1. The text encoder (umt5-xxl, about 10.6 GiB in bfloat16) and the VAE run "
        "before and after denoising and are offloaded or freed; training reads cached latents and caption "
        "embeddings (`data.cache: true`).",
        "Weights in bfloat16, diffusers' `_keep_in_fp32_modules` (time embedder, norms, modulation tables) in float32, "
        "as `from_pretrained(torch_dtype=torch.bfloat16)` loads them. Wan 2.2 A14B holds both experts (each step runs "
        "one), except in the column with the idle expert on the CPU (`enable_model_cpu_offload` moves it in once, "
        "at the expert boundary).",
        "Memory is modelled by running the real code (diffusers' `WanTransformer3DModel` at the released config, "
        "MoC's processors, PEFT's LoRA, autograd, gradient checkpointing) on fake tensors, which follows the size and "
        "lifetime of every tensor it creates (`benchmarks/fake_memory.py`); the depth is extrapolated from 2 and 3 "
        "blocks, exactly, since the blocks are identical. Not modelled: kernels' workspaces (cuDNN, Triton plans), "
        "the allocator's fragmentation, the CUDA context; a plan fits when it fills at most "
        f"{FILL:.0%} of the GPU ({', '.join(f'{k} {v} GiB' for k, v in GPU_GIB.items())}).",
        "Activations: all a forward (inference) or a training step holds at its peak besides weights, gradients and "
        "optimizer state. Without checkpointing, training keeps what every block saves for backward; with it, each "
        "block's input plus one block's saved tensors while it is recomputed. Attention (part of the activations): "
        "what the self-attention call creates and is live at the peak (the kernel's output and log-sum-exp, MoC's "
        "routing, and in training the routed chunk ids saved for backward); its query, key and value count as "
        "activations.",
        "Inference: one denoising step runs the conditional and the unconditional forward one after the other (as "
        "diffusers' Wan pipelines do): the peak of one forward, the FLOPs of two.",
        f"LoRA training as `diffusers-moc train` runs it: rank {LORA_RANK} on {', '.join(LORA_TARGETS)} of both "
        "attentions of every block, LoRA weights, gradients and AdamW moments in float32, bfloat16 autocast, the "
        "base frozen; MoC's training routing (context drop-off and drop-in); Wan 2.2 A14B with `model.expert: both` "
        "(both experts and both adapters held, each step trains one).",
        "N GPUs: Ulysses context parallelism of degree N. Each GPU holds 1/N of the tokens outside attention and 1/N "
        "of the heads inside it: activations, attention and FLOPs divide by N; heads and tokens must divide by N. "
        "Inference replicates the weights. Training shards frozen weights, LoRA weights, gradients and optimizer "
        "state with FSDP over the same N GPUs, plus two blocks' gathered bfloat16 weights (the running and the "
        "prefetched one). The all-to-all's buffers are not counted. `diffusers-moc train` itself runs data "
        "parallel (every GPU a whole sample: the 1-GPU figures per GPU); context-parallel training is a plan here.",
        f"MoC: `MoCConfig(top_k={moc.top_k}, anchor_own_shot={moc.anchor_own_shot})`, causal routing, one chunk per "
        f"latent frame, {args.shots} shots of equal length (the paper's multi-shot setting); the attended density "
        "is the library's routing on that layout.",
        "FLOPs per step, all GPUs together: matrix products and convolutions counted on the fake run (projections, "
        "feed-forward, embeddings, LoRA, MoC's routing scores, backward, checkpointed recomputation); attention "
        "kernels from the attended pairs: 4 L^2 H D x density per block forward for self-attention, 4 L 512 H D "
        f"for cross-attention, backward {ATTENTION_BACKWARD}x the forward (FlashAttention's count).",
        "Measured: where an H200 measured a figure of the table (a Wan 2.1 1.3B forward on one GPU, "
        "`benchmarks/results/gpu_NVIDIA_H200_run*.json`), the table shows the measurement, with MoC at that run's "
        "`top_k`. The last table compares the model with every measurement.",
    ]


def _md(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _video(row: dict) -> str:
    return f"{row['tokens']:,} ({row['pixel_frames']} frames, {row['seconds']} s)"


def _memory_cell(row: dict, first: bool) -> str:
    if not row["possible"]:
        return f"no: {row['why_not']}" if first else "no"
    measured = ", activations measured" if row["source"] != "model" else ""
    return (f"{row['state_gib']:.1f} + {row['activation_gib']:.1f} ({row['attention_gib']:.2f}) = "
            f"**{row['total_gib']:.1f}**{measured}")  # fmt: skip


def memory_table(spec: ModelSpec, result: dict) -> str:
    flop_rows = {r["tokens"]: r for r in result["flops"] if r["model"] == spec.name}
    rows = [r for r in result["memory"] if r["model"] == spec.name]
    modes = modes_of(spec, result["settings"]["modes"])
    lines = []
    for tokens, video in flop_rows.items():
        for gpus in result["settings"]["gpus"]:
            cells = {r["mode"]: r for r in rows if r["tokens"] == tokens and r["gpus"] == gpus}
            lines.append([_video(video), gpus] + [_memory_cell(cells[m], i == 0) for i, m in enumerate(modes)])
    return _md(["tokens (video)", "GPUs"] + [MODES[m] for m in modes], lines)


def _pflop(row: dict, key: str) -> str:
    dense, moc = row[f"{key}_dense"], row[f"{key}_moc"]
    return f"{dense / 1e15:.3g} / {moc / 1e15:.3g} ({dense / moc:.2f}x)"


def _share(row: dict) -> str:
    return f"{row['self_attention_dense_forward'] / row['forward_dense']:.0%}" if "forward_dense" in row else "-"


def flops_table(result: dict) -> str:
    runs = result["settings"]["modes"]
    steps = (["forward"] if "inference" in runs else []) + [k for k in KERNEL_PASSES if k in runs]
    lines = [
        [MODELS[r["model"]].title, _video(r), f"{r['moc_density']:.1%}", _share(r)] + [_pflop(r, k) for k in steps]
        for r in result["flops"]
    ]
    names = {
        "forward": "forward",
        "inference": "inference step (2 forwards)",
        "lora": "LoRA training step, no checkpointing",
        "lora_ckpt": "LoRA training step, checkpointing",
    }
    header = ["model", "tokens (video)", "MoC density", "self-attention share of a dense forward"]
    return _md(header + [names[k] for k in steps], lines)


def fit_table(result: dict) -> str:
    targets = list(dict.fromkeys(r["target"] for r in result["fewest_gpus"]))
    lines = []
    for model in result["models"]:
        for mode in modes_of(MODELS[model], result["settings"]["modes"]):
            cells = {r["target"]: r for r in result["fewest_gpus"] if (r["model"], r["mode"]) == (model, mode)}
            lines.append([MODELS[model].title, MODES[mode]]
                         + [" / ".join(str(cells[t][k] or "-") for k in GPU_GIB) for t in targets])  # fmt: skip
    return _md(["model", "setup"] + [f"{t // 1000}k tokens" for t in targets], lines)


def measurement_table(result: dict) -> str:
    lines = []
    for m in result["measurements"]:
        if m["kind"] == "transformer forward":
            what = f"{m['kind']}, {m['backend']}" + (f" top_k {m['top_k']}" if m["backend"] != "dense" else "")
        else:
            what = f"{m['kind']} (MoC top_k {m['moc_config']['top_k']})"
        rate = f"{m['implied_tflop_per_s']:.0f}" if "implied_tflop_per_s" in m else "-"
        lines.append([what, f"{m['tokens']:,}", m["file"], f"{m['measured_gib']:.2f}", f"{m['modelled_gib']:.2f}",
                      f"{m['model_over_measured']:.3f}", rate])  # fmt: skip
    header = ["measured", "tokens", "file", "measured GiB", "model GiB", "model / measured",
              "TFLOP/s implied by the modelled FLOPs"]  # fmt: skip
    return _md(header, lines)


def _model_line(spec: ModelSpec, facts: dict) -> str:
    c = spec.config
    experts = f" (x{spec.experts} experts)" if spec.experts > 1 else ""
    return (
        f"`{spec.repo_id}`: {c['num_layers']} blocks, {c['num_attention_heads']} heads of {c['attention_head_dim']}, "
        f"feed-forward {c['ffn_dim']}, {c['in_channels']} latent channels; {facts['parameters'] / 1e9:.2f}B "
        f"parameters per transformer{experts}, {facts['lora_parameters'] / 1e6:.1f}M LoRA parameters; "
        f"{facts['resolution']} at {facts['fps']} fps, {facts['tokens_per_frame']} tokens per latent frame."
    )


def markdown(result: dict) -> str:
    gpus = ", ".join(map(str, result["settings"]["gpus"]))
    out = [
        "# Scale plan: memory per GPU and FLOPs per step",
        "",
        f"Generated by `python benchmarks/scale_plan.py` ({result['date']}, torch {result['torch']}, diffusers "
        f"{result['diffusers']}). A model on paper, not a run on GPUs, except where a cell says measured.",
        "",
        "## Assumptions",
        "",
        *[f"- {a}" for a in result["assumptions"]],
        "",
        "## Memory per GPU",
        "",
        "Each cell: weights (inference) or weights and training state (LoRA) + activations (of which attention) = "
        "**total**, GiB per GPU.",
    ]
    for name, facts in result["models"].items():
        spec = MODELS[name]
        out += ["", f"### {spec.title}", "", _model_line(spec, facts), "", memory_table(spec, result)]
    out += [
        "",
        "## FLOPs per step",
        "",
        "PFLOP, dense / MoC (dense over MoC), all GPUs together; per GPU, divide by the GPUs.",
        "",
        flops_table(result),
        "",
        "## Fewest GPUs that fit",
        "",
        f"Of {gpus} GPUs, the fewest on which the plan fills at most {FILL:.0%} of each GPU: H100 80 GB / H200 141 "
        "GB; `-`: none of them.",
        "",
        fit_table(result),
    ]
    if result["measurements"]:
        out += ["", "## The model against the measurements", "", measurement_table(result)]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=parse_tokens, default=[32_000, 90_000, 180_000, 360_000],
                   help="sequence lengths (whole latent frames nearest to them): 32k 90k 180k 360k")  # fmt: skip
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--modes", nargs="+", choices=list(KERNEL_PASSES), default=list(KERNEL_PASSES),
                   help="inference; LoRA training without and with gradient checkpointing")  # fmt: skip
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--anchor-own-shot", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--measurements", default=str(RESULTS), help="folder of GPU results to use ('' for none)")
    p.add_argument("--out", default=str(RESULTS))
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("gpus", "shots", "top_k"):
        values = getattr(args, name) if isinstance(getattr(args, name), list) else [getattr(args, name)]
        if any(v < 1 for v in values):
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.measurements and not os.path.isdir(args.measurements):
        parser.error(f"--measurements: {args.measurements} is not a folder")
    try:  # before the work, not after it
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot create {args.out}: {e.strerror}")
    args.gpus = sorted(set(args.gpus))
    args.modes = [m for m in KERNEL_PASSES if m in args.modes]
    result = plan(args)
    text = markdown(result)
    print(text)
    stem = os.path.join(args.out, "scale_plan")
    write_text_atomic(stem + ".json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(stem + ".md", text)
    print(f"wrote {stem}.json\nwrote {stem}.md")
    return result


if __name__ == "__main__":
    main()
