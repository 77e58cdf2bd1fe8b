"""Where a train step's time goes: a profile of the config's real step, its op time split by model part.

    python benchmarks/profile_step.py --config=configs/stage1.py:demo [--batch=8] [--steps=3]
        [--sweep_batches=8,16,32 --sweep_image_sizes=224,364 --plot=stage1.png] [--config.x=y ...]

The step is benchmarks/accelerator.py's (the train loop's own, random weights, a random batch). Three
steps run under `jax.profiler`; every XLA op in the trace is traced back, through the compiled
program's `op_name` metadata, to the module that emitted it, and its time is summed per part:
`vision` (the frozen image encoder), `qformer` (every Q-Former pass: queries, text, ITM, ITG),
`llm` (stage 2's frozen LLM), `losses` (ITC / ITM / ITG / LM losses and heads outside those),
`optimizer` (AdamW, gradient norm), `collectives` (cross-device all-reduces and gathers), `other` -
each split into forward and backward (`transpose(...)` in the op name). Shares are of the summed op time (ops on parallel threads both count).

`--sweep_batches` / `--sweep_image_sizes`: steps/s and the shares for each combination (the image size
sets `data.image_size` and `model.vision.image_size`), and with `--plot` a PNG of images/s stacked by
the shares (drawn with PIL). Prints one JSON line per run.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import accelerator  # noqa: E402
from blip2_jax import sharding  # noqa: E402

# (part, substrings of a module path in an op name), first match wins: the Q-Former's input LayerNorm
# (`ln_vision`) and the projection train with it, so they come before the frozen `vision` tower.
PARTS = (
    ("optimizer", ("optax", "adam", "global_norm", "apply_updates", "scale_by")),
    ("llm", ("language_model",)),
    ("qformer", ("qformer", "query_outputs", "query_tokens", "instruction", "itm_logits", "itg_logits",
                 "text_features", "image_features", "ln_vision", "image_embeds", "projection")),
    ("vision", ("vit_features", "/vision/", "image_encoder")),
    ("losses", ("loss", "itc", "itm", "itg", "cross_entropy", "log_softmax", "logsumexp", "_gumbel")),
)
# Cross-device communication (gradient all-reduces, FSDP gathers), by the instruction's opcode.
COLLECTIVES = re.compile(r"(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)")
# A bare primitive at the top of the step function (no module scope): the code around the gradient, i.e.
# the gradient norm and AdamW's update (optax names no scopes).
_STEP_BODY = re.compile(r"jit\(step\)/[a-z_]+")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")


def part_of(op_name: str) -> str:
    """The model part of an HLO op from its `op_name` metadata (`jit(step)/jvp(Blip2...)/...`)."""
    name = op_name.lower()
    part = next((part for part, keys in PARTS if any(k in name for k in keys)), "other")
    return "optimizer" if part == "other" and _STEP_BODY.fullmatch(op_name) else part


def op_parts(hlo_text: str) -> dict[str, tuple[str, bool]]:
    """Instruction name -> (part, is_backward) for every instruction with `op_name` metadata."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            name, op_name = m.groups()
            part = "collectives" if COLLECTIVES.match(name) else part_of(op_name)
            out[name] = (part, "transpose(" in op_name)
    return out


