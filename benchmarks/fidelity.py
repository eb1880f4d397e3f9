r"""Does MoC keep quality? A fidelity benchmark where long-range recall decides, through `diffusers-moc train`.

Each seed builds everything from scratch, on the CPU, from configs and random initialisation (`docs/fidelity.md`):

1. **The task.** Synthetic multi-shot videos (16x16 pixels, 61 frames, 16 latent frames of 2x2 tokens): four shots
   of four latent frames, `early`, `distractor`, `distractor`, `returning`. A shot is a coloured background with a
   coloured disc moving across it; colours, position and motion are drawn per shot. The returning shot brings back
   the early shot's colours at a new position with a new motion: its appearance can be predicted only from the early
   shot. Shot captions name a scene, never its colours; the returning shot repeats the early shot's caption. Held-out
   videos come from a separate random stream.
2. **A dense base model.** A tiny `WanTransformer3DModel` (4 layers, 2 heads of 32) trained densely from scratch
   with the trainer's flow-matching loss and shot captions, saved with `save_pretrained` as a `WanPipeline` folder.
   Its VAE is diffusers' `AutoencoderKLWan` at a tiny size with its weights made local (a latent depends on one 4x4
   pixel block of one pixel frame, so nothing crosses a shot cut outside attention) and deterministic.
3. **Adaptation through the product.** `diffusers-moc train` (`load_train_config` + `train`, from a YAML file written
   next to each run): LoRA, the sparsity schedule (dense -> `top_k` 3, no local window: 25% of the pairs), context
   drop-off and drop-in. Three sparse variants get the same run: MoC (routing over all frames, as the bidirectional
   dense model attends), MoC with causal routing (the paper's DAG: what it costs a model trained without it), and
   the naive window-only baseline (`top_k` 0, the smallest local window at least as dense: each query's own shot).
   A dense LoRA run is the control for what training alone gains.
4. **Metrics on held-out videos**, over seeds: the flow-matching validation loss over all frames; the loss on the
   returning shot at high noise (sigma 0.9 and 0.95); a consistency gap from whole videos sampled with an 8-step
   Euler sampler (cosine similarity of the returning shot's mean latent to the early shot's, minus its mean
   similarity to the distractors'); the attended density (measured with `moc_routing_map`); and the share of the
   returning shot's routed selections that land on the early shot.

Prints the table and the targets, and writes `benchmarks/results/fidelity_cpu.{json,md}` and three PNGs (adaptation
curves, metric bars, the adapted model's routing map while it samples a held-out video).

    python benchmarks/fidelity.py            # 3 seeds, a process each (16 minutes on 2 cores)
    python benchmarks/fidelity.py --quick    # every stage at toy sizes (about 20 seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # run from a checkout without installing
    import diffusers_moc  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from diffusers_moc import ChunkLayout, MoCConfig, apply_moc, load_moc_lora, moc_context, moc_routing_map, remove_moc
from diffusers_moc.training import VideoClipDataset, latent_shot_frames, load_train_config, routed_density, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch_backend import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: Shot captions name a scene, never its colours. The returning shot repeats the early shot's caption (it tells the
#: model *which* shot comes back, as a storyboard does); *what* it looks like is only in the early shot's frames.
SCENES = ("the city", "a forest", "the sea", "a room", "the beach", "a mountain", "a street", "a river", "a house")
SHOT_ROLES = ("early", "distractor", "distractor", "returning")
EARLY, RETURNING = 0, len(SHOT_ROLES) - 1
DISTRACTORS = tuple(i for i, role in enumerate(SHOT_ROLES) if role == "distractor")
#: Wan's VAE maps 4n + 1 pixel frames to n + 1 latent frames.
TEMPORAL = 4
#: `training.flow_shift` (Wan's pipelines use 3 to 5): high noise, where a video's colours are decided and recall
#: matters, gets more of the training. Pretraining, adaptation, evaluation and sampling use the same schedule.
FLOW_SHIFT = 5.0
#: MoC's reference backend: on a CPU at these sizes the fastest, and every backend computes the same attention.
BACKEND = "reference"
#: `dense_adapted` is a control: the same LoRA run at full density, which tells what adaptation gains by training alone.
#: `causal` is MoC with causal routing (the paper's DAG), the same run otherwise.
KINDS = ("dense", "moc", "causal", "naive")
VARIANTS = ("dense", "dense_adapted", *(f"{k}_{s}" for k in KINDS[1:] for s in ("unadapted", "adapted")))


@dataclass(frozen=True)
class Settings:
    r"""Sizes of one benchmark run (`FULL` or `QUICK`)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    train_videos: int = 256
    eval_videos: int = 32
    size: int = 16  # pixels; the VAE compresses 4x, the transformer patches 2x2: 2x2 tokens per latent frame
    frames_per_shot: int = 4  # latent frames
    layers: int = 4
    heads: int = 2
    head_dim: int = 32  # Wan's rotary embedding gives time 12 of 32 dims: frame offsets resolve well enough to recall
    ffn_dim: int = 128
    dense_steps: int = 8000  # recall is learnt late; a dense model without it leaves MoC nothing to keep
    dense_batch: int = 16
    dense_lr: float = 2e-3
    adapt_steps: int = 1200  # `anneal_steps` of it take the sparsity from dense to the target
    adapt_batch: int = 8
    # At 1e-3 the dense LoRA control's held-out loss rose on every seed (+0.7%): too large a step for a converged
    # model. At 3e-4 it moves by +0.2%.
    adapt_lr: float = 3e-4
    lora_rank: int = 16
    warmup_steps: int = 20
    anneal_steps: int = 800
    top_k: int = 3
    local_window: int = 0
    anchor_own_shot: bool = False
    causal: bool = False  # the dense base is bidirectional; the `causal` variant measures what the DAG costs
    loss_draws: int = 8  # noise levels per held-out video for the validation loss (stratified over training's)
    # The sampler's first steps (sigma 1 to about 0.87 at shift 5), where a video's colours are decided: the shot's own
    # frames hardly show them, the early shot's frames do.
    high_sigmas: tuple[float, ...] = (0.9, 0.95)
    sample_steps: int = 8
    max_sequence_length: int = 8

    @property
    def shot_frames(self) -> tuple[int, ...]:
        return (self.frames_per_shot,) * len(SHOT_ROLES)

    @property
    def latent_frames(self) -> int:
        return sum(self.shot_frames)

    @property
    def num_frames(self) -> int:
        return TEMPORAL * (self.latent_frames - 1) + 1


