"""Writing videos to disk all-or-nothing: each file is written under a temporary name, read back, then renamed."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence

import numpy as np

from .core.atomic import deferred_interrupts, pause_point, remove_path, remove_stale_partials

__all__ = [
    "MAX_FPS",
    "MIN_FPS",
    "VIDEO_EXTENSIONS",
    "InterruptedAfterWriting",
    "check_video_writer",
    "to_uint8",
    "verify_video",
    "write_videos",
]

#: Containers the writers below produce with H.264.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv")
#: Frame rates written (ffmpeg rounds rates far below 0.01 to 0 and fails; H.264 in these containers is exact up to
#: about 1000 fps with a 1/1001 time base).
MIN_FPS, MAX_FPS = 0.01, 1000.0


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
    if len(frames) == 0:
        raise ValueError("no frames to write")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    if frames.dtype == np.uint8:
        return frames
    if not np.isfinite(frames).all():
        # Would be written as black or garbage pixels; a model that overflowed (e.g. in float16) did not make a video.
        raise ValueError("the frames hold NaN or infinite values; nothing written (try --dtype bfloat16 or float32)")
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


def _check_fps(fps: float) -> float:
    if (
        isinstance(fps, bool)
        or not isinstance(fps, (int, float))
        or not math.isfinite(fps)
        or not MIN_FPS <= fps <= MAX_FPS
    ):
        raise ValueError(f"fps must be a number in [{MIN_FPS}, {MAX_FPS}], got {fps!r}")
    return float(fps)


def verify_video(path: str, num_frames: int, fps: float, name: str | None = None) -> None:
    r"""
    Check that `path` is a readable video with `num_frames` frames at `fps`: the writers (ffmpeg in a subprocess for
    imageio) can fail without raising, leaving an empty, missing or truncated file.

    Args:
        name (`str`, *optional*): the file to name in errors (the destination of a temporary file).

    Raises:
        `OSError`: naming the file and what is wrong.
    """
    import av

    what = name or path
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise OSError(f"the video writer produced no data for {what} (see the ffmpeg messages above)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise OSError(f"the video writer wrote {what} without a video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as e:
        raise OSError(f"the video writer wrote an unreadable file for {what}: {e}") from None
    if frames != num_frames:
        raise OSError(f"the video writer wrote {frames} of {num_frames} frames for {what}")
    if rate is None or abs(float(rate) - fps) > 1e-3 * fps:
        raise OSError(f"the video writer wrote {what} at {rate} fps instead of {fps:g}")


class InterruptedAfterWriting(KeyboardInterrupt):
    r"""
    Ctrl-C (or SIGTERM) came while [`write_videos`] was putting the outputs in place; it took effect once they all
    were, so they are complete.

    Attributes:
        paths (`list[str]`): the written files.
    """

    def __init__(self, paths: Sequence[str]):
        super().__init__(f"the outputs were complete before it took effect: {', '.join(paths)}")
        self.paths = list(paths)


#: The file `_disk_full` writes into a temporary folder to learn whether its disk is full.
_SPACE_PROBE = ".space-probe"
_PROBE_BYTES = 1 << 16
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(error: BaseException, tmp_dir: str) -> int | None:
    r"""
    Whether a failed write into `tmp_dir` failed for lack of space: `errno.ENOSPC` or `errno.EDQUOT`, else `None`.

    ffmpeg writes in a subprocess: its "No space left on device" reaches this process only as a broken pipe, or as a
    file that reads back empty or cut short. So the disk is asked directly, by writing a little into the same folder
    while the partial video still takes its space.
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    probe = os.path.join(tmp_dir, _SPACE_PROBE)
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno if e.errno in _FULL_ERRNOS else None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None


