#!/usr/bin/env bash
# Sets up .venv with the test requirements and runs the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