def op_seconds(trace_dir: str) -> collections.Counter:
    """Summed seconds per event name of the perfetto trace `jax.profiler.trace` wrote under `trace_dir`."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            total[e["name"]] += e.get("dur", 0) * 1e-6
    return total


def profile(config, batch: int, steps: int = 3, devices=None) -> dict:
    """Step time and the per-part shares of one config at one global batch on `devices` (default: all)."""
    config = accelerator.planning_config(config)
    mesh = sharding.make_mesh(config.mesh, devices or jax.local_devices())
    task, step, compiled, _, compile_s = accelerator.compile_step(config, mesh, batch)
    state, frozen, data = accelerator.random_inputs(config, task, step, mesh)
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, frozen, data)
    jax.block_until_ready(metrics)
    times = []
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                start = time.perf_counter()
                state, metrics = compiled(state, frozen, data)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
        seconds = op_seconds(trace_dir)
    parts = op_parts(compiled.as_text())
    by_part = collections.Counter()
    for name, s in seconds.items():
        if name in parts:
            part, backward = parts[name]
            if part not in ("optimizer", "collectives"):
                part += "/backward" if backward else "/forward"
            by_part[part] += s
    total = sum(by_part.values())
    shares = {k: round(v / total, 4) for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])}
    step_s = float(np.median(times))
    return {"task": config.task, "global_batch": batch, "image_size": int(config.data.image_size),
            "step_seconds_profiled": step_s, "steps_per_second": 1 / step_s, "compile_seconds": compile_s,
            "op_seconds_per_step": total / steps, "shares": shares}


COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0))


def plot(runs: list[dict], path: str, bar: int = 60, height: int = 300) -> None:
    """A PNG (PIL, no plotting library): one column per run, its height images/s, stacked by the parts'
    shares, the value and the setting written under it; a legend of the parts on the right."""
    from PIL import Image, ImageDraw

    keys = sorted({k for r in runs for k in r["shares"]}, key=lambda k: -max(r["shares"].get(k, 0) for r in runs))
    rates = [r["global_batch"] * r["steps_per_second"] for r in runs]
    top, left, gap = 30, 20, 30
    width = left + len(runs) * (bar + gap) + 190
    im = Image.new("RGB", (width, top + height + 60), "white")
    draw = ImageDraw.Draw(im)
    draw.text((left, 8), "images/s per setting, split by the share of op time per model part", fill="black")
    for i, (run, rate) in enumerate(zip(runs, rates)):
        x, y = left + i * (bar + gap), top + height
        column = height * rate / max(rates)
        for k, color in zip(keys, COLORS):
            h = column * run["shares"].get(k, 0.0)
            draw.rectangle([x, y - h, x + bar, y], fill=color)
            y -= h
        draw.text((x, top + height + 6), f"{rate:.1f} img/s", fill="black")
        draw.text((x, top + height + 22), f"{run['image_size']}px b{run['global_batch']}", fill="black")
    x = left + len(runs) * (bar + gap)
    for j, (k, color) in enumerate(zip(keys, COLORS)):
        draw.rectangle([x, top + 16 * j, x + 10, top + 16 * j + 10], fill=color)
        draw.text((x + 16, top + 16 * j), k, fill="black")
    im.save(path)


def define_flags() -> dict:
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Experiment config (stage1 or stage2).",
                                                  lock_config=False),
        "batch": flags.DEFINE_integer("batch", 0, "Global batch (0: the config's)."),
        "steps": flags.DEFINE_integer("steps", 3, "Profiled steps (after 2 warm-up steps)."),
        "sweep_batches": flags.DEFINE_list("sweep_batches", [], "Global batches to sweep."),
        "sweep_image_sizes": flags.DEFINE_list("sweep_image_sizes", [], "Image sizes to sweep."),
        "plot": flags.DEFINE_string("plot", "", "PNG path for the sweep's plot."),
    }


def main(argv, cli: dict) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = cli["config"].value
    batches = [int(b) for b in cli["sweep_batches"].value] or [cli["batch"].value or int(config.train.batch_size)]
    sizes = [int(s) for s in cli["sweep_image_sizes"].value] or [int(config.data.image_size)]
    runs = []
    for size in sizes:
        sized = config.copy_and_resolve_references()
        sized.data.image_size = sized.model.vision.image_size = size
        for batch in batches:
            runs.append(profile(sized, batch, cli["steps"].value))
            print(json.dumps(runs[-1]), flush=True)
    if cli["plot"].value:
        plot(runs, cli["plot"].value)


if __name__ == "__main__":
    _cli = define_flags()
    app.run(lambda argv: main(argv, _cli))
