"""Pre-emption: SIGTERM (what a cluster scheduler or ``docker stop`` sends before SIGKILL) lets the current
optimizer step finish; the loop then writes a checkpoint and stops with exit code 143, so a requeued
``apollo train --resume RUN`` continues bit-identically."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from ..config import ApolloError


class Preempted(ApolloError):
    """The run stopped on SIGTERM after checkpointing (exit code 143, as a SIGTERM-killed process has)."""

    exit_code = 143


class StopRequest:
    """Set by the SIGTERM handler; read by the loop at the end of each optimizer step."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


@contextlib.contextmanager
def sigterm_stops() -> Iterator[StopRequest]:
    """While the loop runs, SIGTERM asks it to stop at the next step boundary (main thread only: Python delivers
    signals there); the previous handler comes back afterwards."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
