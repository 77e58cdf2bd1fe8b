#!/usr/bin/env bash
# Sets up .venv with the test requirements and runs the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1
# Two pytest workers (pytest-xdist), one test file each at a time: most of a test's time is XLA
# compilation, which runs on one core, so a second worker fills the other. BLIP2_JAX_TEST_WORKERS=0 runs
# the suite in this process (e.g. to debug one test).
workers=${BLIP2_JAX_TEST_WORKERS:-2}
if [ "$workers" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
