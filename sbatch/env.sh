# kerasfrac site setup: the ONE file that knows where software, data and runs live.
# Sourced by every sbatch/*.sbatch script; switch sites (Greene -> Torch, or a laptop) here or
# with environment variables, never in the job scripts.
#
#   source sbatch/env.sh; kf_run kerasfrac train --config configs/fracatlas_orig.yaml
#   bash sbatch/env.sh kerasfrac train ...     # the same, as one command (what srun runs)
#
# Choose how Python is found with KERASFRAC_ENV (export it in ~/.bashrc, or per job with
# `sbatch --export=ALL,KERASFRAC_ENV=venv,KERASFRAC_VENV=/path/.venv ...`):
#
#   singularity  Greene's recommended way: a Singularity image plus a conda env inside an ext3
#                overlay (mounted read-only, so many jobs can share it), activated by the
#                overlay's /ext3/env.sh. Every command runs as
#                  singularity exec --nv --overlay $KERASFRAC_OVERLAY:ro $KERASFRAC_SIF \
#                      /bin/bash -c "source /ext3/env.sh; <command>"
#                KERASFRAC_SIF      image   (default: Greene's CUDA 12.1 / cuDNN 8.9 Ubuntu 22.04)
#                KERASFRAC_OVERLAY  overlay (default: $SCRATCH/kerasfrac/overlay-15GB-500K.ext3)
#                KERASFRAC_SINGULARITY_ARGS  extra `singularity exec` args (e.g. "--bind /vast")
#   venv         a Python venv: KERASFRAC_VENV (default: <repo>/.venv)
#   conda        a conda env: KERASFRAC_CONDA_ENV (name or prefix), conda found on PATH or
#                after `module load $KERASFRAC_MODULES` (e.g. "anaconda3/2020.07")
#
# Data and runs (on $SCRATCH, never /home: Greene caps /home at 30K files; $SCRATCH files unused
# for 60 days are purged):
#   KERASFRAC_DATA  TFRecord builds, one folder per dataset  (default $SCRATCH/kerasfrac/tfrecords;
#                   configs/*.yaml read data.dir: $KERASFRAC_DATA/<dataset>)
#   KERASFRAC_RUNS  run directories                          (default $SCRATCH/kerasfrac/runs)
#   KERASFRAC_RAW   downloaded raw datasets for build.sbatch (default $SCRATCH/kerasfrac/raw)
#   KERASFRAC_REPO  this repository                          (default: where you ran sbatch)
#
# Slurm options that differ per site or allocation are NOT variables in the scripts: sbatch
# reads them from its own environment (SBATCH_ACCOUNT, SBATCH_PARTITION, SBATCH_GRES, ...) or
# the command line, both of which override the #SBATCH lines:
#   export SBATCH_ACCOUNT=pr_123_general      # Greene: only some allocations; Torch: required
# shellcheck shell=bash

# Errors return 1 (a sourcing job script with `set -e` stops; an interactive shell survives).
kf_die() {
    echo "kerasfrac env.sh: error: $*" >&2
    return 1
}

# --- where things are ------------------------------------------------------------------------
# The scripts are copied into Slurm's spool before they run, so their own path says nothing about
# the repository: it is the submit directory unless KERASFRAC_REPO says otherwise.
if [[ -z ${KERASFRAC_REPO:-} ]]; then
    if [[ -n ${SLURM_SUBMIT_DIR:-} && -f ${SLURM_SUBMIT_DIR}/sbatch/env.sh ]]; then
        KERASFRAC_REPO=$SLURM_SUBMIT_DIR
    else
        KERASFRAC_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
fi
export KERASFRAC_REPO

