"""Running a grid: validate every cell's config, train the cells one after another, score, record.

Per cell, in ``RUN_DIR/<cell>/`` (which is also the cell's training run dir, or its pipeline dir):
``cell.json`` (the resolved overrides and the command), ``train.log`` (the training's stdout and
stderr, appended per attempt), then ``result.json`` (losses, MIR, score, seconds, status). A cell
whose ``result.json`` has status ``ok`` and the same config hash (``Grid.digest``: the cell's config as
loaded, so editing the base counts) is skipped; any other cell is run again: under the same settings its
training resumes from its last complete checkpoint (``resume: auto``); under changed settings the earlier
attempt is moved to ``RUN_DIR/<cell>/superseded/<time>/`` and the cell starts over. A finished cell whose
recorded ``score_spec`` differs from the grid's ``score`` is scored again, and one whose recorded
``mir_stage_spec`` differs from the grid's ``mir_stage`` (or lacks it) is summarised again from its
metrics.jsonl; neither trains (neither setting is in the hash). Training
runs as a subprocess (``python -m lvlm train`` or the grid's launcher prefix, which must block
until training ends); scoring runs in this process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from lvlm.ablate.grid import Cell, Grid, GridError
from lvlm.track import read_metrics

Scorer = Callable[..., dict]
LOG_TAIL = 40


def validate(grid: Grid, cells: list[Cell]) -> dict[str, str]:
    """Load every cell's config (plain or pipeline: every stage's) now, so a typo fails before anything trains;
    returns each cell's config hash (``Grid.digest`` of what was loaded), by cell name."""
    from lvlm.config import ConfigError

    digests = {}
    if grid.score.type == "toy_vqa" and importlib.util.find_spec("lvlm.eval.toy_vqa") is None:
        raise GridError("score type toy_vqa needs lvlm.eval.toy_vqa, which this installation lacks; "
                        "valid choices here: none")
    for cell in cells:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):  # argparse prints its whole usage on an unknown key
                digests[cell.name] = grid.digest(cell)
        except ConfigError as e:
            said = [line.split("error: ", 1)[1] for line in err.getvalue().splitlines() if "error: " in line]
            where = f" ({str(e).split(':', 1)[0]})" if said and grid.is_pipeline else ""  # which stage
            hint = "; valid keys: `lvlm train --help`" if said else ""  # the config's own errors name them
            said_here = '; '.join(said) + where if said else str(e)
            raise GridError(f"cell {cell.name}: {said_here} (base {grid.base}{hint})") from e
    return digests


def command(grid: Grid, cell: Cell) -> list[str]:
    tail = [str(grid.base), *cell.args, "--run_dir", str(grid.cell_dir(cell))]
    if grid.launcher:
        return [*shlex.split(grid.launcher), *tail]
    return [sys.executable, "-m", "lvlm", "train", *tail]


def default_scorer(kind: str) -> Scorer | None:
    if kind == "toy_vqa":
        from lvlm.eval.toy_vqa import evaluate

        return evaluate
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def previous_attempt(grid: Grid, cell: Cell) -> tuple[dict | None, str | None]:
    """(result of the cell's last attempt or None, that attempt's config hash or None if there was none).
    ``cell.json`` is written when an attempt starts, ``result.json`` when it ends: a result whose hash is not
    the last started attempt's is from an earlier attempt and does not count."""
    cell_dir = grid.cell_dir(cell)
    result = _read_json(cell_dir / "result.json")
    started = _read_json(cell_dir / "cell.json") or {}
    attempt = started.get("hash", (result or {}).get("hash"))
    return (result if result is not None and result.get("hash") == attempt else None), attempt


def stage_dirs(grid: Grid, cell_dir: Path) -> list[tuple[str, Path, bool | None]]:
    """(stage name, run dir, done) of a cell: one unnamed stage for a plain config."""
    if not grid.is_pipeline:
        return [("", cell_dir, None)]
    record = _read_json(cell_dir / "pipeline.json") or {}
    out = []
    for s in record.get("stages", []):
        d = Path(s.get("run_dir") or cell_dir / s["name"])
        out.append((s["name"], d if d.exists() else cell_dir / s["name"], bool(s.get("done"))))
    return out or [(name, cell_dir / name, False) for name in grid.stages]


