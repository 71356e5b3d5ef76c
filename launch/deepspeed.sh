#!/usr/bin/env bash
# Launch `lvlm train` with the deepspeed launcher: one node, or many through a hostfile (the launcher
# reaches the other nodes over passwordless ssh/pdsh and starts the same command there).
#
#   launch/deepspeed.sh CONFIG.yaml [--dotted.key value ...]
#
# Environment (everything after CONFIG.yaml goes to `lvlm train` unchanged):
#   HOSTFILE     multi-node: lines "hostname slots=GPUS"; the first host is the master unless MASTER_ADDR is set
#   NUM_GPUS     GPUs per node (single node default: GPUs visible here, 1 without any; multi-node: the slots)
#   MASTER_ADDR  multi-node: master host (default: the hostfile's first host)
#   MASTER_PORT  default 29500
#   DRY_RUN=1    print the command instead of running it
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

lvlm_need_config "usage: [HOSTFILE=FILE | NUM_GPUS=N] [MASTER_ADDR=HOST] [MASTER_PORT=P] $0 CONFIG.yaml [--dotted.key value ...]" "$@"
cmd=(deepspeed)
if [[ -n "${HOSTFILE:-}" ]]; then
    if [[ ! -f "$HOSTFILE" ]]; then
        echo "$0: HOSTFILE=$HOSTFILE is not a file" >&2
        exit 2
    fi
    cmd+=(--hostfile "$HOSTFILE")
    if [[ -n "${NUM_GPUS:-}" ]]; then
        cmd+=(--num_gpus "$NUM_GPUS")
    fi
    if [[ -n "${MASTER_ADDR:-}" ]]; then
        cmd+=(--master_addr "$MASTER_ADDR")
    fi
else
    cmd+=(--num_gpus "${NUM_GPUS:-$(lvlm_gpu_count)}")
fi
cmd+=(--master_port "${MASTER_PORT:-29500}")
lvlm_run "${cmd[@]}" --module lvlm train "$@"
