"""The video streams of the models MoC supports through [`MoCDispatchAttnProcessor`]: how each one's latent frame
grid, and any context before the video, follow from a forward call's input shapes and the model config."""

from __future__ import annotations

import math

import torch

from .attention_processors.generic import VideoStream

__all__ = ["call_arg", "grid_5d", "helios_history", "minimax_h3_grid"]


def call_arg(args: tuple, kwargs: dict, name: str, index: int = 0):
    """Argument `name` of a forward call, passed by keyword or at position `index`."""
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _patch(transformer: torch.nn.Module) -> tuple[int, int, int]:
    config = transformer.config
    patch = config.patch_size
    if isinstance(patch, int):  # models that give the time patch separately
        return getattr(config, "patch_size_t", 1) or 1, patch, patch
    return tuple(patch)


def grid_5d(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """Post-patchify grid of a `hidden_states` shaped `(B, C, F, H, W)`, patchified by `config.patch_size`."""
    _, _, frames, height, width = call_arg(args, kwargs, "hidden_states").shape
    p_t, p_h, p_w = _patch(transformer)
    return frames // p_t, height // p_h, width // p_w


# Helios' history inputs in stream order (the model puts long, then mid, then short history before the video): the
# factor by which each one's patch is coarser than the video's, the multiples `pad_for_3d_conv` pads it to, and the
# position of its frame indices in the forward's arguments (its latents come 3 later).
_HELIOS_HISTORY = (("long", 4, (4, 8, 8), 6), ("mid", 2, (2, 4, 4), 5), ("short", 1, None, 4))


def helios_history(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, ...]:
    r"""
    The chunks of Helios' compressed history, one per history latent frame at its own resolution, in stream order.
    A history input counts only when its frame indices are given too, as in the model's forward.
    """
    p_t, p_h, p_w = _patch(transformer)
    sizes: list[int] = []
    for name, factor, pad, index in _HELIOS_HISTORY:
        latents = call_arg(args, kwargs, f"latents_history_{name}", index + 3)
        indices = call_arg(args, kwargs, f"indices_latents_history_{name}", index)
        if latents is None or indices is None:
            continue
        shape = latents.shape[2:]
        if pad is not None:
            shape = tuple(math.ceil(n / m) * m for n, m in zip(shape, pad))
        frames, height, width = (n // (factor * p) for n, p in zip(shape, (p_t, p_h, p_w)))
        sizes += [height * width] * frames
    return tuple(sizes)


HELIOS = VideoStream(grid=grid_5d, prefix=helios_history)

# Wan-Animate: `hidden_states` is `(B, 2C + 4, T + 1, H, W)`, the reference image as its first latent frame.
WAN_ANIMATE = VideoStream(grid=grid_5d)


def minimax_h3_grid(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    r"""
    The grid of the generated video of MiniMax-H3's packed sequence, `[text | conditions | audio | video]`.

    The model takes the video already patchified into rows, so no input shape holds its grid: it is read off the
    `(t, h, w)` rotary coordinates of the rows that close the sequence (on the host, once per forward). The video is
    the trailing run of `video_indices` that ends the sequence, cut into frames where the time coordinate changes;
    frames are taken from the end while each one is one time value, later than the one before it, and as large as
    the last. Rows before them (an adjacent keyframe condition) stay with the conditions.
    """
    positions = call_arg(args, kwargs, "position_ids", 6)
    video = call_arg(args, kwargs, "video_indices", 7).detach().to("cpu", torch.long)
    length = positions.shape[0]
    trailing = video == torch.arange(length - video.numel(), length)
    run = int(trailing.flip(0).cumprod(0).sum())
    if run == 0:
        raise ValueError("MoC expects MiniMax-H3's generated video rows to close the packed sequence; none do")
    rows = positions[length - run :].detach().to("cpu", torch.float64)
    time = rows[:, 0]
    changes = torch.nonzero(time[1:] != time[:-1]).flatten()
    per_frame = run - (int(changes[-1]) + 1 if changes.numel() else 0)
    frames = 0
    while (frames + 1) * per_frame <= run:
        frame = time[run - (frames + 1) * per_frame : run - frames * per_frame]
        later = frames == 0 or bool(frame[0] < time[run - frames * per_frame])
        if not (later and bool((frame == frame[0]).all())):
            break
        frames += 1
    height = int(torch.unique(rows[run - per_frame :, 1]).numel())
    if per_frame % height:
        raise ValueError(f"MiniMax-H3's last video frame has {per_frame} rows, not a grid of {height} rows")
    return frames, height, per_frame // height


MINIMAX_H3 = VideoStream(grid=minimax_h3_grid, text="before")
"""MiniMax-H3: everything before the generated video (text, keyframe or reference conditions, audio) is one anchor
chunk."""


MOTIF_VIDEO = VideoStream(grid=grid_5d, text="after")
"""Motif-Video: its joint attention concatenates the caption (and image embeddings) after the video; the decoder
blocks' context (the encoder's video output) takes the caption's place."""