def _make_temporary_folder(path: str, folders: list[str]) -> str:
    """A new hidden folder next to `path` to write it in, named with the pid (see `remove_stale_partials`)."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp_dir = os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    folders.append(tmp_dir)  # listed before it exists: an interrupt right after mkdir still removes it
    os.mkdir(tmp_dir)
    return tmp_dir


@contextlib.contextmanager
def _full_disk_named(path: str, tmp_dir: str) -> Iterator[None]:
    """An error writing or reading back `path` in `tmp_dir` becomes one that says the disk is full, when it is."""
    try:
        yield
    except Exception as e:
        code = _disk_full(e, tmp_dir)
        if code is None:
            raise
        folder = os.path.dirname(os.path.abspath(path))
        raise OSError(
            code, f"{os.strerror(code)}: the disk is full (writing {path} in {folder}); nothing was written"
        ) from e


def _commit(moves: list[tuple[str, str]], on_disk: list[str]) -> None:
    """Rename the checked temporary files into place, all or none: when a rename fails, the destinations already
    replaced get their previous files back (those created are removed). `on_disk` lists the destinations once all
    are there."""
    for _, path in moves:
        if os.path.isdir(path) and not os.path.islink(path):
            raise IsADirectoryError(errno.EISDIR, "a folder is in the way of an output", path)
    umask = os.umask(0)
    os.umask(umask)
    placed: list[tuple[str, str | None]] = []  # (destination, second name of its previous file)
    with deferred_interrupts():  # Ctrl-C and SIGTERM wait for the renames: the outputs are all there, or none
        try:
            for i, (tmp, path) in enumerate(moves):
                os.chmod(tmp, 0o666 & ~umask)  # give the usual permissions of a new file
                placed.append((path, _keep_previous(path, tmp)))
                os.replace(tmp, path)
                if i == 0:
                    pause_point("write_videos:moving")
        except BaseException:
            _put_back(placed)
            raise
        for _, previous in placed:
            if previous is not None:
                remove_path(previous)
        on_disk[:] = [path for _, path in moves]


def _keep_previous(path: str, tmp: str) -> str | None:
    """A second name, next to `tmp`, for the file at `path` (if any): a hard link, so that `path` holds the old or the
    new file at every moment (a process killed in between loses nothing), or a copy where links are not supported."""
    if not os.path.lexists(path):
        return None
    previous = tmp + ".previous"
    try:
        os.link(path, previous, follow_symlinks=False)
    except (OSError, NotImplementedError):  # no hard links on this file system (or for links on this platform)
        shutil.copy2(path, previous, follow_symlinks=False)
    return previous


def _put_back(placed: list[tuple[str, str | None]]) -> None:
    for path, previous in reversed(placed):
        with contextlib.suppress(OSError):  # the error that stopped the renames is the one raised
            if previous is None:
                remove_path(path)
            else:
                os.replace(previous, path)


def write_videos(
    outputs: Sequence[tuple[str | os.PathLike, np.ndarray]], fps: float, extra: Sequence[tuple[str, str]] = ()
) -> list[str]:
    r"""
    Write several videos all-or-nothing.

    Each video is written into a temporary folder next to its destination, checked (frame count and rate, read back
    with PyAV) and only moved into place once all of them are written and checked; on any error or interruption the
    temporary folders are removed and no destination is touched; a rename into place that fails puts back the
    destinations already replaced. (A folder, not a file: ffmpeg runs in a subprocess and could still create a
    temporary file after it was removed; it cannot create a removed folder.) Ctrl-C while they are moved into place
    takes effect once all are, as [`InterruptedAfterWriting`].

    Args:
        outputs (`Sequence[tuple[path, frames]]`): destination path (`.mp4`, `.mov` or `.mkv`) and frames
            `(frames, height, width, 3)` (float in [0, 1] or uint8).
        fps (`float`): frame rate, in `[0.01, 1000]`.
        extra (`Sequence[tuple[str, str]]`): other outputs already written to temporary files, as `(temporary file,
            destination)`: renamed into place together with the videos, removed if the videos fail.

    Returns:
        `list[str]`: the written paths (videos, then the `extra` destinations).

    Raises:
        `ValueError` for bad arguments; `OSError` when a video cannot be written (with `errno.ENOSPC` and a message
        saying so when the disk is full) or reads back wrong; [`InterruptedAfterWriting`] (a `KeyboardInterrupt`)
        for Ctrl-C that came once the outputs were being put in place.
    """
    writer = check_video_writer()
    fps = _check_fps(fps)
    for path, _ in outputs:
        ext = os.path.splitext(os.fspath(path))[1].lower()
        if ext not in VIDEO_EXTENSIONS:
            raise ValueError(f"{path}: video files must end in one of {list(VIDEO_EXTENSIONS)}")
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(folder):
            raise ValueError(f"{path}: folder {folder} does not exist")
    outputs = [(path, to_uint8(frames)) for path, frames in outputs]  # every video checked before any is written
    folders: list[str] = []
    on_disk: list[str] = []  # filled inside the deferred renames: the outputs are complete
    try:
        try:
            moves = []
            for path, frames in outputs:
                path = os.fspath(path)
                remove_stale_partials(*os.path.split(os.path.abspath(path)))
                tmp_dir = _make_temporary_folder(path, folders)
                tmp = os.path.join(tmp_dir, os.path.basename(path))
                with _full_disk_named(path, tmp_dir):
                    _write(tmp, frames, fps, writer)
                moves.append((tmp, path, len(frames)))
            pause_point("write_videos:written")
            for (tmp, path, num_frames), tmp_dir in zip(moves, folders):
                with _full_disk_named(path, tmp_dir):
                    verify_video(tmp, num_frames, fps, name=path)
            pause_point("write_videos:verified")
            _commit([(tmp, path) for tmp, path, _ in moves] + list(extra), on_disk)
        finally:
            with deferred_interrupts():
                for tmp_dir in folders:
                    remove_path(tmp_dir)
                for tmp, _ in extra:
                    remove_path(tmp)
    except KeyboardInterrupt as e:
        if on_disk and not isinstance(e, InterruptedAfterWriting):
            raise InterruptedAfterWriting(on_disk) from e
        raise
    return on_disk
