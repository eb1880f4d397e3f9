"""Run the `diffusers-moc` command line in a forked child and interrupt it at a named pause point."""

from __future__ import annotations

import os
import signal
import time

import torch

from diffusers_moc.core.atomic import PAUSE_ENV, PAUSE_FILE_ENV


def cli_until_paused(argv: list[str], moment: str, sig: int, flag, timeout: float = 120) -> int:
    r"""
    Run `diffusers-moc ARGV` in a forked child (the command line as a user runs it, without the seconds of interpreter
    and torch start-up), wait until it pauses at `moment` (`diffusers_moc.core.atomic.pause_point`), send it `sig`, and
    return its exit code (negative: killed by that signal).
    """
    from diffusers_moc.cli import main

    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            # OpenMP's thread pool does not survive fork(): the child computes on one thread.
            torch.set_num_threads(1)
            os.environ[PAUSE_ENV], os.environ[PAUSE_FILE_ENV] = moment, str(flag)
            code = main(argv)
        finally:
            os._exit(code)
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
        _, status = os.waitpid(pid, 0)
        pid = None
        return os.waitstatus_to_exitcode(status)
    finally:
        if pid is not None:  # never leave a child behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
