"""Generate a video with Wan + MoC on several processes with diffusers' Ulysses context parallelism.

Every rank holds a slice of the token sequence; MoC attention exchanges it for a slice of the heads around routing.

    # 4 GPUs, one node
    torchrun --nproc_per_node=4 examples/context_parallel_wan.py \\
        --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --num-frames 81 --output moc.mp4

    # 2 CPU processes, tiny random model (offline; writes context_parallel.mp4, or frames with --output x.npy)
    torchrun --nproc_per_node=2 examples/context_parallel_wan.py --tiny

The number of heads and of video tokens must be divisible by the number of processes.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="Wan checkpoint (Hub id or folder)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny random Wan pipeline (offline, CPU)")
    parser.add_argument("--prompt", default="a red car drives along a street at night")
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="context_parallel.mp4", help="*.mp4, *.mov, *.mkv or *.npy (raw frames)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from diffusers import ContextParallelConfig, WanPipeline

    from diffusers_moc import MoCConfig, apply_moc

    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # diffusers 0.42.1 derives the rank's device as `rank % torch.accelerator.device_count()`, a division by
        # zero without an accelerator; on CPU the device index is irrelevant.
        torch.accelerator.device_count = lambda: 1

    if args.tiny:
        from diffusers_moc.tiny import tiny_wan_components

        pipe = WanPipeline(**tiny_wan_components())
        defaults = {"num_frames": 9, "height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 16}
    else:
        pipe = WanPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
        defaults = {"num_frames": 81, "height": 480, "width": 832, "num_inference_steps": 50}
    pipe.to(device)
    pipe.set_progress_bar_config(disable=rank != 0)

    # MoC first, then parallelism (the other order works too: apply_moc keeps the parallel config).
    apply_moc(pipe.transformer, MoCConfig(top_k=args.top_k))
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    call = dict(defaults)
    for key, value in (("num_frames", args.num_frames), ("height", args.height), ("width", args.width)):
        if value is not None:
            call[key] = value
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    # Every rank must start from the same noise: same seed everywhere.
    generator = torch.Generator(device=device).manual_seed(args.seed)
    frames = pipe(args.prompt, generator=generator, output_type="np", **call).frames[0]

    if rank == 0:
        if args.output.endswith(".npy"):
            np.save(args.output, frames)
        else:
            from diffusers_moc.video_io import write_videos

            write_videos([(args.output, frames)], fps=16)  # complete or absent
        print(f"wrote {args.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
