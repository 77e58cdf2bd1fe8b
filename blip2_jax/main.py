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
import sys

from absl import app, flags
from ml_collections import config_flags

from blip2_jax import flag_errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg)); override fields with --config.x=y.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard logs; a run "
                               "resumes from the latest checkpoint found here.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                                 "(multi-process runs: TPU pods, GPU clusters).")


def stage_module(task_name: str):
    """The stage module for `config.task` (imported lazily: only the chosen stage is loaded)."""
    if task_name == "stage1":
        from blip2_jax.train import stage1 as stage
    elif task_name == "stage2":
        from blip2_jax.train import stage2 as stage
    elif task_name == "text_lm":
        from blip2_jax.train import text_lm as stage
    else:
        raise ValueError(f"config.task={task_name!r}: expected 'stage1', 'stage2' or 'text_lm'")
    return stage


def run(config, workdir: str) -> dict:
    """Validates `config`, then trains the stage it names in `workdir`; returns the final metrics."""
    from blip2_jax import config_validation, sharding
    from blip2_jax.train import loop

    try:
        config_validation.validate(config)
    except config_validation.ConfigError as e:
        raise app.UsageError(str(e)) from None
    stage = stage_module(config.task)
    mesh = sharding.make_mesh(config.mesh)
    # text_lm exports the trained LLM as a Hugging Face directory under the workdir.
    task = (stage.make_task(config, mesh, workdir=workdir) if config.task == "text_lm"
            else stage.make_task(config, mesh))
    return loop.train(config, task, stage.make_data(config), workdir, mesh=mesh)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    if _DISTRIBUTED.value:
        import jax
        jax.distributed.initialize()
    metrics = run(_CONFIG.value, _WORKDIR.value)
    sys.stderr.flush()
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    # A bad flag or --config.x=y override: one `error: ...` line and exit status 2, no traceback.
    app.run(main, flags_parser=flag_errors.parse_flags)
