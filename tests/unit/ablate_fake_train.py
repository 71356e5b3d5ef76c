"""A stand-in for `lvlm train` used as an ablation launcher in unit tests: no model, just files.

    python ablate_fake_train.py CONFIG.yaml --key value ... --run_dir DIR

Writes DIR/metrics.jsonl like the real loop (MIR at step 0 and at the end, one loss per step, a
summary line), appends one line per call to DIR/calls.txt, and exits 1 when the run dir's name
appears in the ABLATE_FAKE_FAIL environment variable. Loss and MIR fall with a larger optim.lr.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    args = dict(zip(argv[2::2], argv[3::2]))  # argv[1] is the config
    run_dir = Path(args["--run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "calls.txt", "a") as f:
        f.write(" ".join(argv) + "\n")
    print(f"fake training in {run_dir}")
    if run_dir.name in os.environ.get("ABLATE_FAKE_FAIL", "").split(","):
        print("Traceback: boom (fake failure)", file=sys.stderr)
        return 1
    lr = float(args.get("--optim.lr", "1e-3"))
    steps = int(args.get("--train.max_steps", "4"))
    bonus = 0.5 if args.get("--stage.train_llm") == "true" else 0.0
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "mir", "step": 0, "mir": 4.0}) + "\n")
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": 5.0 - step * lr * 100}) + "\n")
        f.write(json.dumps({"kind": "mir", "step": steps, "mir": 4.0 - lr * 1000 - bonus}) + "\n")
        f.write(json.dumps({"kind": "summary", "first_loss": 5.0, "last_loss": 1.0, "preempted": False}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
