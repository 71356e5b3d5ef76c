"""The embedded default's assets: the synthetic world and the toy backbones, built once and cached.

Owns: where the assets live (``$LVLM_CACHE/toy-v1``, default ``~/.cache/lvlm/toy-v1``), building
them idempotently and safely when several processes ask at once (an ``fcntl`` file lock; a
``COMPLETE`` marker written last, so a directory left by a killed build is rebuilt), and
resolving ``toy://`` paths in a config to real files.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lvlm.toy.backbones import LLMSpec, VisionSpec

VERSION = "toy-v1"
SCHEME = "toy://"
log = logging.getLogger("lvlm.toy")


@dataclass(frozen=True)
class ToySpec:
    """Sizes and steps of the toy assets; the defaults are the embedded default."""

    seed: int = 0
    n_train: int = 4000
    n_val: int = 200
    shard_size: int = 500
    n_text: int = 20000
    image_size: int = 64
    llm: LLMSpec = field(default_factory=LLMSpec)
    vision: VisionSpec = field(default_factory=VisionSpec)

    def digest(self) -> str:
        """Changes with the spec and with the generator's version, so stale caches are rebuilt."""
        from lvlm.toy.world import WORLD_VERSION

        blob = json.dumps({"spec": asdict(self), "world": WORLD_VERSION, "assets": VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("LVLM_CACHE", Path.home() / ".cache" / "lvlm"))


def asset_dir(root: Path | None = None, spec: ToySpec | None = None) -> Path:
    """The default spec lives in ``toy-v1``; any other spec in ``toy-v1-<digest>``."""
    spec = spec or ToySpec()
    name = VERSION if spec == ToySpec() else f"{VERSION}-{spec.digest()}"
    return (root or cache_root()) / name


def prepare(root: Path | None = None, *, spec: ToySpec | None = None) -> Path:
    """Build the world and the toy backbones unless already complete; returns the asset directory."""
    from lvlm.toy.backbones import train_llm, train_vision
    from lvlm.toy.world import write_world

    spec = spec or ToySpec()
    out = asset_dir(root, spec)
    marker = out / "COMPLETE"
    if _complete(marker, spec):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the marker
        if _complete(marker, spec):
            return out
        if out.exists():
            shutil.rmtree(out)  # left by a killed build, or built from another spec
        t0 = time.perf_counter()
        log.info("building the toy world and backbones in %s (first run only)", out)
        write_world(out / "world", seed=spec.seed, n_train=spec.n_train, n_val=spec.n_val,
                    shard_size=spec.shard_size, n_text=spec.n_text, image_size=spec.image_size)
        t_world = time.perf_counter() - t0
        log.info("world: %d train / %d val images, %d texts in %.1f s", spec.n_train, spec.n_val, spec.n_text,
                 t_world)
        llm = train_llm(out / "world", out / "llm", spec.llm, seed=spec.seed)
        log.info("toy LLM: %s params, loss %.3f -> %.3f, held-out text QA accuracy %.2f in %.1f s",
                 f"{llm['params']:,}", llm["first_loss"], llm["final_loss"], llm["qa_accuracy"], llm["seconds"])
        vision = train_vision(out / "world", out / "vision", spec.vision, spec.image_size, seed=spec.seed)
        log.info("toy vision: %s params, contrastive loss %.3f -> %.3f, val image->text top-1 %.2f "
                 "(chance %.2f) in %.1f s", f"{vision['params_visual']:,}", vision["first_loss"],
                 vision["final_loss"], vision["val_top1"], vision["val_chance"], vision["seconds"])
        report = {"spec": asdict(spec), "world_seconds": t_world, "llm": llm, "vision": vision,
                  "total_seconds": time.perf_counter() - t0}
        (out / "toy_report.json").write_text(json.dumps(report, indent=2))
        marker.write_text(spec.digest())
    return out


def _complete(marker: Path, spec: ToySpec) -> bool:
    """Built to the end, and by this spec (an older generator's assets are rebuilt)."""
    return marker.is_file() and marker.read_text().strip() == spec.digest()


def resolve(path: str, root: Path | None = None, spec: ToySpec | None = None) -> str:
    """``toy://x/y`` -> the cached asset path (built if needed); any other string unchanged."""
    if not path.startswith(SCHEME):
        return path
    return str(prepare(root, spec=spec) / path[len(SCHEME):])


def _resolve_tree(obj: Any, root: Path | None, spec: ToySpec | None) -> Any:
    if isinstance(obj, str):
        return resolve(obj, root, spec)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _resolve_tree(getattr(obj, f.name), root, spec) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, dict):  # e.g. data.mixture: name -> component
        return {k: _resolve_tree(v, root, spec) for k, v in obj.items()}
    return obj


def resolve_config(cfg, root: Path | None = None, spec: ToySpec | None = None):
    """A copy of a config dataclass with every ``toy://`` string resolved (assets built on first use)."""
    return _resolve_tree(cfg, root, spec)
