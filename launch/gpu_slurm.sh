#!/usr/bin/env bash
# One JAX process per GPU node under Slurm (untested here: no GPU cluster was lent).
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh configs/stage1.py:vit_g /shared/workdir [--config.x=y ...]
# jax.distributed.initialize() (--distributed) reads the Slurm environment for the coordinator.
# Install jax[cuda12] in .venv instead of the CPU jaxlib on the cluster.
#SBATCH --ntasks-per-node=1
set -euo pipefail
CONFIG=$1 WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
srun .venv/bin/python -m blip2_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed "$@"