_kf_scratch_default() { # $1: variable name, $2: sub-path under $SCRATCH/kerasfrac
    if [[ -n ${!1:-} ]]; then
        export "${1?}"
    elif [[ -n ${SCRATCH:-} ]]; then
        export "$1=$SCRATCH/kerasfrac/$2"
    else
        kf_die "$1 is not set and neither is SCRATCH; export $1=/path (or SCRATCH=/scratch/\$USER)"
    fi
}
_kf_scratch_default KERASFRAC_DATA tfrecords || return 1 2>/dev/null || exit 1
_kf_scratch_default KERASFRAC_RUNS runs || return 1 2>/dev/null || exit 1
export KERASFRAC_RAW=${KERASFRAC_RAW:-$(dirname "$KERASFRAC_DATA")/raw}

# --- how Python is found -----------------------------------------------------------------------
export KERASFRAC_ENV=${KERASFRAC_ENV:-}
case $KERASFRAC_ENV in
singularity)
    export KERASFRAC_SIF=${KERASFRAC_SIF:-/scratch/work/public/singularity/cuda12.1.1-cudnn8.9.0-devel-ubuntu22.04.2.sif}
    export KERASFRAC_OVERLAY=${KERASFRAC_OVERLAY:-${SCRATCH:-/scratch/$USER}/kerasfrac/overlay-15GB-500K.ext3}
    export KERASFRAC_SINGULARITY_ARGS=${KERASFRAC_SINGULARITY_ARGS:-}
    command -v singularity >/dev/null ||
        kf_die "KERASFRAC_ENV=singularity but 'singularity' is not on PATH (run on a compute node)" ||
        return 1 2>/dev/null || exit 1
    [[ -f $KERASFRAC_SIF ]] || kf_die "Singularity image not found: KERASFRAC_SIF=$KERASFRAC_SIF" ||
        return 1 2>/dev/null || exit 1
    [[ -f $KERASFRAC_OVERLAY ]] || kf_die "overlay not found: KERASFRAC_OVERLAY=$KERASFRAC_OVERLAY" \
        "(copy /scratch/work/public/overlay-fs-ext3/overlay-15GB-500K.ext3.gz there and gunzip it;" \
        "see README 'Running on Greene')" || return 1 2>/dev/null || exit 1
    ;;
venv)
    export KERASFRAC_VENV=${KERASFRAC_VENV:-$KERASFRAC_REPO/.venv}
    [[ -f $KERASFRAC_VENV/bin/activate ]] ||
        kf_die "KERASFRAC_ENV=venv but $KERASFRAC_VENV/bin/activate does not exist (set KERASFRAC_VENV)" ||
        return 1 2>/dev/null || exit 1
    # shellcheck disable=SC1091
    source "$KERASFRAC_VENV/bin/activate"
    ;;
conda)
    [[ -n ${KERASFRAC_CONDA_ENV:-} ]] ||
        kf_die "KERASFRAC_ENV=conda needs KERASFRAC_CONDA_ENV (an env name or prefix)" ||
        return 1 2>/dev/null || exit 1
    if [[ -n ${KERASFRAC_MODULES:-} ]]; then
        # shellcheck disable=SC2086
        module purge && module load $KERASFRAC_MODULES
    fi
    command -v conda >/dev/null || kf_die "KERASFRAC_ENV=conda but 'conda' is not on PATH" \
        "(set KERASFRAC_MODULES, e.g. anaconda3/2020.07)" || return 1 2>/dev/null || exit 1
    # shellcheck disable=SC1091
    source "$(conda info --base)/etc/profile.d/conda.sh"
    conda activate "$KERASFRAC_CONDA_ENV"
    ;;
"")
    kf_die "KERASFRAC_ENV is not set. Choose how jobs find Python:
    export KERASFRAC_ENV=singularity   # Greene: KERASFRAC_SIF + KERASFRAC_OVERLAY (/ext3/env.sh)
    export KERASFRAC_ENV=venv          # KERASFRAC_VENV=/path/to/.venv (default <repo>/.venv)
    export KERASFRAC_ENV=conda         # KERASFRAC_CONDA_ENV=name [KERASFRAC_MODULES=anaconda3/...]
  (in ~/.bashrc, or per job: sbatch --export=ALL,KERASFRAC_ENV=venv ...). See sbatch/env.sh." ||
        return 1 2>/dev/null || exit 1
    ;;
