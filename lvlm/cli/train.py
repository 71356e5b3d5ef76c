"""`lvlm train [CONFIG.yaml] [--dotted.key value ...]`.

With no config file the embedded default runs: the synthetic world and toy backbones
(built and cached on first use, see ``lvlm.toy``) and LLaVA-style stage 1 on CPU. A pipeline file
(top-level ``stages:``, see ``lvlm.config.pipeline``) runs its stages in order.
"""
from __future__ import annotations

import logging
import os
import sys

from lvlm.config import ConfigError, load_config


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """First argument is a config path unless it is an option."""
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def main(argv: list[str]) -> int:
    path, overrides = split_args(argv)
    if "-h" in overrides or "--help" in overrides:
        import draccus

        from lvlm.config.schema import Config

        draccus.parse(Config, args=["--help"])  # prints every key with its docstring, then exits
    from lvlm.config.pipeline import is_pipeline, load_pipeline

    try:
        if is_pipeline(path):
            return _run_pipeline(load_pipeline(path, overrides))
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"lvlm train: config error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from lvlm import toy
    from lvlm.train.engine import shutdown
    from lvlm.train.loop import train

    cfg = toy.resolve_config(cfg)
    try:
        summary = train(cfg)
    except ConfigError as e:  # e.g. resuming under a changed config: refused before any work
        print(f"lvlm train: config error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    shutdown()
    return 0


def _run_pipeline(pipeline) -> int:
    """Every stage validated already (load_pipeline); run those not done, in order."""
    if int(os.environ.get("RANK", "0")) == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from lvlm import toy
    from lvlm.train.engine import shutdown
    from lvlm.train.loop import train
    from lvlm.train.pipeline import run_pipeline

    pipeline.stages = [(name, toy.resolve_config(cfg)) for name, cfg in pipeline.stages]
    try:
        for summary in run_pipeline(pipeline, train):
            if int(os.environ.get("RANK", "0")) == 0:
                print(format_summary(summary))
    except ConfigError as e:
        print(f"lvlm train: config error: {e}", file=sys.stderr)
        return 2
    shutdown()
    return 0


def format_summary(s) -> str:
    reached = f"{s.last_step} of {s.steps}" if s.last_step and s.last_step != s.steps else f"{s.steps}"
    lines = [f"run directory : {s.run_dir}", f"steps         : {reached}"
             + (f" (resumed from {s.resumed_from})" if s.resumed_from else "")]
    ends = s.head_tail()
    if ends is not None:
        lines.append(f"loss          : {ends[0]:.4f} -> {ends[1]:.4f} (mean of first/last 5 steps; "
                     f"{100 * (s.loss_drop or 0):.1f}% lower)")
    lines.append(f"tokens        : {s.tokens:,} supervised in {s.seconds:.1f} s")
    if s.skipped:
        lines.append("skipped       : " + ", ".join(f"{k}={v}" for k, v in sorted(s.skipped.items())))
    if s.preempted:
        lines.append("preempted     : checkpoint saved; relaunch the same command to resume")
    return "\n".join(["", "== lvlm train summary ==", *lines])