def summarize(grid: Grid, cell_dir: Path) -> dict:
    """Losses and MIR of a cell's run dir(s) from their metrics.jsonl."""
    per: dict[str, dict] = {}
    stages = stage_dirs(grid, cell_dir)
    for name, d, done in stages:
        path = d / "metrics.jsonl"
        recs = read_metrics(path) if path.is_file() else []
        train = [r for r in recs if r.get("kind", "train") == "train" and "loss" in r]
        sums = [r for r in recs if r.get("kind") == "summary"]
        per[name] = {"run_dir": str(d), "done": done, "steps": train[-1]["step"] if train else 0,
                     "first_loss": train[0]["loss"] if train else None,
                     "final_loss": train[-1]["loss"] if train else None,
                     "preempted": bool(sums and sums[-1].get("preempted")),
                     "mir": [{"step": r["step"], "mir": r["mir"]} for r in recs if r.get("kind") == "mir"]}
    last = per[stages[-1][0]]
    mir_stage = grid.mir_stage or next((n for n, _, _ in stages if per[n]["mir"]), stages[0][0])
    mir = per.get(mir_stage, {}).get("mir", [])
    at0 = [m["mir"] for m in mir if m["step"] == 0]
    out = {"first_loss": last["first_loss"], "final_loss": last["final_loss"], "steps": last["steps"],
           "mir_first": at0[0] if at0 else (mir[0]["mir"] if mir else None),
           "mir_final": mir[-1]["mir"] if mir else None, "mir": mir}
    if grid.is_pipeline:
        out.update(mir_stage=mir_stage, stages=per,
                   complete=bool(stages) and all(done for _, _, done in stages))
    else:
        out["complete"] = bool(last["steps"]) and not last["preempted"]
    return out


def score_dir(grid: Grid, cell_dir: Path) -> Path:
    stages = stage_dirs(grid, cell_dir)
    if grid.score.stage is not None:
        return next(d for n, d, _ in stages if n == grid.score.stage)
    return stages[-1][1]


def _log_tail(log: Path, start: int) -> str:
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return "\n".join(text.replace("\r", "\n").splitlines()[-LOG_TAIL:])


