"""`diffusers-moc generate STORYBOARD -o out.mp4`: render a storyboard with `LongVideoPipeline`.

Everything is checked (storyboard, output paths, video writer, device, model family and sizes) before generating,
and the outputs (videos, and with `--routing-map` the picture and its JSON) are written to temporary files, checked
and renamed together only at the end: on any error or Ctrl-C nothing is written (Ctrl-C while they are renamed takes
effect once all are; the message says which). Exit codes: 0 done, 2 bad input (one line naming it), 1 generation
failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..errors import InputError
from . import distributed

__all__ = ["register", "run", "shot_paths"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
#: `--tiny` renders at this size (2x2 patches per latent frame; TI2V-5B's VAE compresses 16x, so 64 there) and step
#: count unless overridden, so it runs in seconds on CPU.
TINY_SIZE, TINY_STEPS = 32, 2
_TINY_SIZES = {"wan2.2-ti2v-5b": 64}


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
    group.add_argument(
        "--model",
        help="model id or folder (a Wan 2.1, Wan 2.2 or HunyuanVideo 1.5 diffusers pipeline); default: the "
        "storyboard's model",
    )
    group.add_argument(
        "--tiny",
        nargs="?",
        const="auto",
        metavar="FAMILY",
        help="tiny random-weight model built in-process (offline smoke run; "
        f"{TINY_SIZE}x{TINY_SIZE}, {TINY_STEPS} steps unless overridden), standing in for the storyboard's model "
        "family, or for FAMILY: wan2.1-t2v, wan2.1-i2v, wan2.2-t2v-a14b, wan2.2-i2v-a14b, wan2.2-ti2v-5b, "
        "hunyuanvideo1.5-t2v, hunyuanvideo1.5-i2v",
    )
    p.add_argument("--image", help="start image of the first shot (overrides the storyboard's image:)")
    p.add_argument(
        "--routing-map",
        metavar="PICTURE",
        help="also write what MoC routed: heatmaps per layer (.png, .pdf or .svg; needs the viz extra) and the "
        "numbers next to it (.json)",
    )
    p.add_argument("--per-shot", action="store_true", help="also write one file per shot (OUTPUT_shot01.mp4, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--height", type=int, help="override the storyboard's height")
    p.add_argument("--width", type=int, help="override the storyboard's width")
    p.add_argument("--steps", type=int, help="override num_inference_steps")
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="transformer/text dtype (auto: bf16 on GPU, else fp32)"
    )
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (less GPU memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    distributed.add_arguments(p)
    p.set_defaults(func=run)


def shot_paths(output: str, num_shots: int) -> list[str]:
    """Per-shot file names next to `output`: `out.mp4` -> `out_shot01.mp4`, ..."""
    stem, ext = os.path.splitext(output)
    width = max(2, len(str(num_shots)))
    return [f"{stem}_shot{i + 1:0{width}d}{ext}" for i in range(num_shots)]


def _check_outputs(paths: list[str], overwrite: bool, routing_map: str | None = None) -> None:
    from ..core.recording import MAP_EXTENSIONS, RoutingMap
    from ..video_io import VIDEO_EXTENSIONS

    for path in paths:
        ext = os.path.splitext(path)[1].lower()
        if ext not in VIDEO_EXTENSIONS:
            raise InputError(f"{path}: the output must end in one of {list(VIDEO_EXTENSIONS)}")
    if routing_map is not None:
        if os.path.splitext(routing_map)[1].lower() not in MAP_EXTENSIONS:
            raise InputError(f"--routing-map {routing_map}: the picture must end in one of {list(MAP_EXTENSIONS)}")
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise InputError('--routing-map needs matplotlib: pip install "diffusers-moc[viz]"')
        paths = [*paths, routing_map, RoutingMap.json_path(routing_map)]
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InputError(f"{path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"{path}: folder {folder} is not writable")
        if os.path.isdir(path):
            raise InputError(f"{path} is a folder")
        if os.path.exists(path) and not overwrite:
            raise InputError(f"{path} exists; pass --overwrite to replace it")
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise InputError(f"output paths collide: {paths}")


def _storyboard(args):
    """The storyboard file, with `--image` in place of its `image:`."""
    from ..pipelines import load_storyboard

    storyboard = load_storyboard(args.storyboard)
    if args.image is not None:
        if not os.path.isfile(args.image):
            raise InputError(f"--image {args.image}: no such file")
        storyboard = storyboard.with_overrides({"image": os.path.abspath(args.image)}, f"{args.storyboard} (--image)")
    return storyboard


def _family(args, storyboard):
    """The model family, known before any model loads (a named error for a model of no known family)."""
    from ..model_families import ALL_FAMILIES, WAN_FAMILIES, UnsupportedModelError, family_of_repo_id, family_of_source

    if args.tiny is not None:
        if args.tiny != "auto":
            if args.tiny not in ALL_FAMILIES:
                raise InputError(f"--tiny {args.tiny}: no such model family; choose one of {list(ALL_FAMILIES)}")
            return ALL_FAMILIES[args.tiny]
        # The storyboard's model family, when it can be told without a download; Wan 2.1 otherwise (said so).
        model = storyboard.model
        if model and os.path.isdir(model):
            try:
                return family_of_source(model)
            except (OSError, ValueError) as e:  # the real run would fail on this folder too
                raise InputError(f"model: {e}") from None
        family = family_of_repo_id(model)
        if family is None and model:
            print(
                f"note: model {model!r} is not a known checkpoint id and --tiny downloads nothing, so the tiny "
                f"model is {WAN_FAMILIES['wan2.1-t2v'].title}; choose one with --tiny FAMILY",
                file=sys.stderr,
            )
        return family or WAN_FAMILIES["wan2.1-t2v"]
    field, model = ("--model", args.model) if args.model else ("model", storyboard.model)
    if not model:
        raise InputError("no model: pass --model ID_OR_PATH, set `model:` in the storyboard, or use --tiny")
    from ..core.config import resolve_pretrained_source

    try:
        resolve_pretrained_source(model)
        return family_of_source(model)
    except (FileNotFoundError, UnsupportedModelError) as e:
        raise InputError(f"{field}: {e}") from None
    except OSError as e:
        if os.path.isdir(model):
            raise InputError(f"{field}: {model}: {e}") from None
        # A mistyped repo id and an unreachable Hub look alike from here; both are the input's to fix.
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(
            f"{field}: cannot read the configuration of {model} from the Hub (a mistyped repo id, a private repo "
            f"without a token, or no network): {first_line}"
        ) from None


def _resolve(args, storyboard, family):
    """The storyboard with the model family's defaults, then `--tiny`'s and the command line's settings."""
    source = args.storyboard
    storyboard = storyboard.with_model_defaults(family.defaults, source)
    overrides = {}
    if args.tiny is not None:
        size = _TINY_SIZES.get(family.name, TINY_SIZE)
        overrides = {"height": size, "width": size, "num_inference_steps": TINY_STEPS}
    for key, value in (("height", args.height), ("width", args.width), ("num_inference_steps", args.steps)):
        if value is not None:
            overrides[key] = value
    if args.seed is not None:
        overrides["seed"] = args.seed
    if overrides:
        storyboard = storyboard.with_overrides(overrides, f"{source} (with command-line overrides)")
    storyboard.check_model(family, source)
    if args.tiny is None:  # a real checkpoint takes long to load: its size rule is checked first (a tiny one: built)
        multiple = family.size_multiple
        for name in ("height", "width"):
            if getattr(storyboard, name) is not None and getattr(storyboard, name) % multiple:
                raise InputError(
                    f"{source}: {name}: {family.title} takes multiples of {multiple} (VAE compression x patch "
                    f"size), got {getattr(storyboard, name)}"
                )
    return storyboard


