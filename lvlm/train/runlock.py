"""One training process group per run directory: an exclusive lock held by rank 0 while it trains.

Owns ``RUN_DIR/.lock``: rank 0 takes an exclusive ``flock`` on it once the config, model and data are
accepted and the run directory exists, and keeps it until ``train`` returns; the kernel drops it when the
process dies, however it dies. Before any work, ``check`` refuses a run directory whose lock is held
without writing anything (a refused config leaves the directory as it was). A second
launch into the same run directory while the first still runs (e.g. ranks that outlived a SIGKILLed
launcher, or the same command started twice) is refused with the holder's pid and host, instead of two
runs writing the same checkpoints and metrics. Assumes a file system with flock (local disks, NFSv4,
Lustre/GPFS mounted with locking); where locking is not supported the run goes on with a warning.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from lvlm.config import ConfigError

log = logging.getLogger("lvlm.train")
LOCK_NAME = ".lock"


class RunDirBusy(ConfigError):
    """Another live training process holds the run directory's lock."""


class RunLock:
    """``check()``, ``acquire()`` (idempotent) and ``release()``, all no-ops unless ``enabled`` (rank 0); the
    lock file itself stays."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.enabled = enabled
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def check(self) -> None:
        """RunDirBusy when another process holds the lock; creates and holds nothing."""
        if not self.enabled or self.held or not self.path.is_file():
            return
        try:
            f = open(self.path)
        except OSError:
            return
        with f:  # closing f drops the lock taken to test it
            try:
                self._lock_or_raise(f)
            except OSError:  # no flock on this file system (RunDirBusy is not an OSError)
                return

    def acquire(self) -> None:
        if not self.enabled or self.held or not self.path.parent.is_dir():
            return
        f = open(self.path, "a+")
        try:
            self._lock_or_raise(f)
        except RunDirBusy:
            f.close()
            raise
        except OSError as e:  # no flock on this file system: nothing to hold
            f.close()
            log.warning("run_dir %s cannot be locked (%s): a second launch into it would not be refused",
                        self.path.parent, e)
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f

    def _lock_or_raise(self, f) -> None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunDirBusy(
                f"run_dir {self.path.parent} is in use by another training run ({holder}); wait for it to end or "
                "stop it (ranks can outlive a launcher killed with SIGKILL), or choose another --run_dir") from None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor drops the flock
            self._file = None
