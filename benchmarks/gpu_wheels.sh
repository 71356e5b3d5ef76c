#!/usr/bin/env bash
# Run HERE (where pip reaches the package registry), before a session's first call to the lent GPU machine.
# Its image has python3 3.12 with torch, transformers, peft, accelerate, scipy, pytest (see the device tool's
# KINDS.md) but not these pure-Python dependencies of lvlm; it cannot download anything. This puts their
# wheels in .whl/ (git-ignored), which the run call carries: run(command="bash benchmarks/gpu_checks.sh",
# carry=[".whl"]). Versions: the ones CI's install resolves today (pip show in .venv), pinned so the two
# machines run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    draccus==0.11.6 mergedeep==1.3.4 toml==0.10.2 webdataset==1.0.2 braceexpand==0.1.7
ls -l .whl
