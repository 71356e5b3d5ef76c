"""Running a multi-stage pipeline (``lvlm.config.pipeline``): the stages in order, each from the previous one's
weights; a stage whose final checkpoint exists is not run again, so relaunching a pipeline continues it (refused
when a stage's config changed since its checkpoints were written, or when they were trained from another
checkpoint than its ``stage.init_from`` holds now or from a stage this launch trains again: their weights would
be stale; ``resume: false`` runs every stage again).

Writes ``RUN_DIR/pipeline.json``: ``{"stages": [{"name", "run_dir", "done", "steps"}, ...]}`` (rank 0), before
the first stage and after each.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lvlm.config.pipeline import Pipeline
from lvlm.train import checkpoint
from lvlm.train.rundir import check_resume

log = logging.getLogger("lvlm.train")


def stage_done(run_dir: Path, max_steps: int) -> bool:
    """The stage's newest complete checkpoint is its last step."""
    tag = checkpoint.latest_tag(Path(run_dir) / "checkpoints")
    return tag is not None and int(tag.split("_")[1]) >= max_steps


def _write_status(pipeline: Pipeline) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    pipeline.run_dir.mkdir(parents=True, exist_ok=True)
    status = [{"name": name, "run_dir": cfg.run_dir, "done": stage_done(Path(cfg.run_dir), cfg.train.max_steps),
               "steps": cfg.train.max_steps} for name, cfg in pipeline.stages]
    (pipeline.run_dir / "pipeline.json").write_text(json.dumps({"stages": status}, indent=2))


def check_stages(pipeline: Pipeline) -> None:
    """Before any stage runs: a stage with checkpoints (finished or not) whose config changed since is refused
    (``rundir.check_resume``; ConfigError naming the stage), unless it starts over (``resume: false``); so is
    one whose checkpoints started from another checkpoint than its ``stage.init_from`` holds now, or from a
    stage that this launch trains (again) before it."""
    from lvlm.config import ConfigError

    trains: dict[Path, str] = {}  # run dirs of the stages this launch trains -> their names
    for name, cfg in pipeline.stages:
        run = Path(cfg.run_dir)
        fresh = str(cfg.resume).lower() == "false"
        if not fresh:
            try:
                check_resume(run, cfg)
                _check_start(name, cfg, trains)
            except ConfigError as e:
                raise ConfigError(f"pipeline stage '{name}': {e}\nIn this pipeline, for this stage only: "
                                  f"--stages.{name}.resume false (train it again) or --stages.{name}.resume force "
                                  f"(continue it anyway)") from None
        if fresh or not stage_done(run, cfg.train.max_steps):
            trains[run.resolve()] = name


def _check_start(name: str, cfg, trains: dict[Path, str]) -> None:
    """Refuse reusing a stage's checkpoints that started from a stage this launch trains (again) before it
    (``check_resume`` refuses those whose start point was already retrained: ``rundir.start_change``)."""
    from lvlm.config import ConfigError

    tag = checkpoint.latest_tag(Path(cfg.run_dir) / "checkpoints") if cfg.stage.init_from else None
    recorded = checkpoint.marker(Path(cfg.run_dir) / "checkpoints" / tag).get("started_from") if tag else None
    if recorded is None:  # nothing trained yet, no start point, or checkpoints older than the record
        return
    start = Path(cfg.stage.init_from).resolve()
    for run, upstream in trains.items():
        if start == run or run in start.parents:
            raise ConfigError(f"its checkpoints were trained from stage '{upstream}' ({recorded['checkpoint']}), "
                              f"which this launch trains again: they would be stale; retrain it too "
                              f"(--stages.{name}.resume false, or resume: false for every stage)")


def run_pipeline(pipeline: Pipeline, train_fn) -> list:
    """``train_fn(cfg)`` for every stage not yet done (every stage with ``resume: false``); returns the
    summaries of the stages run."""
    check_stages(pipeline)
    summaries = []
    _write_status(pipeline)
    for i, (name, cfg) in enumerate(pipeline.stages):
        if str(cfg.resume).lower() != "false" and stage_done(Path(cfg.run_dir), cfg.train.max_steps):
            log.info("pipeline stage %d/%d '%s': done already (%s), skipped", i + 1, len(pipeline.stages), name,
                     cfg.run_dir)
            continue
        log.info("pipeline stage %d/%d '%s' -> %s%s", i + 1, len(pipeline.stages), name, cfg.run_dir,
                 f" (from {cfg.stage.init_from})" if cfg.stage.init_from else "")
        summaries.append(train_fn(cfg))
        _write_status(pipeline)
    return summaries
