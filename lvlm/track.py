"""Metrics sinks: a jsonl file always (rank 0). tensorboard / wandb arrive with the operations issue."""
from __future__ import annotations

import json
from pathlib import Path


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
