"""Writing videos to disk all-or-nothing: every file goes to a temporary name first and is renamed at the end."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np

__all__ = ["VIDEO_EXTENSIONS", "check_video_writer", "to_uint8", "write_videos"]

#: Containers the writers below produce with H.264.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv")


def check_video_writer() -> str:
    r"""
    Name of an available video writer: `"imageio"` (imageio + imageio-ffmpeg) or `"av"` (PyAV).

    Raises:
        `RuntimeError`: if neither is installed.
    """
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401

        return "imageio"
    except ImportError:
        pass
    try:
        import av  # noqa: F401

        return "av"
    except ImportError:
        raise RuntimeError(
            "writing videos needs imageio with imageio-ffmpeg, or av: `pip install imageio imageio-ffmpeg`"
        ) from None


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """`(frames, height, width, 3)` floats in [0, 1] (as pipelines return them) or uint8 -> uint8."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected video frames shaped (frames, height, width, 3), got {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def _write(path: str, frames: np.ndarray, fps: float, writer: str) -> None:
    if writer == "imageio":
        import imageio.v2 as imageio

        # macro_block_size=1: keep the exact size (ffmpeg would otherwise pad to multiples of 16).
        with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1) as w:
            for frame in frames:
                w.append_data(frame)
        return
    from fractions import Fraction

    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_videos(outputs: Sequence[tuple[str | os.PathLike, np.ndarray]], fps: float) -> list[str]:
    r"""
    Write several videos all-or-nothing.

    Each video is written to a temporary file next to its destination and only renamed into place once all of
    them are written; on any error the temporary files are removed and no destination is touched.

    Args:
        outputs (`Sequence[tuple[path, frames]]`): destination path (`.mp4`, `.mov` or `.mkv`) and frames
            `(frames, height, width, 3)` (float in [0, 1] or uint8).
        fps (`float`): frame rate.

    Returns:
        `list[str]`: the written paths.
    """
    writer = check_video_writer()
    for path, _ in outputs:
        ext = os.path.splitext(os.fspath(path))[1].lower()
        if ext not in VIDEO_EXTENSIONS:
            raise ValueError(f"{path}: video files must end in one of {list(VIDEO_EXTENSIONS)}")
    temps: list[tuple[str, str]] = []
    try:
        for path, frames in outputs:
            path = os.fspath(path)
            folder, name = os.path.split(os.path.abspath(path))
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1], dir=folder)
            os.close(fd)
            temps.append((tmp, path))
            _write(tmp, to_uint8(frames), fps, writer)
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in temps:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
            os.replace(tmp, path)
        return [path for _, path in temps]
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
