"""Stopping on SIGTERM (what schedulers send before preempting a job) or SIGINT (Ctrl-C) at a step boundary.

The training loop asks `should_stop(step)` after every step; once a signal has arrived it says yes, the loop
saves a checkpoint at that step and exits, and the same command resumes from it. With several processes
the signal may reach only some of them, so the step to stop at is agreed through JAX's preemption service
(`multihost_utils.reached_preemption_sync_point`), which listens for SIGTERM itself: SIGINT is turned into
SIGTERM so that it reaches that service too. A second signal of the same kind acts as it would without
this watcher (Ctrl-C twice still interrupts a slow save).
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

WATCHED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context manager that records SIGTERM / SIGINT instead of dying, and restores the handlers on exit."""

    def __init__(self):
        self.received: str | None = None  # the first signal's name
        self._previous: dict[int, object] = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only: leave them alone
        # With several processes JAX's preemption service owns SIGTERM; only SIGINT is ours to forward.
        for sig in (signal.SIGINT,) if self._multi else WATCHED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in list(self._previous.items()):
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))  # the next one acts as before
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service tells every process

    def should_stop(self, step: int) -> bool:
        """True at the same step on every process once any of them was signalled (call after every step)."""
        if self._multi:
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        return self.received is not None
