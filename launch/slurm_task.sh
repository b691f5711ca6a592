#!/usr/bin/env bash
# One training rank under `srun` (used by launch/slurm.sbatch): SLURM's task coordinates become the
# RANK / LOCAL_RANK / WORLD_SIZE variables every reformer-dist rank reads; MASTER_ADDR and MASTER_PORT
# come from the batch script. Signals from `sbatch --signal` reach this process directly (exec).
set -euo pipefail
export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
: "${MASTER_ADDR:?export MASTER_ADDR (the first node of the allocation)}" "${MASTER_PORT:?export MASTER_PORT}"
exec python -m reformer_dist train "$@"
