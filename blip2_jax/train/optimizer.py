"""Optimizer and learning-rate schedules from `config.optimizer`.

AdamW over the trainable tree only (frozen weights live outside the train state, so they never get
Adam moments). Weight decay applies to parameters with ndim >= 2 whose name is not `bias` or `scale`;
biases, norm scales, the temperature and every other 0-/1-D parameter are not decayed (LAVIS
`get_optimizer_params`: `p.ndim == 1 or name.endswith(".bias")` -> no decay). The names matter for a
scanned tower (`model.scan_layers`), whose biases and norm scales carry a leading layer axis.

Schedules (`config.optimizer.schedule`):
- `"warmup_cosine"` (the paper's; optax's `warmup_cosine_decay_schedule`): linear warmup from
  `warmup_lr` to `peak_lr` over `warmup_steps`, then cosine from `peak_lr` down to `min_lr` at
  `total_steps`:
      s < W:  lr = warmup_lr + (peak_lr - warmup_lr) * s / W
      s >= W: lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + cos(pi * (s - W) / (T - W)))
- `"lavis_epoch_cosine"` (LAVIS `linear_warmup_cosine_lr`): epoch e = s // steps_per_epoch,
  E = ceil(T / steps_per_epoch);
      e == 0: lr = min(peak_lr, warmup_lr + (peak_lr - warmup_lr) * s / max(W, 1))
      e >= 1: lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + cos(pi * e / E))   (constant per epoch)
- `"constant"`: `peak_lr` throughout.
`s` is the number of optimizer updates already applied (optax's count), starting at 0.

Gradient accumulation is done by the train loop (a scan over micro-batches inside one step), not
here; `grad_clip_norm > 0` clips the accumulated gradient by its global norm before AdamW.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("warmup_cosine", "lavis_epoch_cosine", "constant")


def warmup_cosine(*, peak_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
    """Linear warmup from `warmup_lr` to `peak_lr`, then cosine to `min_lr` at `total_steps`."""
    # optax's decay_steps counts the warmup. The cosine gets at least one step, so a run no longer
    # than its warmup (a smoke test) is still a valid schedule: peak at warmup_steps, then min_lr.
    cosine_steps = max(total_steps - warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(init_value=warmup_lr, peak_value=peak_lr, warmup_steps=warmup_steps,
                                              decay_steps=warmup_steps + cosine_steps, end_value=min_lr)


def lavis_epoch_cosine(*, peak_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                       total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """LAVIS's per-step warmup inside epoch 0, then a cosine that steps once per epoch."""
    if steps_per_epoch <= 0:
        raise ValueError(f"optimizer.steps_per_epoch={steps_per_epoch}: the lavis_epoch_cosine "
                         "schedule needs the number of steps in an epoch (> 0)")
    max_epoch = math.ceil(total_steps / steps_per_epoch)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        epoch = jnp.floor(s / steps_per_epoch)
        warm = jnp.minimum(peak_lr, warmup_lr + (peak_lr - warmup_lr) * s / max(warmup_steps, 1))
        cos = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / max_epoch))
        return jnp.where(epoch == 0, warm, cos)

    return schedule


def make_schedule(opt_config: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """The schedule `opt_config.schedule` names (see module docstring)."""
    name = opt_config["schedule"]
    common = dict(peak_lr=float(opt_config["peak_lr"]), warmup_lr=float(opt_config["warmup_lr"]),
                  min_lr=float(opt_config["min_lr"]), warmup_steps=int(opt_config["warmup_steps"]),
                  total_steps=int(total_steps))
    if name == "warmup_cosine":
        return warmup_cosine(**common)
    if name == "lavis_epoch_cosine":
        return lavis_epoch_cosine(**common, steps_per_epoch=int(opt_config["steps_per_epoch"]))
    if name == "constant":
        peak = float(opt_config["peak_lr"])
        return lambda step: jnp.full((), peak, jnp.float32)
    raise ValueError(f"optimizer.schedule={name!r}; expected one of {SCHEDULES}")


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", getattr(last, "idx", last))))


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: ndim >= 2 and not named `bias` or `scale` (a norm scale;
    2-D only in a scanned stack, as its biases)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: bool(jnp.ndim(x) >= 2 and _leaf_name(path) not in ("bias", "scale")), params)


def _vit_layer_id(path: tuple[str, ...], num_layers: int) -> int:
    """EVA's `get_num_layer` on our names: embeddings (and CLIP's pre-LayerNorm) 0, block i i+1, the rest L."""
    if path[0] in ("embeddings", "pre_layernorm"):
        return 0
    if re.fullmatch(r"layers_\d+", path[0]):
        return int(path[0].split("_")[1]) + 1
    return num_layers


def vit_layer_scales(params: Any, decay: float) -> Any:
    """Per-leaf learning-rate factors of LAVIS's layer-wise decay (`Blip2Base.get_optimizer_params`):
    with L ViT blocks, a ViT leaf of layer id k (`_vit_layer_id`) gets `decay ** (L + 1 - k)` (so the
    embeddings `decay ** (L + 1)`, block i `decay ** (L - i)`); every leaf outside `vision` gets 1."""
    vision = params.get("vision", {}) if isinstance(params, Mapping) else {}
    num_layers = sum(1 for k in vision if re.fullmatch(r"layers_\d+", k))

    def scale(path, _):
        names = tuple(str(getattr(p, "key", p)) for p in path)
        if names[0] != "vision":
            return 1.0
        return float(decay) ** (num_layers + 1 - _vit_layer_id(names[1:], num_layers))

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_leaf_factors(factors_fn: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Multiply each leaf's update by a constant factor `factors_fn(params)` gives (a per-group
    learning rate, as torch's param groups: applied after AdamW, weight decay included)."""
    def update(updates, state, params=None):
        factors = factors_fn(params)
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(opt_config: Mapping[str, Any],
                   total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """`(tx, schedule)`: optional global-norm clipping, AdamW with the decay mask, and (with
    `vit_layer_decay < 1`) the layer-wise learning-rate decay of a trainable ViT."""
    schedule = make_schedule(opt_config, total_steps)
    parts = []
    if float(opt_config["grad_clip_norm"]) > 0:
        parts.append(optax.clip_by_global_norm(float(opt_config["grad_clip_norm"])))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=float(opt_config["b1"]), b2=float(opt_config["b2"]),
        eps=float(opt_config["eps"]), weight_decay=float(opt_config["weight_decay"]),
        mask=decay_mask))
    decay = float(opt_config.get("vit_layer_decay", 1.0))
    if decay != 1.0:
        parts.append(scale_by_leaf_factors(lambda params: vit_layer_scales(params, decay)))
    return optax.chain(*parts), schedule


def update_count(opt_state: Any) -> jax.Array:
    """The number of updates applied so far: the count optax passes to the learning-rate schedule."""
    # Adam keeps a count of its own (the same number); the schedule's is the one meant here.
    count = optax.tree_utils.tree_get(
        opt_state, "count", filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState")
    if count is None:
        raise ValueError("optimizer state holds no learning-rate schedule count (ScaleByScheduleState)")
    return count
