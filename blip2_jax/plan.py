"""The TPU planner: will a config fit a TPU slice, and how long will its step take at best? No TPU needed.

    python -m blip2_jax.plan --config=configs/stage2.py:flant5xxl --topology=v5p:4x4x4 \
        [--config.mesh.fsdp=64 --config.train.grad_accum_steps=4 ...]

With libtpu installed (`pip install -r requirements-tpu.txt`), JAX describes a TPU topology's devices
on any machine (`jax.experimental.topologies.get_topology_desc`) and the real TPU compiler compiles
for them. The planner builds the config's mesh over those devices and compiles the train loop's own
sharded step (`train.aot.lower_train_step`), and for stage 2 the captioning decode step
(`decoding.generate` at the config's `eval` settings), from abstract shapes: no weight is created or
read. It prints, per device, the frozen and trainable parameters, the optimizer state, the step's
temporaries and its peak against the chip's HBM, whether it fits, the compile time, XLA's FLOP count
next to the model FLOPs the loop's MFU uses, and a roofline lower bound of the step time (an
estimate). The last stdout line is one JSON object (`plan`'s result).

`--topology` is `GENERATION:SHAPE` as libtpu names slices, chips along each axis: `v5p:2x2x4`,
`v4:2x4x4`, `v5e:8x8`, `v6e:8x8`. Cloud TPU names count TensorCores for v4 and v5p (2 per chip:
v5p-32 is 16 chips, `v5p:2x2x4`; v5p-64 is 32 chips, `v5p:2x4x4`; v5p-128 is `v5p:4x4x4`) and chips
for v5e and v6e (v5litepod-64 is `v5e:8x8`, v6e-16 is `v6e:4x4`). JAX sees one device per chip on all
four (v4 and v5p as megacore).

Where a config names checkpoints, only an LLM directory's config.json is read (the architecture);
without it the config's `model.text` (the published HF config the paper variants carry) describes
the LLM. A stage-1 tokenizer directory that is not here is replaced by a stand-in vocabulary of
bert-base-uncased's size (only the size matters to the plan).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from blip2_jax import config_validation, flag_errors, sharding
from blip2_jax.spec import model as spec
from blip2_jax.train import aot, stage1, stage2



def define_flags() -> dict:
    """The command line's flags. Defined only when the module runs as a program: `plan()` is also a
    library function, and `blip2_jax.main` defines `--config` in the same absl registry (a process that
    imports both, e.g. the test suite, would fail on the duplicate)."""
    return {
        "config": config_flags.DEFINE_config_file(
            "config", None, "Experiment config file (get_config(arg)); override fields with --config.x=y.",
            lock_config=True),
        "topology": flags.DEFINE_string("topology", None, "TPU slice as GENERATION:SHAPE (chips per axis), e.g. "
                                        "v5p:2x2x4 (v5p-32), v5p:2x4x4 (v5p-64), v4:2x4x4 (v4-64), v5e:8x8 "
                                        "(v5litepod-64), v6e:8x8 (v6e-64)."),
        "decode": flags.DEFINE_bool("decode", True, "Also compile stage 2's decode step (eval.* settings)."),
    }


GIB = 2 ** 30
BERT_VOCAB_SIZE = 30522  # bert-base-uncased (the stage-1 tokenizer adds [DEC])


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Google Cloud TPU docs): HBM, bf16 peak FLOP/s, HBM bandwidth."""
    hbm_bytes: int
    peak_flops: float
    hbm_bytes_per_second: float


CHIPS = {
    "v4": Chip(32 * GIB, 275e12, 1228e9),
    "v5e": Chip(16 * GIB, 197e12, 819e9),
    "v5p": Chip(95 * GIB, 459e12, 2765e9),
    "v6e": Chip(32 * GIB, 918e12, 1640e9),
}
# libtpu's default for v4 is one device per TensorCore; JAX on a v4 slice runs megacore (one per chip).
CHIP_CONFIG = {"v4": "megacore"}


