"""Entry point: `python -m blip2_jax.main --config=configs/stage1.py[:variant] --workdir=DIR`.

Validates the config before any compute, builds the mesh, asks the stage the config names
(`config.task`) for its Task and data factory, runs the shared train loop, and prints the final
metrics as one JSON object on the last line of stdout (progress goes to stderr).

A stage module `blip2_jax/train/<stage>.py` exposes:
  make_task(config, mesh) -> blip2_jax.train.task.Task
  make_data(config) -> zero-argument factory of the per-process data iterator
"""
from __future__ import annotations

import json
import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from blip2_jax import compilation_cache, config_validation, distributed, flag_errors, sharding
from blip2_jax.train import loop, stage1, stage2, text_lm

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg)); override fields with --config.x=y.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard logs; a run "
                               "resumes from the latest checkpoint found here.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Persistent XLA compilation cache directory (default: "
    f"$BLIP2_JAX_COMPILATION_CACHE or {compilation_cache.DEFAULT_DIRECTORY}); empty = off.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                                 "(multi-process runs: TPU pods, GPU clusters, several processes on one "
                                 "machine); with no other flag the cluster's environment names the processes.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0's "
                                   "coordinator (for clusters without a TPU/SLURM integration).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")


STAGES = {"stage1": stage1, "stage2": stage2, "text_lm": text_lm}


def stage_module(task_name: str):
    """The stage module for `config.task`."""
    if task_name not in STAGES:
        raise ValueError(f"config.task={task_name!r}: expected one of {', '.join(STAGES)}")
    return STAGES[task_name]


def run(config, workdir: str) -> dict:
    """Validates `config` (raising `ConfigError`, which names every bad field, before any compute), then
    trains the stage it names in `workdir`; returns the final metrics."""
    config_validation.validate(config)
    stage = stage_module(config.task)
    mesh = sharding.make_mesh(config.mesh)
    return loop.train(config, stage.make_task(config, mesh), stage.make_data(config), workdir, mesh=mesh)


def start_processes() -> None:
    """`--distributed` (and its three optional flags): joins the other processes of the run. A flag
    mistake is one `error: ...` line and exit status 2."""
    process_flags = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        if not _DISTRIBUTED.value:
            if any(v is not None for v in process_flags):
                raise ValueError("--coordinator_address, --num_processes and --process_id need --distributed")
            return
        distributed.initialize(*process_flags)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(flag_errors.USAGE_EXIT_CODE)


def cache_directory(flag: str | None) -> str | None:
    """The compilation cache `--compilation_cache` asks for, except that several CPU processes get none
    unless the flag names one: JAX writes the cache from process 0 only and the other processes look it
    up under other keys, so on a restart process 0 would load while the rest compile, and gloo gives up
    on a collective whose peer is more than 30 s late."""
    if flag is None and jax.process_count() > 1 and jax.default_backend() == "cpu":
        logging.info("multi-process CPU run: persistent compilation cache off (--compilation_cache=DIR forces it)")
        return ""
    return flag


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    start_processes()
    compilation_cache.enable(cache_directory(_COMPILATION_CACHE.value))
    try:
        metrics = run(_CONFIG.value, _WORKDIR.value)
    except config_validation.ConfigError as e:  # one block naming the fields, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.stderr.flush()
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    # A bad flag or --config.x=y override: one `error: ...` line and exit status 2, no traceback.
    app.run(main, flags_parser=flag_errors.parse_flags)
