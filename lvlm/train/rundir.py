"""The run directory: resolved config, git commit, package versions, data recipe hash.

Written once by rank 0 when a run starts (a resumed run appends its start to ``env.json``'s
``starts`` list rather than overwriting the record).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from lvlm.config import dump_config
from lvlm.config.schema import Config

PACKAGES = ("lvlm", "torch", "torchvision", "deepspeed", "transformers", "peft", "accelerate",
            "open_clip_torch", "timm", "webdataset", "draccus", "tokenizers", "safetensors", "numpy", "pillow")


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def data_hash(cfg: Config) -> str:
    """sha256 of the data section of the config (the data recipe as this run sees it)."""
    blob = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_run_record(run_dir: Path, cfg: Config, world_size: int, resumed_from: str | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    env_file = run_dir / "env.json"
    record = json.loads(env_file.read_text()) if env_file.is_file() else {"starts": []}
    record.update(git_commit=git_commit(), packages=package_versions(), python=sys.version.split()[0],
                  platform=platform.platform(), data_hash=data_hash(cfg), world_size=world_size)
    record["starts"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_from": resumed_from})
    env_file.write_text(json.dumps(record, indent=2))