class PlanError(ValueError):
    """A bad topology or config: the message is the one line the command prints."""


def chip_of(topology: str) -> Chip:
    generation, _, shape = topology.partition(":")
    if generation not in CHIPS or not shape or not all(p.isdigit() for p in shape.split("x")):
        raise PlanError(f"--topology={topology}: expected GENERATION:SHAPE with GENERATION one of "
                        f"{', '.join(CHIPS)} and SHAPE chips per axis, e.g. v5p:2x2x4 (v5p-32), v5e:8x8")
    return CHIPS[generation]


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU slice (needs libtpu; no TPU)."""
    chip_of(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(f"--topology={topology}: libtpu is not installed (pip install -r requirements-tpu.txt)")
    # Compile-only devices open no TPU: let several planners (and tests) share the machine instead of
    # queueing on libtpu's one-process lockfile, and tell libtpu the "worker list" is this host (else it
    # logs an error block looking for a TPU VM's).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies  # only the planner needs it
    generation = topology.partition(":")[0]
    kwargs = {"chip_config_name": CHIP_CONFIG[generation]} if generation in CHIP_CONFIG else {}
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices)
    except Exception as e:  # libtpu refused the shape: the first line of its message says why
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"--topology={topology}: {text}") from None


def planning_config(config):
    """A copy of `config` that reads no weights and no data: checkpoint paths cleared (an LLM
    directory's config.json is kept: it is the architecture), no evaluation split, and a stand-in
    stage-1 vocabulary when the tokenizer directory is not here."""
    config = config.copy_and_resolve_references()
    if config.task not in ("stage1", "stage2"):
        raise PlanError(f"config.task={config.task!r}: the planner plans stage1 and stage2 configs")
    for key in config.init.keys():
        keep_llm = key == "llm_checkpoint" and os.path.exists(os.path.join(config.init[key], "config.json"))
        if not keep_llm:
            config.init[key] = ""
    if config.task == "stage2" and not config.init.llm_checkpoint and not config.model.text:
        raise PlanError("config.model.text is empty and config.init.llm_checkpoint has no config.json: the "
                        "planner needs the LLM's HF config (set --config.init.llm_checkpoint=DIR)")
    crash = _crashes_libtpu(config)
    if crash:
        raise PlanError(f"libtpu 0.0.42.1's compiler crashes (segfault) on a scanned T5's dropout {crash}: "
                        "set --config.model.llm_dropout=False to plan the step without it")
    if config.get("eval") is not None:
        config.eval.source.path = ""
        if config.eval.get("zero_shot") is not None:
            config.eval.zero_shot.path = ""
    if config.task == "stage1" and not os.path.isdir(config.data.tokenizer_path):
        config.data.tokenizer_path = stand_in_bert_vocab()
    return config


def _crashes_libtpu(config) -> str:
    """What of `config` the pinned TPU compiler is known to die on, or "": a scanned T5 with dropout, its
    heads split over mesh.tensor > 1 (found planning flant5xl) or inside gradient accumulation's scan
    (found planning flant5xxl_v5p32 with grad_accum_steps=5; without the dropout it compiles). The
    planner says so instead of ending in a segfault."""
    if config.task != "stage2" or config.model.llm != "t5" or not config.model.get("scan_layers"):
        return ""
    if not (config.model.llm_dropout and config.model.text.get("dropout_rate", 0.1) > 0):
        return ""
    if config.mesh.tensor != 1:
        return f"with heads split over mesh.tensor={config.mesh.tensor} (or set --config.mesh.tensor=1)"
    if config.train.grad_accum_steps > 1:
        return (f"inside gradient accumulation, train.grad_accum_steps={config.train.grad_accum_steps} "
                "(or set --config.train.grad_accum_steps=1)")
    return ""


def stand_in_bert_vocab() -> str:
    """A directory with a WordPiece vocab.txt of bert-base-uncased's size and special tokens (written
    once under the temp directory and reused)."""
    path = os.path.join(tempfile.gettempdir(), f"blip2_jax_plan_vocab_{BERT_VOCAB_SIZE}")
    if not os.path.exists(os.path.join(path, "vocab.txt")):
        specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words = specials + [f"w{i}" for i in range(BERT_VOCAB_SIZE - len(specials))]
        os.makedirs(path, exist_ok=True)
        part = tempfile.NamedTemporaryFile("w", dir=path, delete=False)  # then renamed: no reader sees half
        with part:
            part.write("\n".join(words) + "\n")
        os.replace(part.name, os.path.join(path, "vocab.txt"))
    return path


def _costs(compiled) -> dict:
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else (costs or {})
    return {"flops": float(costs.get("flops", 0.0)), "bytes_accessed": float(costs.get("bytes accessed", 0.0))}


def _compile(lowered):
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def plan(config, topology: str, decode: bool = True) -> dict:
    """Compiles `config`'s train step (and stage 2's decode step) for `topology`; the report (JSON-able).

    Raises PlanError (one line) for a bad topology, mesh or config."""
    chip = chip_of(topology)
    config = planning_config(config)
    devices = topology_devices(topology)
    try:
        config_validation.validate(config, len(devices))
    except config_validation.ConfigError as e:
        raise PlanError(f"--topology={topology} ({len(devices)} chips): {' '.join(str(e).split())}") from None
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as e:
        raise PlanError(f"--topology={topology} ({len(devices)} devices): {e}") from None
    start, cpu_start = time.perf_counter(), time.process_time()
    stage = stage1 if config.task == "stage1" else stage2
    task = stage.make_task(config, mesh)
    step = aot.lower_train_step(config, task, mesh)
    lower_seconds = time.perf_counter() - start
    compiled, compile_seconds = _compile(step.lowered)
    memory, costs = aot.memory_summary(compiled), _costs(compiled)
    n, batch = len(devices), int(config.train.batch_size)
    model_flops = (task.flops_per_example or 0.0) * batch / n
    per_device = {"frozen": aot.per_device_bytes(step.frozen),
                  "trainable": aot.per_device_bytes(step.state["params"]),
                  "optimizer": aot.per_device_bytes(step.state["opt_state"]),
                  "temporaries": memory["temp_size_in_bytes"], "peak": aot.peak_bytes(memory)}
    report = {
        "topology": topology, "devices": n, "device_kind": devices[0].device_kind,
        "mesh": dict(zip(mesh.axis_names, map(int, mesh.devices.shape))),
        "global_batch": batch, "grad_accum_steps": int(config.train.grad_accum_steps),
        "scan_layers": bool(config.model.get("scan_layers", False)),
        "remat_policy": config.model.get("remat_policy", "full"),
        "params": {"trainable": aot.count(step.state["params"]), "frozen": aot.count(step.frozen)},
        "per_device_bytes": per_device, "hbm_bytes": chip.hbm_bytes,
        "fits": per_device["peak"] <= chip.hbm_bytes,
        "compile_seconds": round(lower_seconds + compile_seconds, 1),
        # CPU seconds of this process (all threads): the machine-load-independent part of compile_seconds
        "compile_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "compiler_flops_per_device": costs["flops"], "model_flops_per_device": model_flops,
        "bytes_accessed_per_device": costs["bytes_accessed"],
        "step_seconds_estimate": roofline(costs, model_flops, chip),
        "decode": None,
    }
    if decode and config.task == "stage2":
        report["decode"] = plan_decode(config, step, mesh)
        report["fits"] = report["fits"] and report["decode"]["peak"] <= chip.hbm_bytes
        report["compile_seconds"] = round(report["compile_seconds"] + report["decode"]["compile_seconds"], 1)
        report["compile_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    return report


def plan_decode(config, step: aot.TrainStep, mesh) -> dict:
    """Per-device temporaries and peak of captioning with the trained parameters (`eval.*` settings)."""
    start = time.perf_counter()
    params = {**step.state["params"], **step.frozen}
    lowered = aot.lower_decode_step(config, spec.model_of(config), params, mesh)
    compiled, _ = _compile(lowered)
    memory = aot.memory_summary(compiled)
    return {"batch": int(config.eval.batch_size), "max_new_tokens": int(config.eval.max_new_tokens),
            "num_beams": int(config.eval.num_beams), "temporaries": memory["temp_size_in_bytes"],
            "peak": aot.peak_bytes(memory), "compile_seconds": round(time.perf_counter() - start, 1)}


def roofline(costs: dict, model_flops: float, chip: Chip) -> dict:
    """A lower bound of the step time, in seconds (an estimate: perfect overlap, peak rates, no
    communication). XLA's cost analysis counts the body of a loop (scanned layers, gradient-accumulation
    micro-batches) once, so under scan its FLOPs and bytes are far below the step's: the bound also
    takes the model FLOPs (every layer, every micro-batch) at the chip's peak."""
    compute = max(costs["flops"], model_flops) / chip.peak_flops
    memory = costs["bytes_accessed"] / chip.hbm_bytes_per_second
    return {"compute_bound": compute, "memory_bound": memory, "lower_bound": max(compute, memory)}


