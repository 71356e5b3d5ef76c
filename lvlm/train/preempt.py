"""Preemption: SIGTERM / SIGUSR1 ask the run to checkpoint and exit cleanly.

Owns the signal handlers. A handler only sets a flag (signal-safe); the loop adds the flag to the
all-reduce it already makes every step, so every rank sees a request made to any of them and they
all save the same step's checkpoint and stop together. Relaunching the same command then resumes
from it (``resume: auto``). SIGUSR1 is what SLURM sends ahead of a time limit with
``#SBATCH --signal=USR1@120``; SIGTERM is what schedulers and ``kill`` send.

A rank started by a launcher (torchrun, the deepspeed launcher) also asks the kernel for SIGTERM when the
launcher dies (``die_with_launcher``): torchrun starts its workers in their own sessions, so a SIGKILL to
the launcher's process group never reached them and they trained on, orphaned, while a relaunch of the
same command resumed beside them. Now they checkpoint and exit like any preempted run.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("lvlm.train")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> bool:
    """Linux: SIGTERM this process when its parent (the launcher) dies; True when set up. Call it only in a
    process a launcher started (a plain ``lvlm train`` must outlive the shell that started it, e.g. nohup)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    return True


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