FULL = Settings()
QUICK = replace(
    FULL,
    seeds=(0, 1),
    train_videos=8,
    eval_videos=4,
    dense_steps=30,
    dense_batch=4,
    adapt_steps=6,
    adapt_batch=2,
    warmup_steps=1,
    anneal_steps=3,
    loss_draws=2,
    sample_steps=2,
)


# ---------------------------------------------------------------------------------------------- the task
def pixel_shot_starts(shot_frames: tuple[int, ...]) -> list[int]:
    """First pixel frame of each shot: latent frame `j >= 1` encodes pixel frames `4j - 3 ... 4j`."""
    starts, latent = [], 0
    for n in shot_frames:
        starts.append(0 if latent == 0 else TEMPORAL * latent - (TEMPORAL - 1))
        latent += n
    return starts


def _render_shot(rng: np.random.Generator, look: np.ndarray, frames: int, size: int) -> np.ndarray:
    """`(frames, size, size, 3)` in [0, 1]: a disc of colour `look[1]` moving across a background `look[0]`."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    start = rng.uniform(0.25, 0.75, 2)
    velocity = rng.uniform(-0.025, 0.025, 2)  # per pixel frame
    out = np.empty((frames, size, size, 3))
    for f in range(frames):
        cx, cy = np.clip(start + velocity * f, 0.15, 0.85)
        inside = 1.0 / (1.0 + np.exp((np.hypot(xx - cx, yy - cy) - 0.2) / 0.03))  # a soft-edged disc
        out[f] = look[0] * (1.0 - inside[..., None]) + look[1] * inside[..., None]
    return out


def shot_captions(rng: np.random.Generator) -> tuple[str, ...]:
    """Distinct scenes for the early shot and the distractors; the returning shot is the early shot's scene."""
    scenes = [SCENES[i] for i in rng.choice(len(SCENES), len(SHOT_ROLES) - 1, replace=False)]
    return (*scenes, scenes[EARLY])


def shot_looks(rng: np.random.Generator) -> list[np.ndarray]:
    """Background and disc colour of each shot, `(2, 3)` in [0, 1]: the returning shot has the early shot's."""
    looks = [rng.uniform(0.0, 1.0, (2, 3)) for _ in SHOT_ROLES]
    looks[RETURNING] = looks[EARLY]  # same colours; position and motion are drawn anew
    return looks


def render_video(rng: np.random.Generator, settings: Settings) -> np.ndarray:
    """One multi-shot video, `(frames, size, size, 3)` uint8 (see `shot_looks`)."""
    looks = shot_looks(rng)
    starts = pixel_shot_starts(settings.shot_frames)
    ends = starts[1:] + [settings.num_frames]
    shots = [_render_shot(rng, look, e - s, settings.size) for look, s, e in zip(looks, starts, ends)]
    return (np.concatenate(shots) * 255).round().astype(np.uint8)