def format_report(report: dict) -> str:
    """The human-readable lines of a plan (the JSON line follows them)."""
    gib = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
    b, est = report["per_device_bytes"], report["step_seconds_estimate"]
    lines = [
        f"topology {report['topology']}: {report['devices']} x {report['device_kind']}, mesh {report['mesh']}, "
        f"global batch {report['global_batch']} in {report['grad_accum_steps']} micro-batch(es), "
        f"scan_layers={report['scan_layers']}, remat_policy={report['remat_policy']}",
        f"parameters: {report['params']['trainable'] / 1e6:.1f}M trainable, "
        f"{report['params']['frozen'] / 1e6:.1f}M frozen",
        "per device (train step):",
        f"  frozen params     {gib(b['frozen'])}",
        f"  trainable params  {gib(b['trainable'])}",
        f"  optimizer state   {gib(b['optimizer'])}",
        f"  temporaries       {gib(b['temporaries'])}",
        f"  peak              {gib(b['peak'])}  of {gib(report['hbm_bytes'])} HBM",
    ]
    if report["decode"]:
        d = report["decode"]
        lines.append(f"per device (decode, {d['batch']} images, {d['num_beams']} beam(s), {d['max_new_tokens']} "
                     f"tokens): temporaries {gib(d['temporaries'])}, peak {gib(d['peak'])}")
    lines += [
        f"fits: {'yes' if report['fits'] else 'NO'}; compile time {report['compile_seconds']} s "
        f"({report['compile_cpu_seconds']} s of CPU)",
        f"FLOPs per device and step: compiler {report['compiler_flops_per_device']:.3e} (loop bodies counted "
        f"once), model {report['model_flops_per_device']:.3e} (the MFU formula)",
        f"step time, roofline estimate (lower bound): {est['lower_bound']:.3f} s (compute {est['compute_bound']:.3f} s, "
        f"HBM traffic {est['memory_bound']:.3f} s)",
    ]
    return "\n".join(lines)


def main(argv, cli: dict):
    """The program: `cli` holds the flags `define_flags` defined."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the local backend only runs eval_shape: never grab a TPU
    if not cli["topology"].value:
        print("error: --topology is required (e.g. --topology=v5p:2x2x4, a v5p-32)", file=sys.stderr)
        sys.exit(flag_errors.USAGE_EXIT_CODE)
    try:
        report = plan(cli["config"].value, cli["topology"].value, decode=cli["decode"].value)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(flag_errors.USAGE_EXIT_CODE)
    print(format_report(report))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    _cli = define_flags()
    app.run(lambda argv: main(argv, _cli),
            flags_parser=lambda argv: flag_errors.parse_flags(argv, example="configs/stage2.py:flant5xxl"))
