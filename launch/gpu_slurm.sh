#!/usr/bin/env bash
# One JAX process per GPU node under Slurm (untested here: no GPU cluster was lent).
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh configs/stage1.py:vit_g /shared/workdir [--config.x=y ...]
# jax.distributed.initialize() (--distributed, no other flag) reads the Slurm environment for the
# coordinator, the process count and this process's index. Without Slurm, give them yourself:
#   --distributed --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
# Install jax[cuda12] in .venv instead of the CPU jaxlib on the cluster. The workdir must be on a file
# system every node sees; a checkpoint resumes on another node count with the same data position
# (docs/training.md, "Many processes").
#SBATCH --ntasks-per-node=1
set -euo pipefail
CONFIG=$1 WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
srun .venv/bin/python -m blip2_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed "$@"
