"""Metrics sinks: jsonl always; tensorboard scalars and an offline W&B run when configured."""
from __future__ import annotations

import json

import pytest

from lvlm.config.schema import TrackConfig
from lvlm.track import Tracker, scalars


def test_scalars_flatten_numeric_fields():
    record = {"kind": "train", "step": 3, "loss": 1.5, "skipped": {"a/empty_text": 2}, "ok": True,
              "per_layer": [0.5, 0.25], "note": "x", "sources": {"text": {"samples": 4}}}
    assert scalars(record, "train/") == {"train/loss": 1.5, "train/skipped/a/empty_text": 2.0,
                                         "train/per_layer_1": 0.5, "train/per_layer_2": 0.25,
                                         "train/sources/text/samples": 4.0}


def test_tensorboard_event_file_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(tmp_path, TrackConfig(tensorboard=True), config={"seed": 0})
    for step in (1, 2, 3):
        tracker.write({"step": step, "loss": 1.0 / step})
    tracker.write({"kind": "mir", "step": 3, "mir": 0.7, "per_layer": [1.0, 2.0]})
    tracker.write({"kind": "summary", "last_loss": 0.33})
    tracker.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and lines[-1]["kind"] == "summary"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert events.Scalars("mir/mir")[0].value == pytest.approx(0.7)
    assert events.Scalars("mir/per_layer_2")[0].value == pytest.approx(2.0)   # LLM layer 2 (numbered from 1)


def test_disabled_rank_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path, TrackConfig(tensorboard=True), config={}, enabled=False)
    tracker.write({"step": 1, "loss": 1.0})
    tracker.close()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


@pytest.mark.slow
def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    track = TrackConfig(wandb=True, wandb_project="lvlm-test", wandb_mode="offline", run_name="unit")
    tracker = Tracker(tmp_path, track, config={"seed": 0})
    tracker.write({"step": 1, "loss": 2.0})
    tracker.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert runs[0].name.endswith(run_id)                         # a resumed run reuses the same id
