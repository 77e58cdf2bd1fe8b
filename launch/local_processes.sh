#!/usr/bin/env bash
# N JAX processes on this machine as one run (CPU: D simulated devices each, gloo collectives), e.g. to
# try a multi-process run, or resume a pod's workdir on one machine:
#   bash launch/local_processes.sh 2 4 configs/stage1.py:demo workdirs/demo_stage1_2x4 [--config.x=y ...]
# Process 0's progress goes to the terminal, process i's log to WORKDIR.process_<i>.log. Ctrl-C or
# SIGTERM reaches every process: they checkpoint at the same step and stop; the same command (with any
# N and D) resumes.
# The persistent compilation cache stays off: only process 0 writes it and the others cannot read its
# entries, so on a second start process 0 would find its programs while the others compile, and gloo
# gives up on a collective whose other side is more than 30 s late.
set -euo pipefail
NUM=$1 DEVICES=$2 CONFIG=$3 WORKDIR=$4; shift 4
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES"
mkdir -p "$(dirname "$WORKDIR")"
pids=()
for ((i = 0; i < NUM; i++)); do
  args=(-m blip2_jax.main --config="$CONFIG" --workdir="$WORKDIR" --compilation_cache=
        --distributed --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM" --process_id="$i" "$@")
  if [ "$i" = 0 ]; then
    "$PY" "${args[@]}" &
  else
    "$PY" "${args[@]}" >"$WORKDIR.process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
