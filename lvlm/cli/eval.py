"""`lvlm eval toy-vqa CHECKPOINT_OR_RUN_DIR [--questions PATH] [--limit N]`: downstream scores of a checkpoint.

toy-vqa: the toy world's held-out questions (colour, shape, count, position; default
``toy://world/vqa/val.json``, images from ``images/`` beside the file) answered greedily by the model
rebuilt from the run's ``config.yaml`` and the checkpoint's trained weights, scored by exact match.
Prints a table per question type and writes ``toy_vqa.json`` next to the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time

BENCHMARKS = ("toy-vqa",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm eval", description=__doc__.split("\n")[0])
    p.add_argument("benchmark", choices=BENCHMARKS)
    p.add_argument("checkpoint", help="run directory (newest complete checkpoint) or a checkpoint directory")
    p.add_argument("--questions", default=None, help="LLaVA-style JSON with a 'type' per record (default: toy val)")
    p.add_argument("--limit", type=int, default=0, help="ask only the first N questions (0 = all)")
    return p


def format_table(result: dict) -> str:
    lines = [f"{'type':<10} {'n':>5} {'correct':>8} {'score':>7}"]
    for name, t in result["per_type"].items():
        lines.append(f"{name:<10} {t['n']:>5} {t['correct']:>8} {t['score']:>7.3f}")
    lines.append(f"{'all':<10} {result['n']:>5} {result['correct']:>8} {result['score']:>7.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the reason
        return int(e.code or 0)

    from lvlm.config import ConfigError
    from lvlm.eval.toy_vqa import REPORT, evaluate

    t0 = time.perf_counter()
    try:
        result = evaluate(args.checkpoint, questions=args.questions, limit=args.limit)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"lvlm eval: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    for ex in result["examples"][:4]:
        print(f"  {ex['question']!r} -> {ex['prediction']!r} (answer {ex['answer']!r})")
    print(f"{result['n']} questions in {time.perf_counter() - t0:.1f} s; wrote {result['checkpoint']}/{REPORT}")
    return 0