def write_clip(path: str, video: np.ndarray) -> None:
    """Lossless H.264 (RGB, qp 0): the trainer decodes exactly the rendered pixels."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264rgb", rate=8)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "rgb24"
        stream.options = {"qp": "0"}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def make_dataset(root: str, count: int, seed: int, split: int, settings: Settings) -> list[tuple[str, ...]]:
    """`count` clips and their `metadata.jsonl` in `root`, deterministic in `(seed, split)`; returns each clip's
    shot captions."""
    rng = np.random.default_rng([seed, split])
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    starts = pixel_shot_starts(settings.shot_frames)
    # The trainer must see exactly these shots: the metadata's frame ranges map back to them.
    assert latent_shot_frames(starts, settings.num_frames) == settings.shot_frames
    bounds = list(zip(starts, starts[1:] + [settings.num_frames]))
    lines, captions = [], []
    for i in range(count):
        name = f"clips/{i:05d}.mp4"
        captions.append(shot_captions(rng))
        write_clip(os.path.join(root, name), render_video(rng, settings))
        shots = [{"caption": c, "frames": [a, b]} for c, (a, b) in zip(captions[-1], bounds)]
        lines.append(json.dumps({"file": name, "shots": shots}))
    with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return captions


# ---------------------------------------------------------------------------------------------- the dense base model
def _local_vae(seed: int):
    """A tiny `AutoencoderKLWan` (4x in time and space) made local: each latent is a fixed random function of one
    pixel frame's 4x4 pixel block.

    Wan's VAE is causal in time: a latent frame also sees earlier pixel frames, across shot cuts. Only the current
    frame's temporal taps are kept, so the one way from the early shot to the returning shot is attention, which is
    what the benchmark measures. Spatial convolutions keep their centre tap, downsampling is a 2x2 mean and the
    frame's self-attention is off, so a random encoder adds no fixed spatial pattern (zero-padded borders) that would
    dwarf the content; the temporal downsampling is the identity on its kept tap, so the first latent frame (encoded
    alone, without it) goes through the same map as the others. The log-variance is pinned low: the trainer's
    posterior samples are the means.
    """
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d, WanResample

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        scale_factor_spatial=4,
        scale_factor_temporal=TEMPORAL,
    ).eval()
    z = vae.config.z_dim
    with torch.no_grad():
        for module in vae.encoder.modules():
            if isinstance(module, WanCausalConv3d):
                t, h, w = module.kernel_size
                keep = module.weight[:, :, t - 1, h // 2, w // 2].clone()  # current frame, centre pixel
                module.weight.zero_()
                module.weight[:, :, t - 1, h // 2, w // 2] = keep
            elif isinstance(module, WanResample) and module.mode == "downsample3d":
                module.time_conv.weight.zero_()
                module.time_conv.weight[:, :, -1, 0, 0] = torch.eye(module.time_conv.out_channels)
                module.time_conv.bias.zero_()
                pool = module.resample[1]  # 3x3, stride 2: its top-left 2x2 taps average each channel
                pool.weight.zero_()
                pool.weight[:, :, :2, :2] = torch.eye(pool.out_channels)[:, :, None, None] / 4
                pool.bias.zero_()
            elif isinstance(module, WanAttentionBlock):
                module.proj.weight.zero_()  # the block is then its residual: the identity
                module.proj.bias.zero_()
        vae.quant_conv.weight[z:] = 0.0
        vae.quant_conv.bias[z:] = -30.0  # log-variance: std 3e-7
    return vae


def build_pipeline(settings: Settings, seed: int):
    """A `WanPipeline` of tiny components with random weights: the tiny text encoder of `diffusers_moc.tiny`, the
    local VAE and a 4-layer `WanTransformer3DModel`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from diffusers_moc.tiny import TINY_TEXT_DIM, tiny_wan_components

    components = tiny_wan_components(seed=seed)
    components["vae"] = _local_vae(seed)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    torch.manual_seed(seed)
    components["transformer"] = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=settings.heads,
        attention_head_dim=settings.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=64,
        ffn_dim=settings.ffn_dim,
        num_layers=settings.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return WanPipeline(**components)


@torch.no_grad()
def encode_videos(pipe, root: str, settings: Settings) -> torch.Tensor:
    """The clips of `root`, decoded as the trainer decodes them, to normalised latents `(N, 16, F, h, w)`."""
    clips = VideoClipDataset(root, settings.num_frames, settings.size, settings.size, validate=False)
    means = []
    for start in range(0, len(clips), 16):
        video = torch.stack([clips.load(i)["video"] for i in range(start, min(start + 16, len(clips)))])
        means.append(pipe.vae.encode(video).latent_dist.mean)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (torch.cat(means) - mean) / std


def calibrate_latents(pipe, root: str, settings: Settings) -> torch.Tensor:
    """Set the VAE's `latents_mean` / `latents_std` to the training clips' per-channel statistics (as Wan's config
    holds its data's) and return the normalised training latents."""
    pipe.vae.register_to_config(latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    raw = encode_videos(pipe, root, settings)
    mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4))
    pipe.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)


@torch.no_grad()
def text_contexts(pipe, captions: list[tuple[str, ...]], settings: Settings) -> tuple[torch.Tensor, dict[str, Any]]:
    """Each clip's cross-attention context and the caption spans of `moc_context`, built as the trainer and
    `LongVideoPipeline` build them: each distinct caption encoded alone (`encode_caption`), concatenated in the order
    of `caption_layout`. Every clip has the same layout (early, distractor, distractor; the returning shot reads the
    early shot's caption), so they batch together."""
    from diffusers_moc.pipelines import caption_layout, encode_caption

    embeds: dict[str, torch.Tensor] = {}
    contexts, spans = [], None
    for shots in captions:
        layout = caption_layout(None, shots, settings.max_sequence_length)
        if spans not in (None, layout.context_kwargs()):
            raise ValueError(f"clips with different caption layouts: {spans} and {layout.context_kwargs()}")
        spans = layout.context_kwargs()
        for text in layout.segments:
            if text not in embeds:
                embeds[text] = encode_caption(pipe.tokenizer, pipe.text_encoder, text, settings.max_sequence_length)[0]
        contexts.append(torch.cat([embeds[text] for text in layout.segments]))
    return torch.stack(contexts), spans


