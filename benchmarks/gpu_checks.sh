#!/usr/bin/env bash
# Run ON the lent GPU machine, from the repository root, in one call (device time is scarce):
#   run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# after `bash benchmarks/gpu_wheels.sh` here. Installs the carried wheels next to the image's torch/transformers,
# runs the CUDA tests (pytest -m gpu: MIR on CUDA equals CPU; the 7B benchmark's tiny shape on CUDA) and the
# issue's end-to-end benchmark (benchmarks/mir_7b_bench.py: LLaVA-1.5-7B shape, N = 100, target < 60 s on one
# H100, peak GPU and host memory). Logs go to $OUT (what the run call brings back). Extra arguments go to
# mir_7b_bench.py (`--tiny` tries the whole script on a CPU machine: PYTHON=.venv/bin/python OUT=/tmp/g ...).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-/tmp/lvlm-gpu-checks}
mkdir -p "$out"
wheels=${LVLM_WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lvlm-site \
        "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/lvlm-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__)"; } | tee "$out/machine.txt"
"$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/unit/test_mir.py tests/unit/test_benchmarks_smoke.py \
    2>&1 | tee "$out/cuda_tests.log"
tests=${PIPESTATUS[0]}
"$PY" benchmarks/mir_7b_bench.py "$@" 2>&1 | tee "$out/mir_7b.log"
bench=${PIPESTATUS[0]}
echo "cuda tests exit $tests, benchmark exit $bench" | tee -a "$out/machine.txt"
exit $(( tests != 0 || bench != 0 ))
