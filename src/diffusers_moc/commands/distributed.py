"""`diffusers-moc generate` on several processes (`torchrun`, `accelerate launch`): its flags, its device, and the
context-parallel checks made before any model loads."""

from __future__ import annotations

import contextlib
import inspect

from ..errors import InputError

__all__ = ["add_arguments", "check_divisible", "device", "launch", "session"]


def add_arguments(p) -> None:
    p.add_argument(
        "--context-parallel",
        type=int,
        metavar="N",
        help="under torchrun or accelerate launch: Ulysses context parallelism over N processes (default: all of "
        "them; N must be the number of processes, and divide the attention heads and the video tokens)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="with several processes: how long one waits for the others in a collective before failing (default: "
        "600), so a process killed without a word cannot leave the others waiting forever",
    )


def launch(args):
    """The multi-process launch from the environment (`None`: one process), checked against the flags."""
    from ..distributed import launch_from_env

    try:
        found = launch_from_env(args.context_parallel)
    except ValueError as e:
        raise InputError(f"--context-parallel: {e}") from None
    if found is None:
        return None
    if args.dist_timeout <= 0:
        raise InputError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout:g}")
    if args.routing_map:
        raise InputError(
            "--routing-map is not available with context parallelism: each process routes only its share of the heads"
        )
    if args.cpu_offload:
        raise InputError("--cpu-offload is not supported with context parallelism; each process holds its models")
    return found


def device(args, found, torch) -> str:
    """This process's device: `cuda:LOCAL_RANK` when CUDA is available (or `--device cuda`), else `cpu`."""
    if args.device is None:
        return f"cuda:{found.local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {args.device!r}: not a torch device (e.g. cpu, cuda)") from None
    if chosen.type == "cpu":
        return "cpu"
    if chosen.type == "cuda" and chosen.index is None and torch.cuda.is_available():
        return f"cuda:{found.local_rank}"
    raise InputError(
        f"--device {args.device}: with several processes each one uses cuda:LOCAL_RANK (--device cuda) or the CPU "
        "(--device cpu)"
    )


def _transformer_shape(args, storyboard) -> tuple[str, int, tuple[int, ...]]:
    """`(model, attention heads, patch size)` of the transformer, read from its config (no weights load)."""
    if args.tiny is not None:
        from ..tiny import tiny_wan_components

        return "the tiny model", inspect.signature(tiny_wan_components).parameters["heads"].default, (1, 2, 2)
    from diffusers import WanTransformer3DModel

    model = args.model or storyboard.model
    error = None
    for subfolder in ("transformer", "transformer_2"):  # a Wan 2.2 A14B folder may hold only its low-noise expert
        try:
            config = WanTransformer3DModel.load_config(model, subfolder=subfolder)
            return model, int(config["num_attention_heads"]), tuple(config["patch_size"])
        except (OSError, ValueError, KeyError) as e:
            error = e
    raise InputError(f"{model}: cannot read the transformer's config for the context-parallel check: {error}")


def check_divisible(args, storyboard, family, found) -> None:
    """Refuse heads or video tokens that the context-parallel degree does not divide, before any model loads."""
    from ..core.parallel import check_ulysses_divisible
    from ..pipelines.long_video import video_tokens

    model, heads, patch = _transformer_shape(args, storyboard)
    latent_frames = sum((f - 1) // 4 + 1 for f in storyboard.shot_frames)  # every Wan VAE compresses 4x in time
    spatial = family.size_multiple // 2  # size_multiple is the VAE's spatial compression times 2 x 2 patches
    tokens = video_tokens(latent_frames, storyboard.height, storyboard.width, spatial, patch)
    try:
        check_ulysses_divisible(found.degree, heads, tokens)
    except ValueError as e:
        raise InputError(
            f"--context-parallel {found.degree}: {e} ({model}: {heads} heads; {storyboard.width}x"
            f"{storyboard.height}, {latent_frames} latent frames: {tokens} tokens)"
        ) from None


def session(found, device_name: str, timeout: float):
    """The process group for the run (nothing for one process)."""
    if found is None:
        return contextlib.nullcontext()
    from ..distributed import process_group

    return process_group(found, device_name, timeout)
