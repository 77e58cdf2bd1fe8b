"""Checks a ConfigDict before any compute; every error names the field by its dotted path.

Two kinds of checks:
- Schema: in the sections the train loop owns (`task`, `seed`, `mesh`, `train`, `optimizer`; see
  `blip2_jax.config_sections.loop_config`), every field must exist in the defaults and have the default's
  type (an int is accepted for a float field; bool and int are not interchangeable; a None default
  accepts anything). Overrides given with `--config.x=y` are already checked by ml_collections'
  locked ConfigDict; this catches misspelt or ill-typed fields written inside config files.
- Semantics: mesh sizes that multiply to the device count, a batch size divisible by the
  data-parallel degree and the number of micro-batches, a known schedule, step counts > 0, etc.;
  and `model.frozen_dtype` (where the config has one): a known name, "int8" only where a tower is
  frozen (int8 weights cannot be trained).

`validate(config, num_devices)` raises `ConfigError` listing every problem found.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import ml_collections

from blip2_jax import config_sections, sharding
from blip2_jax.spec import model as spec
from blip2_jax.train.optimizer import SCHEDULES

LOOP_SECTIONS = ("task", "seed", "mesh", "train", "optimizer")


class ConfigError(ValueError):
    """A config problem; the message names each offending field."""


def _type_ok(value: Any, default: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    if isinstance(default, ml_collections.ConfigDict):
        return isinstance(value, (ml_collections.ConfigDict, dict))
    return isinstance(value, type(default))


def schema_errors(config: Any, defaults: Any, prefix: str = "",
                  sections: Optional[Iterable[str]] = None) -> list[str]:
    """Fields of `config` that are missing from `defaults` or typed differently (dotted names)."""
    errors = []
    keys = list(config.keys()) if sections is None else [k for k in sections if k in config]
    for key in keys:
        name = f"{prefix}{key}"
        value = config[key]
        if key not in defaults:
            known = ", ".join(sorted(defaults.keys()))
            errors.append(f"{name}: unknown field (known here: {known})")
            continue
        default = defaults[key]
        if not _type_ok(value, default):
            errors.append(f"{name}={value!r}: expected {type(default).__name__}, "
                          f"got {type(value).__name__}")
        elif isinstance(default, ml_collections.ConfigDict):
            errors.extend(schema_errors(value, default, prefix=f"{name}."))
    for key in (sections or ()):
        if key not in config:
            errors.append(f"{prefix}{key}: missing (start stage configs from config_sections.experiment_config())")
    return errors


def semantic_errors(config: Any, num_devices: Optional[int]) -> list[str]:
    """Value checks of the loop's sections (assumes the schema check passed)."""
    errors = []
    tc, oc, mc = config.train, config.optimizer, config.mesh
    dp = None
    if num_devices is not None:
        try:
            data, fsdp, _ = sharding.mesh_shape(mc, num_devices)
            dp = data * fsdp
        except ValueError as e:
            errors.append(str(e))
    for name in ("total_steps", "batch_size", "grad_accum_steps", "log_every", "keep_checkpoints"):
        if tc[name] <= 0:
            errors.append(f"train.{name}={tc[name]}: must be > 0")
    for name in ("eval_every", "checkpoint_every"):
        if tc[name] < 0:
            errors.append(f"train.{name}={tc[name]}: must be >= 0 (0 = only at the end)")
    if tc.peak_flops_per_device < 0:
        errors.append(f"train.peak_flops_per_device={tc.peak_flops_per_device}: must be >= 0")
    profile = tuple(tc.get("profile_steps", ()))
    if profile and not (len(profile) == 2 and all(isinstance(s, int) for s in profile)
                        and 0 <= profile[0] < profile[1] <= tc.total_steps):
        errors.append(f"train.profile_steps={profile}: expected () or (N, M) with 0 <= N < M <= "
                      f"train.total_steps={tc.total_steps} (traces steps N+1..M)")
    if tc.batch_size > 0 and tc.grad_accum_steps > 0:
        if tc.batch_size % tc.grad_accum_steps:
            errors.append(f"train.batch_size={tc.batch_size} is not divisible by "
                          f"train.grad_accum_steps={tc.grad_accum_steps}")
        elif dp and (tc.batch_size // tc.grad_accum_steps) % dp:
            errors.append(
                f"train.batch_size={tc.batch_size}: each of the {tc.grad_accum_steps} micro-batches "
                f"({tc.batch_size // tc.grad_accum_steps} rows) must split evenly over the "
                f"data-parallel degree mesh.data*mesh.fsdp={dp}")
    if oc.schedule not in SCHEDULES:
        errors.append(f"optimizer.schedule={oc.schedule!r}: expected one of {SCHEDULES}")
    if oc.schedule == "lavis_epoch_cosine" and oc.steps_per_epoch <= 0:
        errors.append(f"optimizer.steps_per_epoch={oc.steps_per_epoch}: must be > 0 for the "
                      "lavis_epoch_cosine schedule")
    for name in ("peak_lr", "warmup_lr", "min_lr", "weight_decay", "grad_clip_norm"):
        if oc[name] < 0:
            errors.append(f"optimizer.{name}={oc[name]}: must be >= 0")
    if oc.min_lr > oc.peak_lr:
        errors.append(f"optimizer.min_lr={oc.min_lr} exceeds optimizer.peak_lr={oc.peak_lr}")
    if oc.warmup_steps < 0 or oc.warmup_steps > tc.total_steps:
        errors.append(f"optimizer.warmup_steps={oc.warmup_steps}: must be in [0, "
                      f"train.total_steps={tc.total_steps}]")
    for name in ("b1", "b2"):
        if not 0 <= oc[name] < 1:
            errors.append(f"optimizer.{name}={oc[name]}: must be in [0, 1)")
    if not 0 < oc.vit_layer_decay <= 1:
        errors.append(f"optimizer.vit_layer_decay={oc.vit_layer_decay}: must be in (0, 1] (1 = no decay)")
    if oc.eps <= 0:
        errors.append(f"optimizer.eps={oc.eps}: must be > 0")
    try:
        sharding.axis_rules(tuple(mc.axis_rules))
    except (ValueError, TypeError) as e:
        errors.append(f"mesh.axis_rules={mc.axis_rules!r}: {e}")
    return errors


def frozen_dtype_errors(config: Any) -> list[str]:
    """`model.frozen_dtype` checks (configs without one, e.g. the text LM's, have none)."""
    model = config.get("model")
    if model is None or "frozen_dtype" not in model:
        return []
    name = model.frozen_dtype
    if name not in spec.FROZEN_DTYPES:
        return [f"model.frozen_dtype={name!r}: expected one of {spec.FROZEN_DTYPES}"]
    if name == spec.INT8 and config.get("task") == "stage1" and model.get("train_vision", False):
        # Stage 1 with a trained ViT has no frozen tower: int8 would quantise nothing (and int8 weights
        # cannot be trained). Stage 2 keeps its LLM frozen, which int8 then quantises.
        return ["model.frozen_dtype='int8' with model.train_vision=True: stage 1 then has no frozen tower "
                "(the ViT trains, in float32) and int8 weights cannot be trained; use model.frozen_dtype="
                "'float32' or 'bfloat16', or model.train_vision=False"]
    return []


def data_errors(config: Any) -> list[str]:
    """Checks of the data section that would otherwise fail only once the input pipeline is built."""
    data = config.get("data")
    if data is None or "source_weighting" not in data:
        return []
    if data.source_weighting not in config_sections.SOURCE_WEIGHTINGS:
        return [f"data.source_weighting={data.source_weighting!r}: expected one of "
                f"{config_sections.SOURCE_WEIGHTINGS}"]
    return []


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None,
             defaults: Optional[ml_collections.ConfigDict] = None) -> None:
    """Raises ConfigError naming every bad field of the loop's sections.

    Args:
      config: the full experiment config (other sections are left to their owners).
      num_devices: the device count the mesh must use (default: `jax.device_count()`); pass 0 to
        skip the mesh checks (e.g. when only validating a config file).
      defaults: the schema (default: `config_sections.loop_config()`).
    """
    if num_devices is None:
        import jax
        num_devices = jax.device_count()
    defaults = config_sections.loop_config() if defaults is None else defaults
    errors = schema_errors(config, defaults, sections=LOOP_SECTIONS)
    if not errors:
        errors = semantic_errors(config, num_devices or None) + frozen_dtype_errors(config) + data_errors(config)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
