#!/usr/bin/env bash
# Runs the same entrypoint on every host of a Cloud TPU pod slice (untested here: no TPU was lent).
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/stage1.py:vit_g gs://BUCKET/workdir [--config.x=y ...]
# Each host needs the repo at ~/blip2_jax and `bash launch/setup.sh` run once, plus jax[tpu] instead of
# the CPU jaxlib. The data and the workdir must be reachable from every host (e.g. GCS).
# `--distributed` with no other flag: jax.distributed.initialize() finds the slice's hosts itself. Each
# host reads only its block of every global batch; a checkpoint resumes on a slice of another size (or on
# a GPU cluster, or on one machine: launch/local_processes.sh) with the same data position, the mesh set by
# --config.mesh.* (docs/training.md, "Many processes").
set -euo pipefail
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4; shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/blip2_jax && .venv/bin/python -m blip2_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed $*"
