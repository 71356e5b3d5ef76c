#!/usr/bin/env bash
# Run `lvlm train` as NPROC processes on CPU (gloo): multi-process logic on a laptop, no GPU used.
#
#   launch/cpu_debug.sh CONFIG.yaml [--dotted.key value ...]
#
# Environment (everything after CONFIG.yaml goes to `lvlm train` unchanged):
#   NPROC      processes (default 2)
#   DRY_RUN=1  print the command instead of running it
# GPUs are hidden (CUDA_VISIBLE_DEVICES=""), so torch sees none and lvlm picks gloo;
# DS_ACCELERATOR=cpu makes DeepSpeed use its CPU accelerator without probing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

lvlm_need_config "usage: [NPROC=N] $0 CONFIG.yaml [--dotted.key value ...]" "$@"
lvlm_run env CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu \
    torchrun --standalone --nnodes 1 --nproc_per_node "${NPROC:-2}" -m lvlm train "$@"