def dense_config(settings: Settings) -> MoCConfig:
    """Exactly dense self-attention through the MoC processor (every chunk, not causal: the trainer's dense phase),
    which also gives each shot its own caption in cross-attention."""
    return MoCConfig(top_k=settings.latent_frames, causal=False, drop_off=0.0, drop_in=0.0, backend=BACKEND)


def _train_sigmas() -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's 1000 training noise levels and timesteps (`FlowMatchEulerDiscreteScheduler`, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)
    return scheduler.sigmas[:-1].clone(), scheduler.timesteps.clone()


def pretrain_dense(pipe, latents: torch.Tensor, texts: tuple[torch.Tensor, dict], settings: Settings, seed: int):
    """Train the whole transformer densely from scratch with the trainer's loss (flow matching, timesteps uniform
    over the shifted schedule) and its shot conditioning; returns the loss of every step."""
    transformer = pipe.transformer.train()
    apply_moc(transformer, dense_config(settings))
    generator = torch.Generator().manual_seed(seed)
    sigmas, timesteps = _train_sigmas()
    contexts, spans = texts
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=settings.dense_lr, weight_decay=1e-4)
    warmup = max(1, settings.dense_steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.dense_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses = []
    for _ in range(settings.dense_steps):
        clips = torch.randint(len(latents), (settings.dense_batch,), generator=generator)
        x0 = latents[clips]
        noise = torch.randn(x0.shape, generator=generator)
        index = torch.randint(len(sigmas), (settings.dense_batch,), generator=generator)
        sigma = sigmas[index].view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        with moc_context(shot_frames=settings.shot_frames, **spans):
            pred = transformer(noisy, timestep=timesteps[index], encoder_hidden_states=contexts[clips]).sample
            loss = (pred - (noise - x0)).pow(2).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    remove_moc(transformer)  # the base model is saved as a stock Wan transformer
    transformer.eval()
    return losses


# ---------------------------------------------------------------------------------------------- adaptation
def target_configs(settings: Settings) -> dict[str, MoCConfig]:
    """MoC's target, the same with causal routing, and the naive window-only baseline: the smallest local window at
    least as dense as MoC (a window stops at a shot cut, so the widest one is each query's own shot)."""
    layout = ChunkLayout.for_video(settings.latent_frames, _tokens_per_frame(settings), settings.shot_frames)
    moc = MoCConfig(
        top_k=settings.top_k,
        local_window=settings.local_window,
        anchor_own_shot=settings.anchor_own_shot,
        causal=settings.causal,
        backend=BACKEND,
    )
    density = routed_density(layout, moc)
    for window in range(max(settings.shot_frames)):
        naive = moc.replace(top_k=0, local_window=window, anchor_own_shot=False)
        if routed_density(layout, naive) >= density:
            break
    return {"moc": moc, "causal": moc.replace(causal=True), "naive": naive}


def _tokens_per_frame(settings: Settings) -> int:
    return (settings.size // 4 // 2) ** 2  # 4x VAE, 2x2 patches


def train_config(
    name: str, moc: MoCConfig, base: str, data: str, cache: str, out: str, seed: int, settings: Settings
) -> dict[str, Any]:
    """The `diffusers-moc train` config of one adaptation run: LoRA, the sparsity schedule from dense to the target,
    context drop-off and drop-in (the project's defaults, 0.5 and 0.1)."""
    return {
        "output_dir": os.path.join(out, name),
        "seed": seed,
        "model": {"pretrained": base},
        "lora": {"rank": settings.lora_rank, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "moc": moc.to_dict(),
        "sparsity": {
            "start_top_k": "dense",
            "warmup_steps": settings.warmup_steps,
            "anneal_steps": settings.anneal_steps,
        },
        "data": {
            "root": data,
            "num_frames": settings.num_frames,
            "height": settings.size,
            "width": settings.size,
            "max_sequence_length": settings.max_sequence_length,
            "cache": True,  # MoC and naive runs share the latent cache
            "cache_dir": cache,
            "validate_clips": False,
        },
        "training": {
            "max_steps": settings.adapt_steps,
            "batch_size": settings.adapt_batch,
            "learning_rate": settings.adapt_lr,
            "lr_scheduler": "constant",
            "mixed_precision": "no",  # CPU
            "gradient_checkpointing": False,
            "flow_shift": FLOW_SHIFT,
        },
        "checkpointing": {"every": 0},
        "validation": {"every": 0},
        "logging": {"report_to": []},
    }


def adapt(name: str, config: dict[str, Any], out: str) -> tuple[str, dict[str, list[float]]]:
    """Run `diffusers-moc train` from a YAML file (kept next to the run): the exported adapter folder and the curves."""
    import yaml
    from accelerate.state import AcceleratorState, GradientState

    path = os.path.join(out, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    # accelerate keeps process-wide singletons; each run starts from a clean state, as a new command would.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    result = train(load_train_config(path))
    return result.final_dir, {"loss": result.losses, "density": result.densities}


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalData:
    r"""Held-out latents and the noise every variant is evaluated with (the same draws for all: paired comparison)."""

    latents: torch.Tensor  # (N, 16, F, h, w), normalised
    context: torch.Tensor  # (N, text tokens, text dim)
    spans: dict[str, Any]  # the caption spans of `moc_context`
    loss_draws: list[tuple[float, float, torch.Tensor]]  # (sigma, timestep, noise) over the training noise levels
    high_draws: list[tuple[float, float, torch.Tensor]]  # the same at the high noise levels
    sample_noise: torch.Tensor


def eval_data(pipe, root: str, captions: list[tuple[str, ...]], settings: Settings, seed: int) -> EvalData:
    latents = encode_videos(pipe, root, settings)
    generator = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    sigmas, timesteps = _train_sigmas()
    # Stratified over the training distribution (uniform over the 1000 shifted levels): the expected training loss.
    index = [int((j + 0.5) / settings.loss_draws * len(sigmas)) for j in range(settings.loss_draws)]
    loss_draws = [
        (float(sigmas[i]), float(timesteps[i]), torch.randn(latents.shape, generator=generator)) for i in index
    ]
    high_draws = [(s, s * 1000.0, torch.randn(latents.shape, generator=generator)) for s in settings.high_sigmas]
    noise = torch.randn(latents.shape, generator=generator)
    return EvalData(latents, *text_contexts(pipe, captions, settings), loss_draws, high_draws, noise)


def shot_slices(settings: Settings) -> list[slice]:
    bounds = np.cumsum((0,) + settings.shot_frames)
    return [slice(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]


@torch.no_grad()
def frame_losses(transformer, data: EvalData, draw: tuple[float, float, torch.Tensor], settings: Settings):
    """Flow-matching loss per held-out video and latent frame, `(N, F)`, at one noise draw."""
    sigma, timestep, noise = draw
    x0 = data.latents
    noisy = (1 - sigma) * x0 + sigma * noise
    out = []
    with moc_context(shot_frames=settings.shot_frames, **data.spans):
        for start in range(0, len(x0), 16):
            part = slice(start, start + 16)
            t = torch.full((len(x0[part]),), timestep)
            pred = transformer(noisy[part], timestep=t, encoder_hidden_states=data.context[part], return_dict=False)[0]
            out.append((pred - (noise[part] - x0[part])).pow(2).mean(dim=(1, 3, 4)))
    return torch.cat(out)


@torch.no_grad()
def sample_videos(transformer, data: EvalData, settings: Settings, count: int | None = None) -> torch.Tensor:
    """Whole videos (the first `count` held-out clips' captions) from the evaluation noise with a few-step Euler
    flow-matching sampler (the pipeline's scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    scheduler.set_timesteps(settings.sample_steps)
    x, context = data.sample_noise[:count].clone(), data.context[:count]
    with moc_context(shot_frames=settings.shot_frames, **data.spans):
        for t in scheduler.timesteps:
            v = transformer(x, timestep=t.expand(len(x)), encoder_hidden_states=context, return_dict=False)[0]
            x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def consistency_gap(latents: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Per video: cosine similarity of the returning shot's mean latent to the early shot's, minus its mean
    similarity to the distractors'. About 0 when the returning shot ignores the early shot."""
    means = [latents[:, :, s].mean(dim=(2, 3, 4)) for s in shot_slices(settings)]
    similarity = [torch.nn.functional.cosine_similarity(means[RETURNING], m, dim=1) for m in means]
    return similarity[EARLY] - torch.stack([similarity[d] for d in DISTRACTORS]).mean(0)


def routing_summary(routing_map, settings: Settings) -> dict[str, float]:
    """Measured attended density (mean over layers) and where the returning shot's routed selections go: the share
    that lands on the early shot, of all routed selections of its queries (mean over layers)."""
    data = routing_map.to_dict()
    routed = torch.tensor(data["mean"]["routed"])
    shots = shot_slices(settings)
    rows = routed[shots[RETURNING]]
    total = float(rows.sum())
    return {
        "density": data["mean"]["density"],
        "returning_routed_to_early": float(rows[:, shots[EARLY]].sum()) / total if total else float("nan"),
    }


def evaluate(transformer, data: EvalData, settings: Settings, sparse: bool) -> dict[str, float]:
    """The metrics of one variant on the held-out videos."""
    returning = shot_slices(settings)[RETURNING]
    val = torch.stack([frame_losses(transformer, data, d, settings) for d in data.loss_draws]).mean()
    high = torch.stack([frame_losses(transformer, data, d, settings)[:, returning] for d in data.high_draws]).mean()
    if sparse:
        with moc_routing_map() as routing_map:
            samples = sample_videos(transformer, data, settings)
        routing = routing_summary(routing_map, settings)
    else:
        samples = sample_videos(transformer, data, settings)
        routing = {"density": 1.0, "returning_routed_to_early": float("nan")}
    return {
        "val_loss": float(val),
        "returning_loss_high_noise": float(high),
        "consistency_gap": float(consistency_gap(samples, settings).mean()),
        **routing,
    }


def load_variant(base: str, variant: str, configs: dict[str, MoCConfig], adapters: dict[str, str]):
    """The transformer of one variant, loaded as a user loads it: the base folder, then MoC or a MoC LoRA."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(base)
    kind, _, state = variant.partition("_")
    if variant == "dense":
        apply_moc(pipe, configs["dense"])
    elif state == "unadapted":
        apply_moc(pipe, configs[kind])
    elif state == "adapted":
        load_moc_lora(pipe, adapters[kind])
    return pipe.transformer.eval()


# ---------------------------------------------------------------------------------------------- one seed
def _elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def run_seed(seed: int, settings: Settings, work: str, picture: str | None = None) -> dict[str, Any]:
    """Everything for one seed: data, dense base, both adaptations, the metrics of every variant. With `picture`,
    also the adapted MoC model's routing map while it samples the first held-out video, saved there."""
    print(f"seed {seed}: start", flush=True)
    timings, start = {}, time.perf_counter()
    root = os.path.join(work, f"seed{seed}")
    train_root, eval_root = os.path.join(root, "train"), os.path.join(root, "eval")
    train_captions = make_dataset(train_root, settings.train_videos, seed, 0, settings)
    eval_captions = make_dataset(eval_root, settings.eval_videos, seed, 1, settings)
    pipe = build_pipeline(settings, seed)
    latents = calibrate_latents(pipe, train_root, settings)
    texts = text_contexts(pipe, train_captions, settings)
    timings["data_s"], start = _elapsed(start), time.perf_counter()
    dense_curve = pretrain_dense(pipe, latents, texts, settings, seed)
    base = os.path.join(root, "base")
    pipe.save_pretrained(base)
    data = eval_data(pipe, eval_root, eval_captions, settings, seed)
    timings["dense_pretraining_s"], start = _elapsed(start), time.perf_counter()
    configs = {**target_configs(settings), "dense": dense_config(settings)}
    adapters, curves = {}, {"dense_pretraining": dense_curve}
    for kind in KINDS:
        config = train_config(kind, configs[kind], base, train_root, os.path.join(root, "cache"), root, seed, settings)
        adapters[kind], curves[kind] = adapt(kind, config, root)
    timings["adaptation_s"], start = _elapsed(start), time.perf_counter()
    metrics = {"data": {"consistency_gap": float(consistency_gap(data.latents, settings).mean())}}
    for variant in VARIANTS:
        transformer = load_variant(base, variant, configs, adapters)
        metrics[variant] = evaluate(transformer, data, settings, sparse=not variant.startswith("dense"))
        print(f"  seed {seed} {variant}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics[variant].items()))
        if picture and variant == "moc_adapted":
            with moc_routing_map() as routing_map:
                sample_videos(transformer, data, settings, count=1)
            routing_map.save(picture)
    timings["evaluation_s"] = _elapsed(start)
    return {
        "seed": seed,
        "metrics": metrics,
        "curves": curves,
        "timings": timings,
        "configs": {k: c.to_dict() for k, c in configs.items()},
    }


# ---------------------------------------------------------------------------------------------- summary and targets
METRICS = ("density", "val_loss", "returning_loss_high_noise", "consistency_gap", "returning_routed_to_early")


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, standard deviation (over seeds, n - 1) and range of every metric of every variant."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant in ("data", *VARIANTS):
        out[variant] = {}
        for metric in METRICS:
            values = [r["metrics"][variant].get(metric) for r in runs]
            if any(v is None or math.isnan(v) for v in values):
                continue
            a = np.asarray(values, dtype=np.float64)
            std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
            out[variant][metric] = {"mean": float(a.mean()), "std": std, "min": float(a.min()), "max": float(a.max())}
    return out


def check_targets(summary: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The benchmark's targets, each with its numbers and whether it is met."""
    dense, moc, naive, unadapted = (summary[v] for v in ("dense", "moc_adapted", "naive_adapted", "moc_unadapted"))

    def m(variant: dict, metric: str) -> float:
        return variant[metric]["mean"]

    def s(variant: dict, metric: str) -> float:
        return variant[metric]["std"]

    targets = []
    # 1. The task needs recall. A seed draws the data and the base model that every variant of it shares, so the
    # comparison is paired: naive's per-seed excess over dense must exceed twice its spread over seeds (stricter
    # than a one-sided paired t-test at 5% for 3 seeds). The spread of the levels themselves is shown beside it.
    for metric, worse in (("returning_loss_high_noise", 1), ("consistency_gap", -1)):
        excess = np.array(
            [worse * (r["metrics"]["naive_adapted"][metric] - r["metrics"]["dense"][metric]) for r in runs]
        )
        spread = float(excess.std(ddof=1)) if len(excess) > 1 else 0.0
        targets.append(
            {
                "target": f"naive adapted clearly worse than dense on {metric} (beyond the seed spread)",
                "value": f"naive {m(naive, metric):.4f} vs dense {m(dense, metric):.4f}: worse by "
                f"{excess.mean():.4f} ± {spread:.4f} (paired over seeds; per seed "
                + ", ".join(f"{e:+.4f}" for e in excess)
                + f"; levels' std {s(naive, metric):.4f}, {s(dense, metric):.4f})",
                "met": bool(excess.min() > 0 and excess.mean() > 2 * spread),
            }
        )
    targets.append(
        {
            "target": "MoC adapted at <= 25% attended density",
            "value": f"{m(moc, 'density'):.1%} (naive {m(naive, 'density'):.1%})",
            "met": m(moc, "density") <= 0.25,
        }
    )
    for metric in ("val_loss", "returning_loss_high_noise"):
        ratio = m(moc, metric) / m(dense, metric)
        targets.append(
            {
                "target": f"MoC adapted within 5% of dense on {metric}",
                "value": f"MoC {m(moc, metric):.4f} vs dense {m(dense, metric):.4f}: {ratio - 1:+.1%}",
                "met": ratio <= 1.05,
            }
        )
    kept = m(moc, "consistency_gap") / m(dense, "consistency_gap")
    targets.append(
        {
            "target": "MoC adapted keeps >= 90% of dense's consistency gap",
            "value": f"MoC {m(moc, 'consistency_gap'):.4f} vs dense {m(dense, 'consistency_gap'):.4f}: {kept:.1%}",
            "met": kept >= 0.9,
        }
    )
    better = {
        "val_loss": m(moc, "val_loss") < m(unadapted, "val_loss"),
        "returning_loss_high_noise": m(moc, "returning_loss_high_noise") < m(unadapted, "returning_loss_high_noise"),
        "consistency_gap": m(moc, "consistency_gap") > m(unadapted, "consistency_gap"),
    }
    targets.append(
        {
            "target": "MoC adapted better than MoC without adaptation (every metric)",
            "value": ", ".join(
                f"{k} {m(moc, k):.4f} vs {m(unadapted, k):.4f}" for k in ("val_loss", "returning_loss_high_noise")
            )
            + f", consistency_gap {m(moc, 'consistency_gap'):.4f} vs {m(unadapted, 'consistency_gap'):.4f}",
            "met": all(better.values()),
        }
    )
    return targets


# ---------------------------------------------------------------------------------------------- output
LABELS = {
    "data": "held-out data (ceiling)",
    "dense": "dense",
    "dense_adapted": "dense, adapted (control)",
    "moc_unadapted": "MoC, no adaptation",
    "moc_adapted": "MoC, adapted",
    "causal_unadapted": "MoC causal, no adaptation",
    "causal_adapted": "MoC causal, adapted",
    "naive_unadapted": "naive window, no adaptation",
    "naive_adapted": "naive window, adapted",
}
COLUMNS = {
    "density": "attended density",
    "val_loss": "val loss (all frames)",
    "returning_loss_high_noise": "returning-shot loss, high noise",
    "consistency_gap": "consistency gap",
    "returning_routed_to_early": "returning routed to early shot",
}


def table(summary: dict[str, Any]) -> str:
    """Markdown table: mean ± std over seeds."""
    lines = ["| variant | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---|" * len(COLUMNS)]
    for variant, label in LABELS.items():
        cells = []
        for metric in COLUMNS:
            v = summary[variant].get(metric)
            if v is None:
                cells.append("")
            elif metric in ("density", "returning_routed_to_early"):
                cells.append(f"{v['mean']:.1%}" + (f" ± {v['std']:.1%}" if v["std"] else ""))
            else:
                cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


_COLORS = {"moc": "tab:blue", "causal": "tab:green", "naive": "tab:orange"}


def plot_curves(runs: list[dict[str, Any]], path: str) -> None:
    """Dense pretraining loss, and each adaptation's loss with the attended density on a second axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    pre, adapt_ax = fig.subplots(1, 2)
    density_ax = adapt_ax.twinx()
    for run in runs:
        c, seed = run["curves"], run["seed"]
        pre.plot(_smooth(c["dense_pretraining"], 50), color="black", alpha=0.4 + 0.2 * (seed % 3), lw=1)
        for kind, color in (("dense", "tab:gray"), *_COLORS.items()):
            label = f"{kind}" if seed == runs[0]["seed"] else None
            adapt_ax.plot(_smooth(c[kind]["loss"], 20), color=color, alpha=0.8, lw=1, label=label)
            density_ax.plot(c[kind]["density"], color=color, ls=":", lw=1)
    pre.set(title="dense pretraining (from scratch)", xlabel="step", ylabel="flow-matching loss (moving mean)")
    adapt_ax.set(title="adaptation: diffusers-moc train (LoRA)", xlabel="step", ylabel="loss (moving mean of 20)")
    density_ax.set_ylabel("attended density (dotted)")
    density_ax.set_ylim(0, 1.05)
    adapt_ax.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=110)


def plot_bars(runs: list[dict[str, Any]], summary: dict[str, Any], path: str) -> None:
    """One panel per quality metric: mean over seeds (bar), standard deviation (whisker), each seed (dot)."""
    from matplotlib.figure import Figure

    panels = ("val_loss", "returning_loss_high_noise", "consistency_gap")
    fig = Figure(figsize=(13, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(panels)), panels):
        variants = [v for v in LABELS if metric in summary[v]]
        x = np.arange(len(variants))
        means = [summary[v][metric]["mean"] for v in variants]
        stds = [summary[v][metric]["std"] for v in variants]
        colors = [_COLORS.get(v.split("_")[0], "tab:gray") for v in variants]
        ax.bar(x, means, yerr=stds, color=colors, alpha=0.75, capsize=3)
        for i, v in enumerate(variants):
            ax.plot([i] * len(runs), [r["metrics"][v][metric] for r in runs], "k.", ms=4)
        ax.set_xticks(x, [LABELS[v].replace(", ", "\n") for v in variants], fontsize=7)
        ax.set_title(COLUMNS[metric] + (" (higher is better)" if metric == "consistency_gap" else " (lower is better)"))
    fig.savefig(path, dpi=110)


def _describe(config: dict[str, Any]) -> str:
    keys = ("top_k", "local_window", "anchor_own_shot", "causal")
    return ", ".join(f"{k} {config[k]}" for k in keys)


def markdown(result: dict[str, Any], stem: str) -> str:
    s = result["settings"]
    lines = [
        f"Machine: {result['machine']} ({result['date']}, torch {result['torch']}, {len(s['seeds'])} seeds, "
        f"{result['wall_s']:.0f} s)",
        "",
        f"{len(s['seeds'])} seeds; each: {s['train_videos']} training and {s['eval_videos']} held-out videos, dense "
        f"pretraining {s['dense_steps']} steps, adaptation {s['adapt_steps']} steps (LoRA rank {s['lora_rank']}, "
        f"learning rate {s['adapt_lr']:g}, dense for {s['warmup_steps']} steps, annealed over {s['anneal_steps']}). "
        + "; ".join(f"{kind}: {_describe(config)}" for kind, config in result["configs"].items())
        + ". Mean ± std over seeds.",
        "",
        table(result["summary"]),
        "",
        "| target | numbers | met |",
        "|---|---|---|",
        *(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in result["targets"]),
        "",
        f"![metrics]({os.path.basename(stem)}_metrics.png)",
        f"![adaptation curves]({os.path.basename(stem)}_curves.png)",
        f"![routing map]({os.path.basename(stem)}_routing.png)",
    ]
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- main
def _setup(threads: int) -> None:
    """Torch threads, and no loading bars or config notes from diffusers and transformers between the benchmark's
    lines. The tensors are tiny: more threads gain little, and on a shared CPU their spinning can slow a run tenfold."""
    import diffusers
    import transformers

    torch.set_num_threads(threads)
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def run_seeds(settings: Settings, work: str, picture: str, jobs: int, threads: int) -> list[dict[str, Any]]:
    """Every seed, `jobs` at a time in their own processes (a seed's results do not depend on what runs beside it);
    the first seed also records the routing map picture."""
    pictures = [picture if i == 0 else None for i in range(len(settings.seeds))]
    if jobs <= 1:
        return [run_seed(seed, settings, work, p) for seed, p in zip(settings.seeds, pictures)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads or accelerate state shared
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_setup, initargs=(threads,)) as pool:
        futures = [pool.submit(run_seed, seed, settings, work, p) for seed, p in zip(settings.seeds, pictures)]
        return [f.result() for f in futures]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run at toy sizes (what the test suite runs)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", help="keep the datasets, base models and adapters here (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=None, help="seeds at once, a process each (default: all; quick: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    _setup(args.threads)
    settings = QUICK if args.quick else FULL
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "fidelity_quick_cpu" if args.quick else "fidelity_cpu")
    work = args.work or tempfile.mkdtemp(prefix="moc-fidelity-")
    jobs = args.jobs or (1 if args.quick else len(settings.seeds))
    try:
        runs = run_seeds(settings, work, f"{stem}_routing.png", jobs, args.threads)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarise(runs)
    result = {
        "machine": machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "wall_s": _elapsed(start),
        "settings": asdict(settings),
        "configs": {k: c for k, c in runs[0]["configs"].items() if k != "dense"},
        "summary": summary,
        "targets": check_targets(summary, runs),
        "runs": runs,
    }
    plot_curves(runs, f"{stem}_curves.png")
    plot_bars(runs, summary, f"{stem}_metrics.png")
    _write_atomic(f"{stem}.json", json.dumps(result, indent=1) + "\n")
    _write_atomic(f"{stem}.md", markdown(result, stem))
    print()
    print(table(summary))
    print()
    for t in result["targets"]:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']}")
    return result


if __name__ == "__main__":
    main()
