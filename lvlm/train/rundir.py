"""The run directory: resolved config, git commit, package versions, data recipe hash; and what a run
directory may be reused for.

Written once by rank 0 when a run starts (a resumed run appends its start to ``env.json``'s
``starts`` list rather than overwriting the record). Every checkpoint also holds the config it was trained
with (``checkpoint.save``). Resuming continues the same run, so the config must match the checkpoint's in
every key that changes what is trained (all but ``RESUME_FREE``); a fresh start (``resume: false``) in a
used run directory first moves the earlier run's files to ``RUN_DIR/superseded/<time>/``, so nothing of
it is lost and nothing of it mixes with the new run (checkpoints, metrics, plots).
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
from typing import Any

import yaml

from lvlm.config import dump_config
from lvlm.config.dotted import flatten
from lvlm.config.schema import Config
from lvlm.train.runlock import LOCK_NAME

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


def write_run_record(run_dir: Path, cfg: Config, world_size: int, resumed_from: str | None,
                     changes: list[str] | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    env_file = run_dir / "env.json"
    record = json.loads(env_file.read_text()) if env_file.is_file() else {"starts": []}
    record.update(git_commit=git_commit(), packages=package_versions(), python=sys.version.split()[0],
                  platform=platform.platform(), data_hash=data_hash(cfg), world_size=world_size)
    start = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_from": resumed_from}
    if changes:
        start["config_changes"] = changes  # resumed with `resume: force` under a changed config
    record["starts"].append(start)
    env_file.write_text(json.dumps(record, indent=2))


RECORDING_ONLY = ("run_dir", "resume", "track", "data.num_workers", "train.save_every", "train.keep_last",
                  "train.log_every", "train.progress", "train.activation_checkpointing")
"""Config keys (and sections) that change neither what is trained nor what is measured: where and how a run is
recorded and checkpointed, and settings that leave every step's numbers the same (data order does not depend on
the worker count; recomputed activations equal stored ones)."""
RESUME_FREE = (*RECORDING_ONLY, "mir")
"""Keys that may differ between a checkpoint and the run resuming from it: the recording-only ones and MIR (a
measurement). Any other difference would make the resumed run something no single config describes."""
SUPERSEDED = "superseded"


def config_view(config: Config | dict, free: tuple[str, ...] = RESUME_FREE) -> dict[str, Any]:
    """{dotted key: value} of ``config`` (a Config, or its YAML as a dict) without the keys / sections in
    ``free``; by default what decides what is trained (all but RESUME_FREE)."""
    tree = yaml.safe_load(dump_config(config)) if isinstance(config, Config) else config
    return {k: v for k, v in flatten(tree).items() if not any(k == f or k.startswith(f + ".") for f in free)}


def config_changes(recorded: Config | dict, current: Config | dict) -> list[str]:
    """``key: recorded -> current`` for every training key that differs (sorted; [] when none)."""
    old, new = config_view(recorded), config_view(current)
    missing = object()
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
            for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)]


def config_file(ckpt_dir: Path) -> Path:
    """The file holding the config a checkpoint was trained with: its own ``config.yaml``, or for checkpoints
    written before checkpoints held one, the run directory's (``RUN_DIR/config.yaml``, written at each start)."""
    own = Path(ckpt_dir) / "config.yaml"
    return own if own.is_file() else Path(ckpt_dir).parent.parent / "config.yaml"


def recorded_config(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """(file, config as a dict) a checkpoint was trained with (``config_file``); None if neither file exists."""
    path = config_file(ckpt_dir)
    return (path, yaml.safe_load(path.read_text())) if path.is_file() else None


def supersede(run_dir: Path) -> Path | None:
    """Move everything in ``run_dir`` (an earlier run's checkpoints, metrics, plots, records) to
    ``run_dir/superseded/<time>/``; returns that folder, or None when there was nothing to move."""
    run_dir = Path(run_dir)
    # the live run's lock stays where it is
    entries = [p for p in run_dir.iterdir() if p.name not in (SUPERSEDED, LOCK_NAME)] if run_dir.is_dir() else []
    if not entries:
        return None
    dest = run_dir / SUPERSEDED / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    dest.mkdir(parents=True)
    for p in entries:
        p.rename(dest / p.name)
    return dest


def start_change(ckpt_dir: Path, init_from: str) -> str | None:
    """A line for ``check_resume`` when checkpoint ``ckpt_dir`` was trained from another checkpoint than
    ``init_from`` holds now (it was retrained since: its marker's ``id`` differs); None when it is the same one,
    nothing is recorded (no start point, or a checkpoint older than the record), or ``init_from`` holds no
    checkpoint (loading it reports that)."""
    from lvlm.train.checkpoint import find_checkpoint, identity, marker

    recorded = marker(ckpt_dir).get("started_from") if init_from else None
    if recorded is None:
        return None
    try:
        now = identity(find_checkpoint(init_from)[1])
    except FileNotFoundError:
        return None
    if now["id"] == recorded.get("id"):
        return None
    return (f"start point (stage.init_from): trained from {recorded['checkpoint']} (id {recorded.get('id')}), "
            f"but {init_from} now holds {now['checkpoint']} (id {now['id']}), trained since")


def check_resume(run_dir: Path, cfg: Config, world_size: int | None = None) -> tuple[str | None, list[str]]:
    """(newest complete checkpoint tag or None, config changes against it) before a run resumes in
    ``run_dir``; ``world_size`` (when given) must also be the one the checkpoint was written with. Raises
    ConfigError when anything differs and ``resume`` is not ``force``: resuming continues the same run, so a
    changed config would silently train under a mix of two configs (or, if the old run had finished, train
    nothing and report the old result), and another process count changes the global batch and where each
    rank's data continues (raw sample i belongs to rank i % world size), repeating or skipping samples. So is
    a run whose ``stage.init_from`` now holds another checkpoint than the one it started from (``start_change``):
    the resumed run would mix weights trained from two starts."""
    from lvlm.config import ConfigError
    from lvlm.train.checkpoint import latest_tag, saved_world_size

    tag = latest_tag(Path(run_dir) / "checkpoints")
    if tag is None:
        return None, []
    recorded = recorded_config(Path(run_dir) / "checkpoints" / tag)
    changes = config_changes(recorded[1], cfg) if recorded is not None else []
    start = start_change(Path(run_dir) / "checkpoints" / tag, cfg.stage.init_from)
    if start is not None:
        changes.append(start)
    saved = saved_world_size(Path(run_dir) / "checkpoints" / tag)
    if world_size is not None and saved and saved != world_size:
        changes.append(f"world size (processes): {saved} -> {world_size} (global batch and data position per rank)")
    if changes and str(cfg.resume).lower() != "force":
        listed = "\n  ".join(changes)
        raise ConfigError(
            f"run_dir {run_dir} holds a run whose newest checkpoint ({tag}) was trained with a different "
            f"config, start point or process count; resuming would continue that run under another one. Differences "
            f"(checkpoint -> now):\n"
            f"  {listed}\nChoose one: relaunch with the checkpoint's config ({recorded[0]}); a new --run_dir; "
            f"--resume false (start over here: the earlier run moves to {Path(run_dir) / SUPERSEDED}/); "
            f"--stage.init_from {Path(run_dir) / 'checkpoints' / tag} in a new run_dir (a new run from its weights); "
            "or --resume force (continue anyway; the differences are recorded in env.json)")
    return tag, changes
