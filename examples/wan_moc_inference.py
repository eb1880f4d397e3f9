"""Text-to-video with Wan and Mixture-of-Contexts attention.

python examples/wan_moc_inference.py --tiny                       # offline, random weights, seconds on CPU
python examples/wan_moc_inference.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --top-k 3
"""

from __future__ import annotations

import argparse

import torch
from diffusers import WanPipeline

from diffusers_moc import MoCConfig, apply_moc, moc_context
from diffusers_moc.tiny import tiny_wan_components
from diffusers_moc.video_io import write_videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight model built in-process")
    parser.add_argument("--prompt", default="a red car drives along a river at night")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="*", default=None, help="latent frames per shot")
    parser.add_argument("--output", default="wan_moc.mp4")
    args = parser.parse_args()

    if args.tiny:
        pipe = WanPipeline(**tiny_wan_components())
        size = dict(height=32, width=32, num_frames=9, num_inference_steps=2, max_sequence_length=16)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipe = WanPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        size = dict(height=480, width=832, num_frames=81, num_inference_steps=50)
    apply_moc(pipe.transformer, MoCConfig(top_k=args.top_k))
    with moc_context(shot_frames=args.shots):
        frames = pipe(args.prompt, generator=torch.Generator().manual_seed(0), **size).frames[0]
    write_videos([(args.output, frames)], fps=16)  # complete or absent: written, read back, then renamed
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
