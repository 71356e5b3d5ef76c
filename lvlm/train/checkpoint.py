"""Resumable checkpoints: model, optimizer, scheduler (DeepSpeed), plus data position, RNG states,
step and config (ours).

Layout: ``RUN_DIR/checkpoints/step_00000100/`` holds DeepSpeed's files, one ``rng_rank{r}.json``
per rank, ``config.yaml`` (the config it was trained with) and, written last by rank 0 after every rank
has finished, ``COMPLETE``. Only directories with ``COMPLETE`` are ever resumed from, so a checkpoint
half-written when a run died is never taken as the latest. ``checkpoints/latest`` names the newest
complete one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_tag(ckpt_dir: Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def rng_state() -> dict:
    """This process's RNG states, as JSON-serialisable data."""
    np_state = np.random.get_state()
    state = {
        "python": [np_list(x) for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def np_list(x):
    return list(np_list(v) for v in x) if isinstance(x, tuple) else x


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save(engine, run_dir: Path, step: int, client_state: dict, keep_last: int,
         carried: frozenset[str] = frozenset(), config_yaml: str | None = None,
         started_from: dict | None = None) -> Path:
    """Write a checkpoint collectively; mark it complete and prune old ones (rank 0). ``config_yaml``: the
    run's resolved config, kept as ``config.yaml`` in the checkpoint (what a resume is checked against).
    The ``COMPLETE`` marker holds the step, the world size, a fresh ``id`` (this checkpoint, not its
    path: a retrained stage writes the same tag again) and ``started_from``: ``identity()`` of the
    checkpoint the run's stage started from (``stage.init_from``), so a later stage can tell it is stale."""
    ckpt_dir = run_dir / "checkpoints"
    tag = tag_for(step)
    path = ckpt_dir / tag
    if engine.rank == 0 and path.exists():  # a leftover, incomplete attempt at the same step
        shutil.rmtree(path)
    engine.barrier()
    engine.save(ckpt_dir, tag, client_state, carried)
    (path / f"rng_rank{engine.rank}.json").write_text(json.dumps(rng_state()))
    engine.barrier()
    if engine.rank == 0:
        if config_yaml is not None:
            (path / "config.yaml").write_text(config_yaml)
        done = {"step": step, "world_size": engine.world_size, "id": uuid.uuid4().hex}
        if started_from is not None:
            done["started_from"] = started_from
        (path / COMPLETE).write_text(json.dumps(done))
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    engine.barrier()
    return path


def load(engine, run_dir: Path) -> dict | None:
    """Load the newest complete checkpoint into the engine; returns its client state (None if none)."""
    ckpt_dir = run_dir / "checkpoints"
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    client_state = engine.load(ckpt_dir, tag)
    rng_file = ckpt_dir / tag / f"rng_rank{engine.rank}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    client_state["tag"] = tag
    return client_state


def marker(ckpt_dir: Path) -> dict:
    """The ``COMPLETE`` marker of a complete checkpoint ({} for an older, empty one)."""
    return json.loads((Path(ckpt_dir) / COMPLETE).read_text() or "{}")


def identity(ckpt_dir: Path) -> dict:
    """Which checkpoint this is: its path and its marker's ``id`` (None for checkpoints older than ids)."""
    return {"checkpoint": str(Path(ckpt_dir).resolve()), "id": marker(ckpt_dir).get("id")}


def saved_world_size(ckpt_dir: Path) -> int:
    """How many processes wrote a complete checkpoint: its ``COMPLETE`` marker says (older checkpoints: one
    ``rng_rank{r}.json`` per rank)."""
    return int(marker(ckpt_dir).get("world_size") or len(list(Path(ckpt_dir).glob("rng_rank*.json"))))


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) for a run directory (its newest complete checkpoint) or a checkpoint dir."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path.parent.parent, path
    tag = latest_tag(path / "checkpoints")
    if tag is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint (no {COMPLETE} marker) nor a run "
                                "directory with one under checkpoints/")
    return path, path / "checkpoints" / tag


def load_trained_weights(model, ckpt_dir: Path) -> list[str]:
    """Load ``trainable.safetensors`` into a freshly built model; returns the names loaded."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(ckpt_dir) / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"checkpoint {ckpt_dir} has weights the model lacks: {unknown[:5]} ...; was it trained "
                         "with another model config?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))
    return sorted(weights)


def build_as_trained(cfg):
    """(model, image_transform, tokenizer) built from ``cfg.model`` (``toy://`` paths already resolved) under
    ``cfg.seed`` exactly as training built it, so the rows a frozen LLM got for the added ``<image>`` token
    (and any randomly initialised part) are the training-time ones. The global RNG is left untouched."""
    from lvlm.models.build import build_lvlm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_lvlm(cfg.model)


def load_stage_weights(model, ckpt_dir: Path) -> list[str]:
    """A checkpoint's weights into a freshly built model: ``trainable.safetensors``, then the LoRA adapters a
    stage kept apart under ``lora_adapter/`` (if any) merged into their base layers. Returns the names of
    every parameter that now holds checkpoint values."""
    from lvlm.train import lora

    names = load_trained_weights(model, ckpt_dir)
    if lora.load_adapter(model, ckpt_dir):
        names += lora.merge_into_base(model)
    return names


def load_checkpoint_model(cfg, ckpt_dir: Path, device: torch.device | str | None = None):
    """(model, image_transform) of a trained checkpoint, for evaluation: built as training built it
    (``build_as_trained``), its weights loaded (``load_stage_weights``), on ``device`` (default: cuda when
    available) in eval mode."""
    model, transform, _ = build_as_trained(cfg)
    load_stage_weights(model, ckpt_dir)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(torch.device(device)).eval(), transform
