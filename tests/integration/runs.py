"""Helpers to launch `lvlm train` as a real subprocess (one process, torchrun, or the deepspeed launcher)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tiny_assets import as_args

from lvlm.track import read_metrics

REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    e = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def train_cmd(tiny: dict, run_dir: Path, extra: list[str], launcher: str = "python", nproc: int = 1) -> list[str]:
    args = ["train", *as_args(tiny), "--run_dir", str(run_dir), "--train.progress", "false", *extra]
    if launcher == "python":
        return [sys.executable, "-m", "lvlm", *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "lvlm", *args]
    if launcher == "deepspeed":
        ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        return [ds, "--num_gpus", str(nproc), "--master_port", str(_free_port()), "--module", "lvlm", *args]
    raise ValueError(launcher)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(tiny: dict, run_dir: Path, extra: list[str], launcher: str = "python", nproc: int = 1,
              timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(tiny, run_dir, extra, launcher, nproc), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def mirs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["mir"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "mir"}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "step" in r}
