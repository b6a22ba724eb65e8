#!/usr/bin/env bash
# Run lees_jax on NVIDIA GPUs: one node with all its GPUs, or many nodes (one process each).
#
# Single node, all local GPUs (data-parallel over a 'batch' mesh of every GPU):
#   launch/gpu.sh --config=configs/cifar10.py --config.mode=pretrain --workdir=workdirs/pretrain
#   CUDA_VISIBLE_DEVICES=0,1 launch/gpu.sh --config=configs/cifar10.py --config.mode=train_gates \
#       --config.backbone=workdirs/pretrain --workdir=workdirs/gates
#
# Multi-node under SLURM (one task per node; coordinator, process count and id come from SLURM):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu.sh \
#       --config=configs/cifar10.py --config.mode=pretrain --workdir=/shared/workdirs/pretrain
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu.sh \
#       --config=configs/cifar10.py --config.mode=experiment --config.experiment.robustness=False \
#       --config.backbone=/shared/workdirs/pretrain --workdir=/shared/workdirs/study
# (every mode but `latents` runs across nodes; process 0 alone writes results; CIFAR-10-C
# robustness is one-host only.)
#
# Multi-node without SLURM: run this on every node with
#   COORDINATOR_ADDRESS=host0:1234 NUM_PROCESSES=2 PROCESS_ID=<0|1> launch/gpu.sh <flags>
#
# The workdir must be on a filesystem every node sees (or gs://). Install JAX for CUDA
# first: pip install -r requirements.txt "jax[cuda12]==0.10.2". A killed run resumes from
# its latest checkpoint when the same command is run again.
set -euo pipefail

PYTHON=${PYTHON:-python}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# Let XLA grow into GPU memory as needed; TensorFlow is kept off the GPUs by lees_jax.data.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}

if [[ "${NUM_PROCESSES:-1}" -gt 1 ]]; then
  : "${COORDINATOR_ADDRESS:?set COORDINATOR_ADDRESS=host:port (the process-0 node)}"
  : "${PROCESS_ID:?set PROCESS_ID (0 .. NUM_PROCESSES-1)}"
  echo "lees_jax: process $PROCESS_ID of $NUM_PROCESSES, coordinator $COORDINATOR_ADDRESS" >&2
  exec "$PYTHON" -c '
import os, sys
import jax
jax.distributed.initialize(coordinator_address=os.environ["COORDINATOR_ADDRESS"],
                           num_processes=int(os.environ["NUM_PROCESSES"]),
                           process_id=int(os.environ["PROCESS_ID"]))
from absl import app
from lees_jax import main
sys.argv[0] = "lees_jax.main"
app.run(main.main)
' "$@"
fi

# Single process (one node), or one SLURM task: lees_jax.main calls
# jax.distributed.initialize() itself when SLURM_NTASKS > 1 (auto-detected from SLURM).
exec "$PYTHON" -m lees_jax.main "$@"
