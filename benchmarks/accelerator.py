"""Images/s and MFU of a config's real train step on this host's accelerators (one GPU / TPU host; CPU too).

    python benchmarks/accelerator.py --config=configs/stage1.py:vit_g [--batch=auto|N] [--steps=10]
    python benchmarks/accelerator.py --config=configs/stage2.py:opt2.7b --config.mesh.fsdp=-1 ...

The step is the train loop's own (`train/aot.lower_train_step`: `loop.make_train_step` over the stage's
task, sharded over `config.mesh` on the local devices), with random weights (the config's checkpoint
paths are cleared: no downloads; the frozen towers in the config's `model.frozen_dtype`, bfloat16 for
the paper configs) and a random batch of the config's shapes (no input pipeline: this measures the
device). `--batch=auto` doubles the global batch from one example per data-parallel device while the
compiled step's peak (XLA's memory analysis) stays under 90% of the device memory, up to
`--max_batch`; on a CPU (no memory limit to read) `auto` means the config's batch.

MFU = images/s x the task's FLOPs per example (the figure the train loop logs MFU with) / (devices x the
chip's dense bf16 peak: the table below, or `--peak_flops`). Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blip2_jax import config_validation, sharding  # noqa: E402
from blip2_jax.plan import planning_config  # noqa: E402
from blip2_jax.spec import model as spec  # noqa: E402
from blip2_jax.train import aot, loop, optimizer, stage1, stage2  # noqa: E402

# Dense bfloat16 peak FLOP/s per device, by a substring of `device.device_kind` (vendor data sheets; the
# SXM parts for NVIDIA; first match wins, so the more specific names come first).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)
MEMORY_HEADROOM = 0.9


def define_flags() -> dict:
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Experiment config (stage1 or stage2).",
                                                  lock_config=True),
        "batch": flags.DEFINE_string("batch", "auto", "Global batch: a number, or auto (the largest that fits)."),
        "max_batch": flags.DEFINE_integer("max_batch", 4096, "Upper bound of --batch=auto."),
        "steps": flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps)."),
        "peak_flops": flags.DEFINE_float("peak_flops", 0.0, "Per-device peak FLOP/s (default: from the table)."),
    }


def peak_flops(device) -> float:
    return peak_flops_of(device.device_kind)


def peak_flops_of(kind: str) -> float:
    """The table's dense bfloat16 peak for a device name (jax's `device_kind`, torch's device name), or 0."""
    return next((flops for name, flops in PEAK_FLOPS if name in kind), 0.0)


def memory_limit(device) -> int:
    """Bytes one device can hold, or 0 where the backend does not say (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int((stats or {}).get("bytes_limit", 0))


def compile_step(config, mesh, batch: int):
    """`(task, lowered TrainStep, compiled step, per-device peak bytes, compile seconds)` at `batch`."""
    config = config.copy_and_resolve_references()
    config.train.batch_size = config.data.global_batch_size = batch
    config_validation.validate(config, mesh.devices.size)
    task = (stage1 if config.task == "stage1" else stage2).make_task(config, mesh)
    start = time.perf_counter()
    step = aot.lower_train_step(config, task, mesh)
    compiled = step.lowered.compile()
    return task, step, compiled, aot.peak_bytes(aot.memory_summary(compiled)), time.perf_counter() - start


def largest_fitting_batch(config, mesh, limit: int, max_batch: int):
    """Doubles the global batch from one example per data-parallel device while the step fits."""
    batch, best = sharding.data_parallel_size(mesh), None
    while batch <= max_batch:
        compiled = compile_step(config, mesh, batch)
        if compiled[3] > MEMORY_HEADROOM * limit:
            break
        best, batch = (batch, compiled), batch * 2
    if best is None:
        raise SystemExit(f"error: even a global batch of {sharding.data_parallel_size(mesh)} does not fit in "
                         f"{limit / 2**30:.1f} GiB per device (set --config.mesh.fsdp / remat)")
    return best


def text_vocab_size(config) -> int:
    """The vocabulary the batch's token ids index: the LLM's for stage 2, the Q-Former's for stage 1."""
    if config.task == "stage2":
        return int(spec.model_of(config).config.text.vocab_size)
    return len(spec.tokenizer(config))


def random_inputs(config, task, step: aot.TrainStep, mesh):
    """Real arrays for the lowered step: the trainable state and optimizer state as the loop builds them,
    the frozen towers drawn at random, and a random batch (token ids inside the vocabularies)."""
    rules = sharding.axis_rules(tuple(config.mesh.axis_rules))
    init_key, frozen_key, train_key = spec.run_keys(config.seed)
    tx, _ = optimizer.make_optimizer(config.optimizer, config.train.total_steps)
    state = loop._fresh_state(task, tx, init_key, train_key, mesh, rules,  # the loop's own fresh start
                              jax.tree.map(lambda s: s.sharding, step.state))
    frozen = loop.make_frozen(task, frozen_key, mesh, rules)
    rng = np.random.default_rng(0)
    vocab = text_vocab_size(config)  # the step's cost does not depend on which ids

    def draw(s):
        if np.issubdtype(s.dtype, np.integer):
            value = rng.integers(1, vocab, size=s.shape) if len(s.shape) > 1 else np.arange(s.shape[0])
            return jax.device_put(value.astype(s.dtype), s.sharding)
        return jax.device_put(rng.normal(size=s.shape).astype(s.dtype), s.sharding)

    batch = {k: draw(s) for k, s in step.batch.items()}
    batch["attention_mask"] = jax.device_put(np.ones(step.batch["attention_mask"].shape, np.int32),
                                             step.batch["attention_mask"].sharding)
    return state, frozen, batch


def run(config, batch_flag: str, steps: int, peak: float = 0.0, max_batch: int = 4096, name: str = "") -> dict:
    config = planning_config(config)  # no checkpoints, no evaluation data: random weights, shapes only
    devices = jax.local_devices()
    mesh = sharding.make_mesh(config.mesh, devices)
    limit = memory_limit(devices[0])
    if batch_flag == "auto" and limit:
        batch, (task, step, compiled, peak_bytes, compile_s) = largest_fitting_batch(config, mesh, limit, max_batch)
    else:
        batch = int(config.train.batch_size) if batch_flag == "auto" else int(batch_flag)
        task, step, compiled, peak_bytes, compile_s = compile_step(config, mesh, batch)
    state, frozen, data = random_inputs(config, task, step, mesh)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, data)
        loss = float(metrics["loss"])  # waits for the step
        if i >= 2:
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    peak = peak or peak_flops(devices[0])
    images_per_s = batch / step_s
    flops = task.flops_per_example or 0.0
    return {
        "config": name, "task": config.task, "device_kind": devices[0].device_kind,
        "devices": len(devices), "mesh": dict(zip(mesh.axis_names, map(int, mesh.devices.shape))),
        "global_batch": batch, "frozen_dtype": str(config.model.frozen_dtype), "steps": steps,
        "step_seconds": step_s, "images_per_second": images_per_s, "flops_per_example": flops,
        "mfu": images_per_s * flops / (peak * len(devices)) if peak else None, "peak_flops_per_device": peak,
        "peak_bytes_per_device": peak_bytes, "memory_limit_bytes": limit or None,
        "compile_seconds": compile_s, "loss": loss, "loss_finite": bool(np.isfinite(loss)),
    }


def main(argv, cli: dict) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
    report = run(cli["config"].value, cli["batch"].value, cli["steps"].value, cli["peak_flops"].value,
                 cli["max_batch"].value, name=name)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    _cli = define_flags()
    app.run(lambda argv: main(argv, _cli))
