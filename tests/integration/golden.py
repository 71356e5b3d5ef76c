"""Golden numbers of an end-to-end run (torchtitan's practice): per-step loss and lr and the MIR
evaluations of the one-process reference run of test_train.py, stored in tests/assets/golden/ and
compared on every CI run.

Owns the file format and the comparison. Assumes the run is on the tiny assets (tiny_assets.py), whose
weights, tokenizer and data are a pure function of the code, so the numbers move only when what a
run computes moves, or when a dependency's numerics do (then the assets digest says which).
Rewrite after an intended change: LVLM_UPDATE_GOLDEN=1 pytest tests/integration/test_train.py -k golden
"""
from __future__ import annotations

import json
import math
import platform
from importlib.metadata import version
from pathlib import Path

from lvlm.track import read_metrics

TINY_TRAIN = Path(__file__).resolve().parents[1] / "assets" / "golden" / "tiny_train.json"
# Measured against this file (max relative change over the run): rerun, 1 or 2 threads: 0 (bit-identical);
# eager instead of SDPA attention (same maths, other rounding): loss 1.3e-7, MIR 3e-9; weight decay 0 ->
# 0.001: loss 3.1e-6; -> 0.01: 3.1e-5; lr +1%: 1.5e-3; AdamW beta2 0.99: 2.9e-4; another seed: 2.8e-2.
# 1e-5 is ~80x the rounding noise of a kernel change and below all but the smallest real change.
RTOL = {"loss": 1e-5, "lr": 1e-9, "mir": 1e-5}
UPDATE = "LVLM_UPDATE_GOLDEN=1 pytest tests/integration/test_train.py -k golden"


def record(run_dir: Path) -> dict[str, dict[str, float]]:
    """{"loss": {step: loss}, "lr": {step: lr}, "mir": {step: mir}} from a run's metrics.jsonl (steps as str)."""
    out: dict[str, dict[str, float]] = {"loss": {}, "lr": {}, "mir": {}}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r.get("kind") == "mir":
            out["mir"][str(r["step"])] = r["mir"]
        elif "loss" in r and "step" in r:
            out["loss"][str(r["step"])] = r["loss"]
            out["lr"][str(r["step"])] = r["lr"]
    return out


def write(path: Path, got: dict, assets_sha256: str) -> None:
    packages = {p: version(p) for p in ("torch", "transformers", "deepspeed", "numpy", "pillow")}
    doc = {"about": f"tests/integration/golden.py; rewrite: {UPDATE}", "assets_sha256": assets_sha256,
           "written_with": {"python": platform.python_version(), **packages}, **got}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no golden file {path}; write it with: {UPDATE}")
    return json.loads(path.read_text())


def compare(want: dict, got: dict, assets_sha256: str) -> list[str]:
    """Readable problems (empty = match): per series, missing/extra steps and values off by more than RTOL."""
    problems = []
    for key, rtol in RTOL.items():
        w, g = want.get(key, {}), got.get(key, {})
        if sorted(w, key=int) != sorted(g, key=int):
            problems.append(f"{key}: steps {sorted(g, key=int)} logged, golden has {sorted(w, key=int)}")
            continue
        for step in sorted(w, key=int):
            if not math.isclose(g[step], w[step], rel_tol=rtol, abs_tol=0.0):
                problems.append(f"{key} at step {step}: {g[step]!r}, golden {w[step]!r} "
                                f"(rel diff {abs(g[step] - w[step]) / abs(w[step]):.2e} > {rtol:g})")
    if problems:
        same = assets_sha256 == want.get("assets_sha256")
        problems.append(
            "the tiny assets are identical to the golden run's, so the training path changed"
            if same else
            f"the tiny assets differ from the golden run's (written with {want.get('written_with')}): "
            "their generation or a dependency's numerics changed")
        problems.append(f"if the change is intended, rewrite the file and commit its diff: {UPDATE}")
    return problems
