#!/usr/bin/env bash
# Creates .venv (if missing) and installs the runtime (and, with --test, the test) requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # torch first: the pinned CPU wheel, so nothing later resolves a CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  # libtpu too (requirements-tpu.txt), so that tests/test_plan.py compiles for a TPU topology.
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt -r requirements-tpu.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
# The package itself, editable, so `python -m blip2_jax...` and benchmarks/ work from any directory.
.venv/bin/python -m pip install -q --no-deps -e .
