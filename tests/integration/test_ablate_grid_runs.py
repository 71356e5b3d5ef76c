"""`lvlm ablate` end to end on the tiny assets: a 2-cell grid trains both cells (MIR logged), writes
the table and CSV, skips both cells when run again; a bad axis key fails before anything trains."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runs import REPO, env

pytestmark = pytest.mark.slow


def write_grid(tmp_path: Path, tiny: dict, axes: dict, **extra) -> Path:
    overrides = {**tiny, "train.max_steps": 4, "train.micro_batch_size": 4, "train.progress": False,
                 "mir.every": 2}
    (tmp_path / "base.yaml").write_text("seed: 0\nstage: {name: align, train_connector: true}\n")
    grid = {"paper": "tiny lr ablation", "base": "base.yaml", "run_dir": str(tmp_path / "runs"),
            "overrides": overrides, "axes": axes, "score": {"type": "none"}, **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def ablate(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvlm", "ablate", str(path), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)


def test_two_cell_grid_runs_reports_and_skips_when_done(tiny, tmp_path):
    path = write_grid(tmp_path, tiny, {"optim.lr": [1.0e-3, 3.0e-3]})
    proc = ablate(path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "runs"
    names = ["lr=1e-3", "lr=3e-3"]
    for name in names:
        result = json.loads((runs / name / "result.json").read_text())
        assert result["status"] == "ok", result
        assert [m["step"] for m in result["mir"]] == [0, 2, 4]
        assert result["mir_first"] == result["mir"][0]["mir"] and result["mir_final"] == result["mir"][-1]["mir"]
        assert result["final_loss"] > 0 and result["score"] is None and result["seconds"] > 0
        assert (runs / name / "checkpoints" / "latest").is_file() and "lvlm train summary" in \
            (runs / name / "train.log").read_text()
        cell = json.loads((runs / name / "cell.json").read_text())
        assert cell["command"][-2:] == ["--run_dir", str(runs / name)]
    # identical frozen start: both cells measure the same MIR at step 0, then diverge with the lr
    r1, r3 = (json.loads((runs / n / "result.json").read_text()) for n in names)
    assert r1["mir_first"] == pytest.approx(r3["mir_first"], rel=1e-5) and r1["mir_final"] != r3["mir_final"]
    md = (runs / "results.md").read_text()
    assert "| cell | optim.lr | final loss | MIR at start | MIR final |" in md
    assert all(f"| {n} |" in md for n in names) and "## MIR at start vs final" in md
    rows = list(csv.DictReader(open(runs / "results.csv")))
    assert [r["cell"] for r in rows] == names and all(r["status"] == "ok" for r in rows)
    assert not (runs / "mir_vs_score.png").exists()  # score: none

    stamps = {n: [(runs / n / f).stat().st_mtime_ns for f in ("metrics.jsonl", "train.log", "result.json")]
              for n in names}
    again = ablate(path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skip (done)") == 2 and "training" not in again.stdout
    assert stamps == {n: [(runs / n / f).stat().st_mtime_ns for f in ("metrics.jsonl", "train.log", "result.json")]
                      for n in names}


def test_bad_axis_key_fails_before_any_cell_trains(tiny, tmp_path):
    path = write_grid(tmp_path, tiny, {"optim.lr": [1.0e-3], "unlock": {"llm": {"stage.train_lm": True}}})
    proc = ablate(path)
    assert proc.returncode == 2
    assert "cell lr=1e-3__unlock=llm: unknown key(s) train_lm under 'stage'; valid keys:" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_pipeline_grid_with_toy_vqa_score(tiny, tmp_path):
    """Two-stage pipeline cells (align -> sft): MIR from align, toy VQA score of sft's checkpoint."""
    world = Path(tiny["mir.texts"]).parents[1]
    (tmp_path / "pipe.yaml").write_text("seed: 0\nstages:\n  align: {}\n  sft: {stage: {train_llm: true}}\n")
    path = write_grid(tmp_path, tiny, {"stages.align.optim.lr": [1.0e-3, 3.0e-3]},
                      score={"type": "toy_vqa", "stage": "sft", "limit": 6,
                             "questions": str(world / "vqa" / "val.json")}, mir_stage="align")
    grid = yaml.safe_load(path.read_text())
    grid["base"] = "pipe.yaml"
    grid["overrides"].update({"train.max_steps": 2, "stages.sft.mir.every": 0})
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    proc = ablate(path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "runs"
    for name in ("lr=1e-3", "lr=3e-3"):
        stages = json.loads((runs / name / "pipeline.json").read_text())["stages"]
        assert [(s["name"], s["done"]) for s in stages] == [("align", True), ("sft", True)]
        result = json.loads((runs / name / "result.json").read_text())
        assert result["status"] == "ok" and result["mir_stage"] == "align"
        assert [m["step"] for m in result["mir"]] == [0, 2]
        assert 0.0 <= result["score"] <= 1.0 and result["per_type"]
        assert result["final_loss"] == result["stages"]["sft"]["final_loss"]
        assert (runs / name / "sft" / "checkpoints").is_dir()
    assert "final MIR vs score" in (runs / "results.md").read_text()
    assert (runs / "mir_vs_score.png").is_file()
    assert ablate(path).stdout.count("skip (done)") == 2
