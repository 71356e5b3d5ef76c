"""`lvlm mir --checkpoint RUN_DIR_OR_CHECKPOINT [--mir.key value ...]`: MIR of a trained model.

Builds the model from the run's ``config.yaml``, loads the checkpoint's trained weights, builds the
probe from the run's ``mir`` section (overridable), prints MIR and writes ``mir.json`` and
``mir_layers.png`` next to the checkpoint.
"""
from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    if not argv or "--checkpoint" not in argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    i = argv.index("--checkpoint")
    if i + 1 >= len(argv):
        print("lvlm mir: --checkpoint needs a path", file=sys.stderr)
        return 2
    target, overrides = argv[i + 1], argv[:i] + argv[i + 2:]
    bad = [a for a in overrides if a.startswith("--") and not a.startswith("--mir.")]
    if bad:
        print(f"lvlm mir: only --mir.* options can be overridden, got {bad}", file=sys.stderr)
        return 2

    from lvlm.config import ConfigError, load_config
    from lvlm.train.checkpoint import find_checkpoint
    from lvlm.train.rundir import config_file

    try:
        _, ckpt = find_checkpoint(target)
        cfg = load_config(config_file(ckpt), overrides)
    except (FileNotFoundError, ConfigError) as e:
        print(f"lvlm mir: {e}", file=sys.stderr)
        return 2
    from lvlm import toy
    from lvlm.mir.api import run_mir

    cfg = toy.resolve_config(cfg)
    t0 = time.perf_counter()
    try:
        result, json_path, png_path = run_mir(cfg, ckpt)
    except ConfigError as e:  # the probe cannot be built from the mir.* sources
        print(f"lvlm mir: {e}", file=sys.stderr)
        return 2
    print(f"MIR = {result.mir:.4f} ({result.cross}, {len(result.per_layer)} layers, "
          f"{time.perf_counter() - t0:.1f} s)\nper-layer: {json_path}\nplot: {png_path}")
    return 0
