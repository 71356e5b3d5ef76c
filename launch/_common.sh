# Helpers sourced by the launch/*.sh scripts (not run directly).
#
# lvlm_run CMD...   runs CMD, or with DRY_RUN=1 prints it as one shell-quoted line and returns 0.
# lvlm_gpu_count    GPUs this node would use: CUDA_VISIBLE_DEVICES entries, else `nvidia-smi -L`
#                   lines, else 1 (a CPU machine).
# lvlm_need_config  exits with the caller's usage text when no CONFIG argument was given.
set -euo pipefail

# Preemption (lvlm checkpoints and exits 0 on SIGTERM or SIGUSR1): torchrun forwards to the workers only the
# signals it handles (default SIGTERM, SIGINT, SIGHUP, SIGQUIT; a SIGUSR1, Slurm's usual warning signal, killed
# torchrun and left the workers running) and SIGKILLs them 30 s after forwarding. Handle SIGUSR1 too and give
# the workers time to finish their step and write the checkpoint (overridable).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-$PET_SIGNALS_TO_HANDLE}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

lvlm_quote() {  # one line; a word is kept as-is when safe, else single-quoted
    local out="" arg q="'"
    for arg in "$@"; do
        if [[ ! "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            arg="$q${arg//$q/$q\\$q$q}$q"
        fi
        out+="${out:+ }$arg"
    done
    printf '%s\n' "$out"
}

lvlm_run() {
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        lvlm_quote "$@"
        return 0
    fi
    exec "$@"
}

lvlm_gpu_count() {
    local n=""
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local -a ids
        IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        n=${#ids[@]}
    elif command -v nvidia-smi > /dev/null 2>&1; then
        n=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
    fi
    if [[ -z "$n" || "$n" == "0" ]]; then
        n=1
    fi
    printf '%s\n' "$n"
}

lvlm_need_config() {
    local usage=$1
    shift
    if [[ $# -lt 1 || "$1" == -* ]]; then
        printf '%s\n' "$usage" >&2
        exit 2
    fi
}
