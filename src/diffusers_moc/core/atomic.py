"""All-or-nothing file system steps: deferred Ctrl-C, folder replacement, and pause points for interruption tests.

An output is written under a temporary name and renamed into place once complete (a rename is atomic on one file
system), so an interrupted command leaves either the old state or the complete new one. The few steps that must not
be cut in the middle by Ctrl-C (a rename pair, the removal of temporary files) run inside `deferred_interrupts()`.
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
    `DIFFUSERS_MOC_PAUSE_FILE` and waits until that file is removed (or the process is interrupted or killed), so a
    test can send SIGINT or SIGKILL exactly there. Otherwise it does nothing.
    """
    if os.environ.get(PAUSE_ENV) != name:
        return
    flag = os.environ.get(PAUSE_FILE_ENV)
    if not flag:
        raise RuntimeError(f"{PAUSE_ENV}={name} needs {PAUSE_FILE_ENV} (the file to create when paused)")
    with open(flag, "w") as f:
        f.write(f"{os.getpid()} {name}\n")
    while os.path.exists(flag):
        time.sleep(0.01)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) until the block ends; it is raised then, as `KeyboardInterrupt`, as usual."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
