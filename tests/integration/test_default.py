"""The README's first command: `lvlm train` with no arguments on a fresh cache builds the synthetic
world and toy backbones, then runs LLaVA-style stage 1, and the loss falls by well over 20%."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runs import env

from lvlm.track import read_metrics


@pytest.mark.slow
def test_embedded_default_runs_and_learns(tmp_path):
    e = env()
    e["LVLM_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-m", "lvlm", "train", "--train.progress", "false"], cwd=tmp_path, env=e,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "lvlm train summary" in proc.stdout
    report = json.loads((tmp_path / "cache" / "toy-v1" / "toy_report.json").read_text())
    assert report["vision"]["val_top1"] > 10 * report["vision"]["val_chance"]  # the toy encoder sees the world
    assert report["llm"]["final_loss"] < 0.5 * report["llm"]["first_loss"]  # the toy LLM knows its language
    records = read_metrics(tmp_path / "runs" / "toy-stage1" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r and "step" in r]
    summary = [r for r in records if r.get("kind") == "summary"][-1]
    assert len(losses) == 300
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert summary["loss_drop"] > 0.2
    assert (tmp_path / "runs" / "toy-stage1" / "checkpoints" / "latest").read_text() == "step_00000300"
    mir = {r["step"]: r["mir"] for r in records if r.get("kind") == "mir"}
    assert sorted(mir) == [0, 100, 200, 300] and all(0 < v < 10 for v in mir.values())
    # Not asserted: MIR falling during stage 1. Over these 300 steps it rises (0.914 -> 1.343); over 3,000 it
    # peaks near step 250 and then falls, ending below step 0 in one toy build and above it in another; see
    # the README's "MIR during stage 1 on the toy" and issue 3.
    assert (tmp_path / "runs" / "toy-stage1" / "loss_mir.png").is_file()
