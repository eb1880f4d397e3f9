"""`deferred_interrupts`: Ctrl-C and SIGTERM wait for the steps that must not be cut in the middle, in a process with
several threads, as a real run has (torch's thread pool, ffmpeg's log reader)."""

from __future__ import annotations

import os
import select
import signal
import threading

import pytest

from diffusers_moc.core.atomic import deferred_interrupts

HELD = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture
def received():
    """The signals the process acts on, recorded (instead of raised) so the test run goes on whatever happens; with
    a second thread running, which the kernel hands a signal to when the main thread blocks it."""
    seen: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in HELD}
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        for s, handler in old.items():
            signal.signal(s, handler)


@pytest.fixture
def arrived():
    """`arrived(signum)` waits until the process received `signum` (its C-level handler ran, in whichever thread),
    through the wakeup fd that handler writes to; the timeout only bounds a failure."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    old = signal.set_wakeup_fd(w)

    def wait(signum: int) -> None:
        ready, _, _ = select.select([r], [], [], 60)
        assert ready, f"signal {signum} did not arrive"
        assert os.read(r, 1) == bytes([signum])

    try:
        yield wait
    finally:
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("signum", HELD)
def test_a_signal_waits_for_the_end_of_the_block(received, arrived, signum):
    handler = signal.getsignal(signum)
    with deferred_interrupts():
        os.kill(os.getpid(), signum)
        arrived(signum)
        os.getpid()  # Python runs signal handlers at calls like this one
        assert received == []
    assert received == [signum]
    assert signal.getsignal(signum) is handler


def test_nested_blocks_hold_until_the_outer_one_ends(received, arrived):
    with deferred_interrupts():
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            arrived(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        arrived(signal.SIGINT)
        os.getpid()
        assert received == []
    assert sorted(received) == sorted(HELD)


def test_ignored_signals_stay_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