def _device(args, torch) -> str:
    """`--device`, checked against this torch build; the default is cuda when available, else cpu."""
    if args.device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.cpu_offload and device == "cpu":
            raise InputError("--cpu-offload moves each model to the GPU only while it runs; no GPU is available")
        return device
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {args.device!r}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else "")
        raise InputError(f"--device {args.device}: no {device.type} device is available to {build}; use --device cpu")
    if device.index is not None and hasattr(backend, "device_count") and device.index >= backend.device_count():
        raise InputError(f"--device {args.device}: there are only {backend.device_count()} {device.type} devices")
    if args.cpu_offload and device.type == "cpu":
        raise InputError("--cpu-offload moves each model to the GPU only while it runs; it needs a GPU --device")
    return str(device)


def _load_pipeline(args, storyboard, family, device, dtype):
    import torch

    from ..model_families import HUNYUAN_VIDEO15_FAMILIES
    from ..pipelines import LongVideoPipeline

    if args.tiny is not None and family.name in HUNYUAN_VIDEO15_FAMILIES:
        from ..pipelines import HunyuanVideo15LongVideoPipeline
        from ..tiny import cast_like_from_pretrained
        from ..tiny_hunyuan_video15 import tiny_hunyuan_video15_components

        components = tiny_hunyuan_video15_components(model=family.name)
        for name in ("transformer", "text_encoder", "text_encoder_2", "image_encoder"):
            if components.get(name) is not None and dtype != torch.float32:
                cast_like_from_pretrained(components[name], dtype)
        pipe = HunyuanVideo15LongVideoPipeline(**components)
    elif args.tiny is not None:
        from ..tiny import tiny_wan_components

        # The tiny transformer's RoPE must cover every latent frame of the storyboard (up to Wan 2.1's 1024; past
        # that the model check below refuses the storyboard, as it would with the real model).
        latent_frames = sum((f - 1) // 4 + 1 for f in storyboard.shot_frames)
        rope = min(max(32, latent_frames), 1024)
        components = tiny_wan_components(rope_max_seq_len=rope, dtype=dtype, model=family.name)
        pipe = LongVideoPipeline(**components)
    else:
        pipe = LongVideoPipeline.from_pretrained(args.model or storyboard.model, dtype=dtype)
        pipe.vae.to(torch.float32)  # Wan's VAE is run in float32, as in diffusers' Wan examples
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def _check_fits(pipe, storyboard, source: str) -> None:
    """The storyboard against the loaded model (sizes its RoPE covers, ...), before anything is encoded."""
    try:
        pipe.check_inputs(
            list(storyboard.shots),
            storyboard.global_prompt,
            storyboard.negative_prompt,
            storyboard.height,
            storyboard.width,
            81,  # the default frames of a shot without num_frames / seconds (a storyboard has none such)
            storyboard.fps,
            storyboard.num_inference_steps,
            1,
            "np",
            storyboard.max_sequence_length,
            None,
            image=storyboard.load_image(),
            guidance_scale_2=storyboard.guidance_scale_2,
        )
    except (ValueError, TypeError) as e:
        raise InputError(f"{source}: the model cannot take this storyboard: {e}") from None
    # Prompts longer than max_sequence_length tokens are cut (as diffusers' pipelines cut them): say so.
    prompts = [("global_prompt", storyboard.global_prompt), ("negative_prompt", storyboard.negative_prompt)]
    prompts += [(f"shots[{i}].prompt", shot.prompt) for i, shot in enumerate(storyboard.shots)]
    for name, text in prompts:
        if text:
            tokens = len(pipe.tokenizer(text, add_special_tokens=True, truncation=False).input_ids)
            if tokens > storyboard.max_sequence_length:
                print(
                    f"warning: {source}: {name} is {tokens} tokens; only the first {storyboard.max_sequence_length} "
                    "(max_sequence_length) are used",
                    file=sys.stderr,
                )


def run(args: argparse.Namespace) -> int:
    launch = distributed.launch(args)
    try:
        return _run(args, launch)
    except InputError:
        if launch is not None and not launch.is_main:
            raise SystemExit(2) from None  # every process refuses the same input; rank 0 says why
        raise


def _run(args: argparse.Namespace, launch) -> int:
    from ..video_io import check_video_writer

    storyboard = _storyboard(args)
    family = _family(args, storyboard)
    storyboard = _resolve(args, storyboard, family)
    if launch is not None:
        distributed.check_divisible(args, storyboard, family, launch)
    outputs = [args.output] + (shot_paths(args.output, len(storyboard.shots)) if args.per_shot else [])
    _check_outputs(outputs, args.overwrite, args.routing_map)
    try:
        check_video_writer()
    except RuntimeError as e:
        raise InputError(str(e)) from None

    import torch

    device = _device(args, torch) if launch is None else distributed.device(args, launch, torch)
    if args.dtype == "auto":
        dtype = torch.float32 if args.tiny is not None or torch.device(device).type == "cpu" else torch.bfloat16
    else:
        dtype = getattr(torch, args.dtype)
    with distributed.session(launch, device, args.dist_timeout):
        return _load_and_generate(args, launch, storyboard, family, device, dtype, outputs)


def _load_and_generate(args, launch, storyboard, family, device, dtype, outputs: list[str]) -> int:
    import torch

    main = launch is None or launch.is_main
    pipe = _load_pipeline(args, storyboard, family, device, dtype)
    if storyboard.model_chosen:  # HunyuanVideo 1.5: the size and guidance the loaded model picks
        storyboard = storyboard.with_model_settings(pipe.default_settings(storyboard.load_image()), args.storyboard)
    if launch is not None:
        from ..distributed import enable_context_parallel

        enable_context_parallel(pipe, launch.degree)
    _check_fits(pipe, storyboard, args.storyboard)
    pipe.set_progress_bar_config(disable=args.quiet or not main)
    generator = None
    if storyboard.seed is not None:
        # A CPU generator gives the same noise on every device.
        generator = torch.Generator(device="cpu").manual_seed(storyboard.seed)
    parallel = f", {launch.degree} processes (context parallel)" if launch is not None else ""
    if main:
        print(
            f"generating {len(storyboard.shots)} shots, {storyboard.num_frames} frames ({storyboard.duration:.1f} s at "
            f"{storyboard.fps:g} fps), {storyboard.width}x{storyboard.height}, {storyboard.num_inference_steps} steps, "
            f"{family.title}{' (tiny)' if args.tiny is not None else ''}"
            f"{', from an image' if storyboard.image else ''}, {str(dtype).removeprefix('torch.')} on {device}"
            f"{parallel}",
            file=sys.stderr,
        )
    try:
        return _generate_and_write(args, pipe, storyboard, generator, outputs)
    except KeyboardInterrupt as e:
        raise _interrupted(e) from e


def _generate_and_write(args, pipe, storyboard, generator, outputs: list[str]) -> int:
    from ..core.atomic import remove_path
    from ..core.recording import moc_routing_map
    from ..video_io import InterruptedAfterWriting, write_videos

    recording = moc_routing_map() if args.routing_map else contextlib.nullcontext()
    with recording as routing_map:
        out = pipe(**storyboard.pipeline_kwargs(), generator=generator, output_type="np")
    if out.frames is None:  # another process of the context-parallel group: rank 0 decodes and writes
        return 0
    video = out.frames[0]
    items = [(args.output, video)]
    if args.per_shot:
        bounds = [*out.shot_starts, video.shape[0]]
        items += [(p, video[a:b]) for p, a, b in zip(outputs[1:], bounds[:-1], bounds[1:])]
    # The routing map is rendered first, then renamed into place together with the videos.
    staged: list[tuple[str, str]] = []
    written: list[str] = []
    try:
        try:
            if routing_map is not None:
                staged = routing_map.write_temporary(args.routing_map)
            written = write_videos(items, fps=storyboard.fps, extra=staged)
        finally:
            for tmp, _ in staged:
                remove_path(tmp)
        for path in written:
            print(f"wrote {path}")
    except KeyboardInterrupt as e:
        if written and not isinstance(e, InterruptedAfterWriting):  # Ctrl-C after write_videos returned
            raise InterruptedAfterWriting(written) from e
        raise
    return 0


def _interrupted(error: KeyboardInterrupt) -> KeyboardInterrupt:
    """Ctrl-C (or SIGTERM) during `generate`, saying whether the outputs were written: all of them, or none."""
    from ..video_io import InterruptedAfterWriting

    if isinstance(error, InterruptedAfterWriting):
        return KeyboardInterrupt(
            f"the outputs were all written, complete, before it took effect: {', '.join(error.paths)}"
        )
    return KeyboardInterrupt("no output was written")
