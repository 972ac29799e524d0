#!/bin/bash
# Pretrain on several machines under SLURM: one `accelerate launch` per node, each starting one
# process per GPU (or, on CPU-only nodes, PROCS_PER_NODE processes using gloo).
#
#   sbatch --nodes=2 tools/slurm_train.sh --config imagenet output_dir=/shared/runs/in1k
#
# output_dir must be on storage every node sees (NFS, Lustre, ...): the processes check this at
# start and stop with an error otherwise. Resubmitting the same command resumes from the newest
# checkpoint; with --requeue, SLURM's SIGTERM before pre-emption makes the run write a checkpoint
# at the next step boundary first (signal delivered to the job steps: --signal below).
#
#SBATCH --job-name=ensiam
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

export PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export NUM_NODES=${SLURM_NNODES:-1}
export MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PORT=${MAIN_PORT:-29500}
# A collective that waits longer than this (a node died or froze) ends every process with an error.
export DIST_TIMEOUT_S=${DIST_TIMEOUT_S:-600}
# The interpreter whose packages run the job (default: python3 on PATH; e.g. PYTHON=$VENV/bin/python).
export PYTHON=${PYTHON:-python3}

# `srun` starts one launcher per node; SLURM_NODEID is that node's rank. The training arguments
# pass through unchanged ("$@").
srun --kill-on-bad-exit=1 bash -c '
  "$PYTHON" -m accelerate.commands.launch --multi_gpu \
    --num_machines "$NUM_NODES" --num_processes $((NUM_NODES * PROCS_PER_NODE)) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_HOST" --main_process_port "$MAIN_PORT" \
    --mixed_precision no --dynamo_backend no \
    ensiam_fast/train.py "$@" dist_timeout_s="$DIST_TIMEOUT_S"
' _ "$@"
