"""Worker of `test_distributed_generate.py`: one rank of a 2-process gloo run of `LongVideoPipeline` and of
`diffusers-moc generate` under Ulysses context parallelism."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Every family, with its start image where it takes one: Wan 2.1 I2V (CLIP tokens in cross-attention), Wan 2.2
#: A14B (both experts: the tiny scheduler's 2 steps run one each), TI2V-5B (per-token timesteps, image latent).
CASES = {
    "wan2.1-t2v": False,
    "wan2.1-i2v": True,
    "wan2.2-t2v-a14b": False,
    "wan2.2-i2v-a14b": True,
    "wan2.2-ti2v-5b": True,
}
#: Wan 2.1 T2V returns decoded frames (rank 0 decodes); the others their latents (every rank).
OUTPUT = {"wan2.1-t2v": "np"}
#: `diffusers-moc generate` on TI2V-5B from a start image: 2 short shots, per-shot captions, causal routing.
STORYBOARD_YAML = """\
model: Wan-AI/Wan2.2-TI2V-5B-Diffusers
global_prompt: a red car
negative_prompt: blue
seed: 0
max_sequence_length: 16
moc: {top_k: 2, local_window: 1, anchor_own_shot: true, causal: true}
shots:
  - {prompt: a cat walks in the city, num_frames: 5}
  - {prompt: a dog runs on the beach, num_frames: 9}
"""


def generate_args(storyboard: str, output: str) -> list[str]:
    start = os.path.join(ROOT, "examples", "start.png")
    return ["generate", storyboard, "--tiny", "--quiet", "--image", start, "-o", output]


def run_case(model: str, context_parallel: bool):
    """Two shots (5 and 9 frames) under causal MoC with a global caption and per-shot captions."""
    from diffusers_moc import MoCConfig
    from diffusers_moc.distributed import enable_context_parallel
    from diffusers_moc.pipelines import LongVideoPipeline, Shot
    from diffusers_moc.tiny import tiny_wan_components

    size = 64 if model == "wan2.2-ti2v-5b" else 32
    pipe = LongVideoPipeline(**tiny_wan_components(model=model))
    pipe.set_progress_bar_config(disable=True)
    if context_parallel:
        enable_context_parallel(pipe)
    image = None
    if CASES[model]:
        image = PIL.Image.fromarray((np.arange(size * size * 3).reshape(size, size, 3) % 251).astype(np.uint8))
    shots = [Shot("a cat walks in the city", num_frames=5), Shot("a dog runs on the beach", num_frames=9)]
    return pipe(
        shots,
        global_prompt="red car",
        negative_prompt="blue",
        image=image,
        height=size,
        width=size,
        num_inference_steps=2,
        max_sequence_length=16,
        moc_config=MoCConfig(top_k=2, local_window=1, anchor_own_shot=True, causal=True, backend="torch"),
        generator=torch.Generator().manual_seed(0),
        output_type=OUTPUT.get(model, "latent"),
    ).frames


def worker(rank: int, world_size: int, port: int, out_dir: str, storyboard: str) -> None:
    # What torchrun sets: `diffusers-moc generate` reads it (and uses the group initialized here).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from diffusers_moc.cli import main

        results = {model: run_case(model, context_parallel=True) for model in CASES}
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            results["generate"] = main(generate_args(storyboard, os.path.join(out_dir, "cp.mp4")))
        results["generate_stdout"] = stdout.getvalue()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