def run_cell(grid: Grid, cell: Cell, scorer: Scorer | None, out=print, train: bool = True, fresh: bool = False,
             digest: str | None = None) -> dict:
    """Train (unless ``train`` is False: re-score only), score and write ``result.json``. ``fresh``: an earlier
    attempt under other settings is moved to the cell's ``superseded/<time>/`` first, so training starts over
    instead of resuming (which ``lvlm train`` would refuse under a changed config)."""
    cell_dir = grid.cell_dir(cell)
    cmd = command(grid, cell)
    digest = digest or grid.digest(cell)
    if fresh and train:
        from lvlm.train.rundir import supersede

        supersede(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "cell.json").write_text(json.dumps({
        "cell": cell.name, "values": cell.values, "overrides": cell.settings, "args": cell.args, "hash": digest,
        "base": str(grid.base), "command": cmd}, indent=2, default=str))
    t0 = time.perf_counter()
    result = {"cell": cell.name, "values": cell.values, "overrides": cell.settings, "hash": digest,
              "score_spec": dataclasses.asdict(grid.score), "mir_stage_spec": grid.mir_stage,
              "status": "ok", "returncode": 0}
    if train:
        log = cell_dir / "train.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "a") as f:
            f.write(f"\n=== lvlm ablate {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
            f.flush()
            start = f.tell()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        result["returncode"] = proc.returncode
        if proc.returncode != 0:
            result.update(status="failed", log_tail=_log_tail(log, start))
    result.update(summarize(grid, cell_dir))
    if result["status"] == "ok" and not result["complete"]:
        result.update(status="incomplete", log_tail="training exited 0 but did not finish (preempted?); "
                      "re-run the grid to resume it")
    result.update(score=None, per_type=None)
    if result["status"] == "ok" and scorer is not None:
        try:
            s = scorer(str(score_dir(grid, cell_dir)), questions=grid.score.questions, limit=grid.score.limit)
            value = s.get("score")
            result.update(score=None if value is None or value != value else float(value),  # NaN: no questions
                          per_type=s.get("per_type"))
        except Exception as e:  # a broken scorer fails the cell, not the grid
            result.update(status="failed", log_tail=f"scoring failed: {type(e).__name__}: {e}")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (cell_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def resummarize(grid: Grid, cell: Cell, prev: dict) -> dict:
    """A finished cell's result with losses and MIR taken again from its metrics.jsonl under the grid's
    ``mir_stage`` (score, seconds and status kept; nothing trains or scores); writes ``result.json``."""
    cell_dir = grid.cell_dir(cell)
    result = {**prev, **summarize(grid, cell_dir), "mir_stage_spec": grid.mir_stage}
    (cell_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def run_grid(grid: Grid, only: str | None = None, dry_run: bool = False, scorer: Scorer | None = None,
             out=print) -> int:
    """Validate, then run the (selected) cells in order; returns 0 when every selected cell is ok."""
    cells = grid.cells()
    if only is not None and only not in {c.name for c in cells}:
        raise GridError(f"--only {only!r}: no such cell; cells: {', '.join(c.name for c in cells)}")
    digests = validate(grid, cells)
    selected = [c for c in cells if only is None or c.name == only]
    if dry_run:
        for i, cell in enumerate(selected, 1):
            prev, prev_hash = previous_attempt(grid, cell)
            same = prev_hash == digests[cell.name]
            state = (prev or {}).get("status", "pending") if same else "pending"
            fresh = prev_hash is not None and not same
            out(f"[{i}/{len(selected)}] {cell.name} ({state}{'; settings changed, starts over' if fresh else ''})"
                f"\n    {shlex.join(command(grid, cell))}")
        return 0
    if scorer is None:
        scorer = default_scorer(grid.score.type)
    failed = []
    for i, cell in enumerate(selected, 1):
        head = f"[{i}/{len(selected)}] {cell.name}:"
        digest = digests[cell.name]
        prev, prev_hash = previous_attempt(grid, cell)
        same = prev_hash == digest
        if same and prev is not None and prev.get("status") == "ok":
            if prev.get("score_spec") == dataclasses.asdict(grid.score):
                if "mir_stage_spec" in prev and prev["mir_stage_spec"] == grid.mir_stage:
                    out(f"{head} skip (done)")
                    continue
                result = resummarize(grid, cell, prev)  # mir_stage changed (or not recorded yet): no retraining
                where = f" from stage {result['mir_stage']}" if result.get("mir_stage") else ""
                out(f"{head} trained; MIR summarised again{where}: "
                    f"MIR {_fmt(result['mir_first'])} -> {_fmt(result['mir_final'])}")
                continue
            out(f"{head} trained; scoring again ({grid.score.type})")
            result = run_cell(grid, cell, scorer, out, train=False, digest=digest)
        else:
            fresh = prev_hash is not None and not same
            if fresh:
                out(f"{head} settings changed since the last attempt (config hash {prev_hash} -> {digest}): starting "
                    f"over; the earlier attempt moves to {grid.cell_dir(cell) / 'superseded'}/")
            again = f" (again: last attempt {(prev or {}).get('status', 'interrupted')})" if same else ""
            out(f"{head} training{again} -> {grid.cell_dir(cell) / 'train.log'}")
            result = run_cell(grid, cell, scorer, out, fresh=fresh, digest=digest)
        if result["status"] != "ok":
            failed.append(cell.name)
            out(f"{head} {result['status'].upper()} after {result['seconds']:.0f} s; last lines:\n"
                + "\n".join("    " + line for line in str(result.get("log_tail", "")).splitlines()[-15:]))
        else:
            out(f"{head} ok in {result['seconds']:.0f} s: loss {_fmt(result['first_loss'])} -> "
                f"{_fmt(result['final_loss'])}, MIR {_fmt(result['mir_first'])} -> {_fmt(result['mir_final'])}, "
                f"score {_fmt(result['score'])}")
    from lvlm.ablate.report import write_report

    out(write_report(grid, cells, digests))
    if failed:
        out(f"{len(failed)} cell(s) not ok: {', '.join(failed)} (re-run the same command to retry them)")
        return 1
    return 0