*)
    kf_die "KERASFRAC_ENV=$KERASFRAC_ENV: expected singularity, venv or conda" ||
        return 1 2>/dev/null || exit 1
    ;;
esac

# kf_exec COMMAND [ARGS...]: replace this shell by COMMAND run in the configured environment
# (so signals sent to this process reach COMMAND itself).
kf_exec() {
    if [[ $KERASFRAC_ENV == singularity ]]; then
        # shellcheck disable=SC2086
        exec singularity exec --nv $KERASFRAC_SINGULARITY_ARGS --overlay "$KERASFRAC_OVERLAY:ro" \
            "$KERASFRAC_SIF" /bin/bash -c "source /ext3/env.sh; exec $(printf '%q ' "$@")"
    fi
    exec "$@"
}

# kf_run COMMAND [ARGS...]: run one command in the configured environment (same arguments,
# same exit code, in every mode).
kf_run() { (kf_exec "$@"); }

# kf_train [--host] COMMAND [ARGS...]: run a training command like kf_run (--host: as it is, on
# the host, e.g. `srun ... bash sbatch/env.sh kerasfrac train ...`), so that a SIGTERM to this
# shell (Slurm preemption, or `#SBATCH --signal=B:TERM@...` before the time limit) reaches it,
# then requeue the job if training exited with 75 (checkpoint saved after SIGTERM): with
# --requeue and --auto-resume the job continues where it stopped. At most
# KERASFRAC_MAX_REQUEUES (default 20) requeues. Returns training's exit code.
kf_train() {
    local child rc _kf_signalled=0
    if [[ ${1:-} == --host ]]; then
        shift
        "$@" &
    else
        kf_exec "$@" & # the background subshell execs: $! is the command itself
    fi
    child=$!
    trap '_kf_signalled=1; kill -TERM "$child" 2>/dev/null' TERM
    trap '_kf_signalled=1; kill -INT "$child" 2>/dev/null' INT
    # `wait` returns early (>128) when a trapped signal arrives: then wait again for the real
    # status (bash keeps it even if the child has exited meanwhile).
    while true; do
        rc=0
        wait "$child" || rc=$?
        if ((rc > 128 && _kf_signalled)); then
            _kf_signalled=0
            continue
        fi
        break
    done
    trap - TERM INT
    if [[ $rc -eq 75 && -n ${SLURM_JOB_ID:-} ]]; then
        local job=${SLURM_JOB_ID} restarts=${SLURM_RESTART_COUNT:-0}
        [[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
        if ((restarts < ${KERASFRAC_MAX_REQUEUES:-20})); then
            echo "kerasfrac: training stopped on SIGTERM with a checkpoint; requeueing job $job" \
                "(restart $((restarts + 1)))"
            # Under preemption Slurm requeues the job itself; then this fails harmlessly.
            scontrol requeue "$job" 2>/dev/null || true
        else
            echo "kerasfrac: $restarts requeues already (KERASFRAC_MAX_REQUEUES); not requeueing" >&2
        fi
    fi
    return "$rc"
}

# kf_set_args "k=v k2=v2": print --set arguments for each word (values cannot contain spaces).
kf_set_args() {
    local kv
    for kv in $1; do printf -- '--set\n%s\n' "$kv"; done
}

kf_banner() {
    echo "== $(date -Is) job ${SLURM_JOB_ID:-none}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID}" \
        "on $(hostname -s) (restart ${SLURM_RESTART_COUNT:-0}); env=$KERASFRAC_ENV" \
        "data=$KERASFRAC_DATA runs=$KERASFRAC_RUNS"
}

# Executed rather than sourced (`bash sbatch/env.sh CMD ...`, e.g. under srun): run CMD.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    kf_exec "$@"
fi
