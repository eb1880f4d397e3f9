"""The video streams of the models MoC supports through [`MoCDispatchAttnProcessor`]: how each one's latent frame
grid, and any context before the video, follow from a forward call's input shapes and the model config."""

from __future__ import annotations

import math

import torch

from .attention_processors.base import MoCAttnProcessorBase, frames_from_rotary, grid_5d, patch_sizes
from .attention_processors.generic import VideoStream

__all__ = ["call_arg", "grid_5d", "helios_history", "kandinsky5_grid", "ltx2_grid", "minimax_h3_grid"]


# Argument `name` of a forward call, passed by keyword or at position `index`: the processors' own reader.
call_arg = MoCAttnProcessorBase._call_arg


# Helios' history inputs in stream order (the model puts long, then mid, then short history before the video): the
# factor by which each one's patch is coarser than the video's, the multiples `pad_for_3d_conv` pads it to, and the
# position of its frame indices in the forward's arguments (its latents come 3 later).
_HELIOS_HISTORY = (("long", 4, (4, 8, 8), 6), ("mid", 2, (2, 4, 4), 5), ("short", 1, None, 4))


def helios_history(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, ...]:
    r"""
    The chunks of Helios' compressed history, one per history latent frame at its own resolution, in stream order.
    A history input counts only when its frame indices are given too, as in the model's forward.
    """
    p_t, p_h, p_w = patch_sizes(transformer)
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


def ltx2_grid(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    r"""
    LTX-2's video grid: its `hidden_states` come patchified, `(B, L, C)`, so the grid is the forward's latent
    `num_frames`, `height` and `width` (what `LTX2Pipeline` passes) in patches, as its RoPE lays them out; a call that
    gives only `video_coords` has its grid read off their time coordinates (a host read, in eager mode only).
    """
    grid = tuple(call_arg(args, kwargs, name, i) for name, i in (("num_frames", 10), ("height", 11), ("width", 12)))
    if all(n is not None for n in grid):
        p_t, p_h, p_w = patch_sizes(transformer)
        return tuple(-(-int(n) // p) for n, p in zip(grid, (p_t, p_h, p_w)))  # the RoPE's `arange(0, n, p)`
    coords = call_arg(args, kwargs, "video_coords", 15)
    if coords is None:
        raise ValueError(
            "MoC on LTX-2 needs the latent grid of the call: pass num_frames, height and width (as LTX2Pipeline does) "
            "or video_coords"
        )
    if torch.compiler.is_compiling():
        raise ValueError(
            "under torch.compile / torch.export MoC on LTX-2 needs num_frames, height and width (the grid of "
            "video_coords can only be read on the host)"
        )
    time = coords[0, 0, :, 0].float()[:, None]  # (L, 1): each token's first pixel frame
    frames, per_frame = frames_from_rotary((time, torch.zeros_like(time)))
    return frames, 1, per_frame


LTX2 = VideoStream(grid=ltx2_grid)


def kandinsky5_grid(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    r"""
    Kandinsky 5's video grid: `hidden_states` are channels-last, `(B, F, H, W, C)`, patchified by `config.patch_size`
    and flattened in `(frame, row, column)` order. Its NABLA mode (`sparse_params`, for `attention_type="nabla"`) is
    sparse attention already, with a block mask MoC cannot add to: it is refused by name.
    """
    if call_arg(args, kwargs, "sparse_params", 7) is not None:
        raise NotImplementedError(
            "MoC does not combine with Kandinsky 5's NABLA sparse attention (`sparse_params`, set by pipelines for "
            "`attention_type='nabla'`): both are sparse attention; use the model with `attention_type='regular'`"
        )
    _, frames, height, width, _ = call_arg(args, kwargs, "hidden_states").shape
    p_t, p_h, p_w = patch_sizes(transformer)
    return frames // p_t, height // p_h, width // p_w


KANDINSKY5 = VideoStream(grid=kandinsky5_grid)
