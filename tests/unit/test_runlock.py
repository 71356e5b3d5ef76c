"""One training process group per run directory (lvlm.train.runlock) and ranks that die with their launcher
(lvlm.train.preempt.die_with_launcher)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lvlm.config import ConfigError
from lvlm.train.rundir import supersede
from lvlm.train.runlock import LOCK_NAME, RunDirBusy, RunLock


def test_a_held_run_dir_refuses_a_second_run_until_released(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    first.acquire()                                                     # idempotent
    assert first.held and f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
    second = RunLock(tmp_path)
    with pytest.raises(RunDirBusy, match=rf"in use by another training run \(pid {os.getpid()} on .*--run_dir"):
        second.acquire()                                                # flock: a second descriptor conflicts
    with pytest.raises(RunDirBusy, match="in use by another training run"):
        second.check()                                                  # the check before any work
    assert isinstance(RunDirBusy("x"), ConfigError) and not second.held
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    moved = supersede(tmp_path)                                         # resume false moves the old run, not the lock
    assert (moved / "metrics.jsonl").is_file() and (tmp_path / LOCK_NAME).is_file()
    first.release()
    second.check()                                                      # free again: passes, holds nothing
    assert not second.held
    second.acquire()
    assert second.held
    second.release()


def test_other_ranks_and_missing_dirs_take_no_lock(tmp_path):
    RunLock(tmp_path, enabled=False).acquire()
    RunLock(tmp_path).check()                                           # an unlocked run dir: nothing written
    missing = RunLock(tmp_path / "not-yet")
    missing.check()
    missing.acquire()                                                   # the run dir is created later
    assert not (tmp_path / LOCK_NAME).exists() and not missing.held and not (tmp_path / "not-yet").exists()


def test_the_lock_is_dropped_when_its_holder_is_killed(tmp_path):
    hold = ("import sys, time; from lvlm.train.runlock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match=f"pid {proc.pid} "):
        RunLock(tmp_path).acquire()
    proc.kill()
    proc.wait(timeout=30)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.held
    lock.release()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_a_rank_dies_with_its_launcher(tmp_path):
    """A 'launcher' starts a 'rank' in its own session (as torchrun does) and is SIGKILLed: the rank, which
    asked for SIGTERM on its parent's death, ends; without the request it lives on (the orphan case)."""
    rank = ("import sys, time; from lvlm.train.preempt import die_with_launcher; "
            "ok = die_with_launcher() if sys.argv[1] == '1' else True; print('rank up', ok, flush=True); "
            "time.sleep(600)")
    launcher = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], "
                "start_new_session=True, stdout=subprocess.PIPE, text=True); "
                "print(p.pid, p.stdout.readline().strip(), flush=True); p.wait()")
    for asks in ("1", "0"):
        proc = subprocess.Popen([sys.executable, "-c", launcher, rank, asks], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        pid, *status = proc.stdout.readline().split()
        pid = int(pid)
        assert status == ["rank", "up", "True"]
        os.killpg(proc.pid, signal.SIGKILL)                             # the launcher's group, not the rank's
        proc.wait(timeout=30)
        deadline = time.time() + (20 if asks == "1" else 3)              # (the orphan: just long enough to see it stay)
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        if asks == "1":
            assert not _alive(pid), "the rank outlived its launcher"
        else:
            assert _alive(pid)                                          # the defect it fixes
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"            # a zombie has ended
    except FileNotFoundError:
        return False
