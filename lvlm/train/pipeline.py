"""Running a multi-stage pipeline (``lvlm.config.pipeline``): the stages in order, each from the previous one's
weights; a stage whose final checkpoint exists is not run again, so relaunching a pipeline continues it.

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


def run_pipeline(pipeline: Pipeline, train_fn) -> list:
    """``train_fn(cfg)`` for every stage not yet done; returns the summaries of the stages run."""
    summaries = []
    _write_status(pipeline)
    for i, (name, cfg) in enumerate(pipeline.stages):
        if stage_done(Path(cfg.run_dir), cfg.train.max_steps):
            log.info("pipeline stage %d/%d '%s': done already (%s), skipped", i + 1, len(pipeline.stages), name,
                     cfg.run_dir)
            continue
        log.info("pipeline stage %d/%d '%s' -> %s%s", i + 1, len(pipeline.stages), name, cfg.run_dir,
                 f" (from {cfg.stage.init_from})" if cfg.stage.init_from else "")
        summaries.append(train_fn(cfg))
        _write_status(pipeline)
    return summaries
