"""Metrics sinks: RUN_DIR/metrics.jsonl always (rank 0); tensorboard and W&B when the config asks.

``Tracker`` fans each record out: the jsonl file gets it verbatim; tensorboard and wandb get its
numeric fields as scalars under ``{kind}/{name}`` (``train/loss``, ``mir/mir``, ``mir/layer_3``,
``train/sources/text/samples``) at the record's step. The trackers are imported only when enabled;
wandb runs offline by default (no network; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads later).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (line-buffered, survives kills)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self._f = open(path, "a", buffering=1) if enabled else None

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics file, by step (MIR before the train record of the same step); for a
    resumed run the last record per (kind, step) wins; other records (summaries) at the end."""
    by_step: dict = {}
    extra = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if "step" in rec and rec.get("kind", "train") in ("train", "mir"):
            by_step[(rec.get("kind", "train"), rec["step"])] = rec
        else:
            extra.append(rec)
    ordered = sorted(by_step, key=lambda k: (k[1], k[0] != "mir"))
    return [by_step[k] for k in ordered] + extra


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a record, flattened to ``a/b/c`` names (bools skipped). A list becomes ``name_k``
    numbered from 1: ``mir/per_layer_k`` is LLM layer k (hidden_states[k]), as in the per-layer PNG."""
    out: dict[str, float] = {}
    items: Any = record.items() if isinstance(record, dict) else enumerate(record, start=1)
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(record, dict) else f"{prefix[:-1]}_{key}"
        if isinstance(value, bool) or key in ("step", "kind"):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, (dict, list)):
            out.update(scalars(value, f"{name}/"))
    return out


class Tracker:
    """metrics.jsonl plus the configured trackers (``cfg.track``); only the writing rank enables it."""

    def __init__(self, run_dir: Path, track, config: dict, enabled: bool = True) -> None:
        self.jsonl = MetricsWriter(run_dir / "metrics.jsonl", enabled=enabled)
        self.tb = self.wandb_run = None
        if not enabled:
            return
        name = track.run_name or run_dir.name
        if track.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if track.wandb and track.wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=track.wandb_project, entity=track.wandb_entity or None,
                                        name=name, mode=track.wandb_mode, dir=str(run_dir), config=config,
                                        resume="allow", id=_wandb_id(run_dir))

    def write(self, record: dict) -> None:
        self.jsonl.write(record)
        step = record.get("step")
        if step is None or (self.tb is None and self.wandb_run is None):
            return
        values = scalars(record, f"{record.get('kind', 'train')}/")
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, global_step=int(step))
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=int(step))

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_id(run_dir: Path) -> str:
    """A run id kept in RUN_DIR so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_run_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id
