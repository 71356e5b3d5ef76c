"""Preemption: SIGTERM / SIGUSR1 ask the run to checkpoint and exit cleanly.

Owns the signal handlers. A handler only sets a flag (signal-safe); the loop adds the flag to the
all-reduce it already makes every step, so every rank sees a request made to any of them and they
all save the same step's checkpoint and stop together. Relaunching the same command then resumes
from it (``resume: auto``). SIGUSR1 is what SLURM sends ahead of a time limit with
``#SBATCH --signal=USR1@120``; SIGTERM is what schedulers and ``kill`` send.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("lvlm.train")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Context manager installing the handlers (main thread only) and restoring the old ones on exit."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
