"""All-or-nothing file system steps: deferred Ctrl-C, folder replacement, and pause points for interruption tests.

An output is written under a temporary name and renamed into place once complete (a rename is atomic on one file
system), so an interrupted command leaves either the old state or the complete new one. The few steps that must not
be cut in the middle by Ctrl-C or SIGTERM (a rename pair, the removal of temporary files) run inside
`deferred_interrupts()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator

__all__ = [
    "PAUSE_ENV",
    "PAUSE_FILE_ENV",
    "deferred_interrupts",
    "pause_point",
    "recover_replaced_dir",
    "remove_path",
    "remove_stale_partials",
    "replace_dir",
    "write_text_atomic",
]

#: Test hook: the name of the pause point to stop at (see `pause_point`).
PAUSE_ENV = "DIFFUSERS_MOC_PAUSE_AT"
#: Test hook: the file `pause_point` creates once it is paused (the signal to the test that it may kill now).
PAUSE_FILE_ENV = "DIFFUSERS_MOC_PAUSE_FILE"


def pause_point(name: str) -> None:
    r"""
    A named moment inside a multi-step write, where interruption tests stop the process.

    When the environment variable `DIFFUSERS_MOC_PAUSE_AT` equals `name`, this creates the file named by
    `DIFFUSERS_MOC_PAUSE_FILE` (complete, holding the pid and `name`) and waits until that file is removed (or the
    process is interrupted or killed), so a test can send SIGINT or SIGKILL exactly there. Otherwise it does nothing.
    """
    if os.environ.get(PAUSE_ENV) != name:
        return
    flag = os.environ.get(PAUSE_FILE_ENV)
    if not flag:
        raise RuntimeError(f"{PAUSE_ENV}={name} needs {PAUSE_FILE_ENV} (the file to create when paused)")
    # Renamed into place: once the test sees the file, this process is paused (not still writing the file).
    with open(f"{flag}.{os.getpid()}.tmp", "w") as f:
        f.write(f"{os.getpid()} {name}\n")
    os.replace(f.name, flag)
    while os.path.exists(flag):
        time.sleep(0.01)


#: The signals `deferred_interrupts` holds back: Ctrl-C, and SIGTERM (`kill`), which the command line unwinds alike.
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    r"""
    Hold back SIGINT (Ctrl-C) and SIGTERM until the block ends; then they take effect as usual (`KeyboardInterrupt`
    for Ctrl-C, the handler or the default action of SIGTERM). Signals that are ignored stay ignored.

    The Python handlers are swapped for one that only records the signal. Blocking the signals
    (`pthread_sigmask`) would not do: it blocks them in this thread only, the process has others (torch's thread
    pool, a subprocess' reader), and Python runs the handler of a signal any thread received in the main thread,
    in the middle of the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread, where they also run
        return
    held: list[int] = []
    previous: dict[int, object] = {}
    holding = True

    def hold(signum, frame):
        if holding:
            held.append(signum)
        else:  # past the block, before its handler is restored: as the handler would
            _deliver(signum, previous[signum], frame)

    try:
        for signum in _HELD_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not None and handler is not signal.SIG_IGN:  # None: set outside Python, left alone
                previous[signum] = signal.signal(signum, hold)
        yield
    finally:
        holding = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            _deliver(signum, previous[signum], None)


def _deliver(signum: int, handler, frame) -> None:
    """Act on a held signal as `handler` (a Python handler, or the default action) would have."""
    if callable(handler):
        handler(signum, frame)
    elif handler is signal.SIG_DFL:
        signal.raise_signal(signum)  # the handler is the default again: the default action happens now


def remove_path(path: str) -> None:
    """Remove a file or folder if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def replace_dir(new: str, dest: str) -> None:
    r"""
    Put the complete folder `new` at `dest`, replacing the folder there, if any.

    The old folder is first renamed to `.<name>.old` next to it and removed only once `new` is in place. A process
    killed between the two renames leaves `.<name>.old` and `new`; [`recover_replaced_dir`] puts the old one back.
    """
    folder, name = os.path.split(os.path.abspath(dest))
    old = os.path.join(folder, f".{name}.old")
    with deferred_interrupts():  # Ctrl-C waits for the swap and the clean-up (a small folder)
        remove_path(old)
        if os.path.lexists(dest):
            os.rename(dest, old)
            pause_point(f"replace:{name}:moved-old")
        os.rename(new, dest)
        pause_point(f"replace:{name}:moved-new")
        remove_path(old)


def recover_replaced_dir(dest: str) -> bool:
    r"""
    Undo what a process killed inside [`replace_dir`] left: restore `.<name>.old` to `dest` when `dest` is missing,
    remove it when `dest` is there.

    Returns:
        `bool`: whether the old folder was restored.
    """
    folder, name = os.path.split(os.path.abspath(dest))
    old = os.path.join(folder, f".{name}.old")
    if not os.path.lexists(old):
        return False
    if os.path.lexists(dest):
        remove_path(old)
        return False
    os.rename(old, dest)
    return True


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temporary name in the same folder, then rename it into place."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        with deferred_interrupts():
            if os.path.lexists(tmp):
                os.remove(tmp)


def remove_stale_partials(folder: str, name: str) -> None:
    """Remove the temporary folders for `name` left by killed processes (their pid is in the folder name)."""
    prefix = f".{name}."
    for entry in os.listdir(folder):
        if not (entry.startswith(prefix) and entry.endswith(".partial")):
            continue
        pid = entry[len(prefix) : -len(".partial")].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # that process is gone: nobody will finish or remove this folder
            remove_path(os.path.join(folder, entry))
        except (PermissionError, OverflowError):
            pass
