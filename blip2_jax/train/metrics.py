"""Metric output: TensorBoard event files (tensorboardX, no TensorFlow), JSON lines, a progress line.

Only process 0 writes files. `workdir/metrics.jsonl` gets one JSON object per `write` call with a
`step` field; a resumed run appends to it (a step that was re-run after a crash appears again, the
last line for a step is the one that counts).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
from typing import Any, Mapping, Optional

import jax
from clu import parameter_overview

from blip2_jax.models import quant


def _to_float(value: Any) -> float:
    return float(value)


class MetricWriter:
    """Writes scalars to TensorBoard and `metrics.jsonl` under `workdir` (process 0 only)."""

    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self._active:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter  # imported lazily: heavy, only process 0
            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
        """Logs `scalars` at `step`; TensorBoard tags get `prefix` (e.g. "eval/")."""
        if not self._active:
            return
        values = {k: _to_float(v) for k, v in scalars.items()}
        for key, value in values.items():
            self._tb.add_scalar(prefix + key, value, step)
        record = {"step": int(step), **{prefix + k: v for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self._active:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self._active:
            self._tb.close()
            self._jsonl.close()
            self._active = False


PARAMETER_OVERVIEW = "parameter_overview.txt"


def write_parameter_overview(workdir: str, trainable: Any, frozen: Any) -> str:
    """Write `workdir/parameter_overview.txt` (process 0): every trainable and frozen parameter's name,
    shape and dtype, and the totals (clu's parameter overview). Returns the one-line summary."""
    count = quant.param_count  # an int8 frozen matrix counts as its weights (its scales not counted)
    summary = f"parameters: {count(trainable):,} trainable, {count(frozen):,} frozen"
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, PARAMETER_OVERVIEW), "w", encoding="utf-8") as f:
            f.write(f"{summary}\n\n# trainable\n")
            f.write(parameter_overview.get_parameter_overview(trainable, include_stats=False))
            if jax.tree.leaves(frozen):
                f.write("\n\n# frozen\n")
                # an int8 matrix is listed as its `values` (int8) and `scale` (float32) arrays
                f.write(parameter_overview.get_parameter_overview(quant.as_dicts(frozen), include_stats=False))
            f.write("\n")
    return summary


def format_progress(step: int, total: int, scalars: Mapping[str, float],
                    eta_seconds: Optional[float]) -> str:
    """One human-readable line: step, loss parts, learning rate, speed, MFU and ETA."""
    parts = [f"step {step}/{total}"]
    for key in sorted(scalars):
        if key in ("steps_per_sec", "examples_per_sec", "mfu", "eta_seconds"):
            continue
        parts.append(f"{key}={scalars[key]:.4g}")
    if "steps_per_sec" in scalars:
        parts.append(f"{scalars['steps_per_sec']:.3g} steps/s")
    if "examples_per_sec" in scalars:
        parts.append(f"{scalars['examples_per_sec']:.4g} ex/s")
    if "mfu" in scalars:
        parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    if eta_seconds is not None and math.isfinite(eta_seconds):
        parts.append(f"ETA {datetime.timedelta(seconds=round(eta_seconds))}")
    return " | ".join(parts)


def print_progress(line: str) -> None:
    """Prints a progress line on process 0 (to stderr, so stdout's last line stays the JSON)."""
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)
