#!/usr/bin/env bash
# Launch `lvlm train` with torchrun: one node, or one node of a multi-node job (c10d rendezvous).
#
#   launch/torchrun.sh CONFIG.yaml [--dotted.key value ...]
#
# Environment (everything after CONFIG.yaml goes to `lvlm train` unchanged):
#   NPROC        processes on this node (default: GPUs visible here, 1 without any)
#   NNODES       nodes in the job (default 1). With NNODES > 1, run this script on every node with
#   NODE_RANK    this node's rank, 0..NNODES-1 (required when NNODES > 1)
#   MASTER_ADDR  host of the rendezvous store, reachable from every node (required when NNODES > 1)
#   MASTER_PORT  its port (default 29500)
#   RDZV_ID      rendezvous id shared by the nodes of one job (default lvlm)
#   DRY_RUN=1    print the command instead of running it
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

lvlm_need_config "usage: [NPROC=N] [NNODES=N NODE_RANK=R MASTER_ADDR=HOST [MASTER_PORT=P]] $0 CONFIG.yaml [--dotted.key value ...]" "$@"
nnodes=${NNODES:-1}
nproc=${NPROC:-$(lvlm_gpu_count)}
cmd=(torchrun --nnodes "$nnodes" --nproc_per_node "$nproc")
if [[ "$nnodes" == "1" ]]; then
    cmd+=(--standalone)
else
    : "${NODE_RANK:?NODE_RANK must be set when NNODES > 1}"
    : "${MASTER_ADDR:?MASTER_ADDR must be set when NNODES > 1}"
    cmd+=(--node_rank "$NODE_RANK" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
          --rdzv_id "${RDZV_ID:-lvlm}")
fi
lvlm_run "${cmd[@]}" -m lvlm train "$@"
