"""`diffusers-moc generate STORYBOARD -o out.mp4`: render a storyboard with `LongVideoPipeline`.

Everything is checked (storyboard, output paths, video writer, model) before generating, and the videos are written
to temporary files that are renamed only at the end: on any error nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["register", "run", "shot_paths"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
#: `--tiny` renders at this size and step count unless overridden, so it runs in seconds on CPU.
TINY_SIZE, TINY_STEPS = 32, 2


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="render a multi-shot storyboard (YAML/JSON) to a video with LongVideoPipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("storyboard", help="storyboard file (.yaml, .yml or .json)")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4, .mov or .mkv)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", help="model id or folder (Wan 2.1 T2V, diffusers format); default: storyboard's")
    group.add_argument(
        "--tiny",
        action="store_true",
        help=f"tiny random-weight model built in-process (offline smoke run; {TINY_SIZE}x{TINY_SIZE}, "
        f"{TINY_STEPS} steps unless overridden)",
    )
    p.add_argument("--per-shot", action="store_true", help="also write one file per shot (OUTPUT_shot01.mp4, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--height", type=int, help="override the storyboard's height")
    p.add_argument("--width", type=int, help="override the storyboard's width")
    p.add_argument("--steps", type=int, help="override num_inference_steps")
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="transformer/text dtype (auto: bf16 on GPU)")
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (less GPU memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def shot_paths(output: str, num_shots: int) -> list[str]:
    """Per-shot file names next to `output`: `out.mp4` -> `out_shot01.mp4`, ..."""
    stem, ext = os.path.splitext(output)
    width = max(2, len(str(num_shots)))
    return [f"{stem}_shot{i + 1:0{width}d}{ext}" for i in range(num_shots)]


def _check_outputs(paths: list[str], overwrite: bool) -> None:
    from ..video_io import VIDEO_EXTENSIONS

    for path in paths:
        ext = os.path.splitext(path)[1].lower()
        if ext not in VIDEO_EXTENSIONS:
            raise ValueError(f"{path}: the output must end in one of {list(VIDEO_EXTENSIONS)}")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"{path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{path}: folder {folder} is not writable")
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder")
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")


def _load_pipeline(args, storyboard, device, dtype):
    import torch

    from ..pipelines import LongVideoPipeline

    if args.tiny:
        from ..tiny import tiny_wan_components

        # The tiny transformer's RoPE must cover every latent frame of the storyboard.
        latent_frames = sum((f - 1) // 4 + 1 for f in storyboard.shot_frames)
        pipe = LongVideoPipeline(**tiny_wan_components(rope_max_seq_len=max(32, latent_frames)))
        return pipe.to(device)
    model = args.model or storyboard.model
    pipe = LongVideoPipeline.from_pretrained(model, dtype=dtype)
    pipe.vae.to(torch.float32)  # Wan's VAE is run in float32, as in diffusers' Wan examples
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def run(args: argparse.Namespace) -> int:
    from ..pipelines import StoryboardError, load_storyboard
    from ..video_io import check_video_writer, write_videos

    try:
        storyboard = load_storyboard(args.storyboard)
        overrides = {}
        if args.tiny:
            overrides = {"height": TINY_SIZE, "width": TINY_SIZE, "num_inference_steps": TINY_STEPS}
        for key, value in (("height", args.height), ("width", args.width), ("num_inference_steps", args.steps)):
            if value is not None:
                overrides[key] = value
        if args.seed is not None:
            overrides["seed"] = args.seed
        if overrides:
            storyboard = type(storyboard).from_dict(
                {**storyboard.to_dict(), **overrides}, source=f"{args.storyboard} (with command-line overrides)"
            )
        outputs = [args.output] + (shot_paths(args.output, len(storyboard.shots)) if args.per_shot else [])
        _check_outputs(outputs, args.overwrite)
        if len(set(map(os.path.abspath, outputs))) != len(outputs):
            raise ValueError(f"output paths collide: {outputs}")
        check_video_writer()
        if not args.tiny and not (args.model or storyboard.model):
            raise ValueError("no model: pass --model ID_OR_PATH, set `model:` in the storyboard, or use --tiny")
    except (StoryboardError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.float32 if args.tiny or torch.device(device).type == "cpu" else torch.bfloat16
    else:
        dtype = getattr(torch, args.dtype)
    try:
        pipe = _load_pipeline(args, storyboard, device, dtype)
        pipe.set_progress_bar_config(disable=args.quiet)
        generator = None
        if storyboard.seed is not None:
            # A CPU generator gives the same noise on every device.
            generator = torch.Generator(device="cpu").manual_seed(storyboard.seed)
        print(
            f"generating {len(storyboard.shots)} shots, {storyboard.num_frames} frames ({storyboard.duration:.1f} s at "
            f"{storyboard.fps:g} fps), {storyboard.width}x{storyboard.height}, {storyboard.num_inference_steps} steps",
            file=sys.stderr,
        )
        out = pipe(**storyboard.pipeline_kwargs(), generator=generator, output_type="np")
        video = out.frames[0]
        items = [(args.output, video)]
        if args.per_shot:
            bounds = [*out.shot_starts, video.shape[0]]
            items += [(p, video[a:b]) for p, a, b in zip(outputs[1:], bounds[:-1], bounds[1:])]
        written = write_videos(items, fps=storyboard.fps)
    except (StoryboardError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0
