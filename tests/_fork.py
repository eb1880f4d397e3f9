"""Run the `diffusers-moc` command line in a forked child and interrupt it at a named pause point.

Nothing here waits a fixed time for the child: the child says it reached the moment by creating the pause file
(`diffusers_moc.core.atomic.pause_point`), and the timeouts only bound a run that went wrong, generously, as they hold
on a loaded machine.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

from diffusers_moc.core.atomic import PAUSE_ENV, PAUSE_FILE_ENV

#: Bounds on a child that never reaches its pause point or never exits (a failure, not a speed target).
TIMEOUT_S = 600


def as_in_a_terminal() -> None:
    r"""
    Give SIGINT its usual Python handler (`KeyboardInterrupt`), as in a command started from a terminal.

    The test process may run with SIGINT ignored (a shell starts background jobs of a script so, and children inherit
    it): the command line then rightly ignores Ctrl-C, which is not what these tests send it.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _child(argv: list[str], moment: str, flag) -> None:
    from diffusers_moc.cli import main

    code = 3
    try:
        # OpenMP's thread pool does not survive fork(): the child computes on one thread.
        torch.set_num_threads(1)
        # The command as a user runs it has other threads (torch's pool, ffmpeg's log reader): a signal sent to the
        # process may reach any of them, and must act the same.
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        as_in_a_terminal()
        os.environ[PAUSE_ENV], os.environ[PAUSE_FILE_ENV] = moment, str(flag)
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float):
    """`os.waitpid(pid, WNOHANG)` until the child exits (its status) or `timeout` s pass (`None`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    return None


def cli_until_paused(argv: list[str], moment: str, sig: int, flag, timeout: float = TIMEOUT_S) -> int:
    r"""
    Run `diffusers-moc ARGV` in a forked child (the command line as a user runs it, without the seconds of interpreter
    and torch start-up), wait until it pauses at `moment` (`diffusers_moc.core.atomic.pause_point`), send it `sig`, and
    return its exit code (negative: killed by that signal). Its output goes where the test's goes (`capfd`).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(argv, moment, flag)
    try:
        deadline = time.monotonic() + timeout
        while not flag.exists():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = None
                raise AssertionError(f"the run ended (exit {os.waitstatus_to_exitcode(status)}) before {moment}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the run did not reach {moment} in {timeout} s")
            time.sleep(0.01)
        os.kill(pid, sig)
        flag.unlink()  # a step that holds Ctrl-C back goes on, then raises it
        status = _wait(pid, timeout)
        if status is None:
            raise AssertionError(f"the run did not exit within {timeout} s of signal {sig} at {moment}")
        pid = None
        return os.waitstatus_to_exitcode(status)
    finally:
        if pid is not None:  # never leave a child behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
