"""Ahead-of-time: lower and compile a stage's sharded train step (and stage 2's decoding) from abstract
shapes, no weights.

The programs are the train loop's own: `loop.make_train_step` over `loop.abstract_train_state`, traced
under the mesh and the logical axis rules as `loop.train` traces them, and `decoding.generate` for
the decode step. Used by the TPU planner (`python -m blip2_jax.plan`) and
`benchmarks/compile_paper_scale.py`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from blip2_jax import decoding, sharding
from blip2_jax.models import quant
from blip2_jax.spec import model as spec
from blip2_jax.train import loop, optimizer

# The decode step's text prompt: a few tokens, as a captioning prompt ("a photo of") tokenizes to.
DECODE_PROMPT_TOKENS = 8


def count(tree: Any) -> int:
    """Parameters in `tree` (an int8 matrix of `model.frozen_dtype="int8"` counts as its weights)."""
    return quant.param_count(tree)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs / arrays (its shard of each leaf; an
    int8 matrix: its int8 values and float32 scales)."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def abstract_batch(config, mesh) -> dict:
    """ShapeDtypeStructs of one global stage-1/stage-2 batch, sharded over the batch axes."""
    b, length, size = config.train.batch_size, config.data.max_text_len, config.data.image_size
    shard = NamedSharding(mesh, P(sharding.BATCH_AXES))
    s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=shard)  # noqa: E731
    batch = {"image": s((b, size, size, 3), jnp.float32), "image_id": s((b,), jnp.int32),
             "input_ids": s((b, length), jnp.int32), "attention_mask": s((b, length), jnp.int32)}
    if config.task == "stage2":
        batch["labels"] = s((b, length), jnp.int32)
        if config.data.text_mode.startswith("t5"):
            batch["decoder_input_ids"] = s((b, length), jnp.int32)
            batch["decoder_attention_mask"] = s((b, length), jnp.int32)
    return batch


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The lowered train step and the abstract (sharded) arguments it was lowered for."""
    lowered: Any  # jax.stages.Lowered
    state: dict   # {"step", "params", "opt_state", "rng"}
    frozen: Any
    batch: dict


def lower_train_step(config, task, mesh) -> TrainStep:
    """The train loop's jitted step, lowered for `mesh` from abstract shapes (as `loop.train` builds it)."""
    jax.config.update("jax_threefry_partitionable", True)  # as loop.train: the same RNG program
    rules = sharding.axis_rules(tuple(config.mesh.axis_rules))
    init_key, frozen_key, _ = spec.run_keys(config.seed)
    # Shapes and shardings outside the mesh context: optax's init makes a few scalars eagerly, and the
    # mesh's devices may be compile-only (a TPU topology without a TPU).
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.train.total_steps)
    state, state_shardings = loop.abstract_train_state(task, tx, init_key, mesh, rules)
    frozen = {}
    if task.init_frozen is not None:
        boxed = jax.eval_shape(task.init_frozen, frozen_key)
        frozen = sharding.abstract_with_shardings(boxed, sharding.logical_shardings(boxed, mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = loop.make_train_step(task, tx, schedule, mesh, state_shardings,
                                    grad_accum_steps=int(config.train.grad_accum_steps),
                                    skip_nonfinite=bool(config.train.skip_nonfinite_updates))
        batch = abstract_batch(config, mesh)
        return TrainStep(step.lower(state, frozen, batch), state, frozen, batch)


def compile_train_step(config, task, mesh):
    """`(compiled step, {"trainable": n, "frozen": n})`, all from shapes."""
    step = lower_train_step(config, task, mesh)
    return step.lowered.compile(), {"trainable": count(step.state["params"]), "frozen": count(step.frozen)}


def lower_decode_step(config, model, params, mesh):
    """`decoding.generate` with the config's evaluation settings (`eval.batch_size` images,
    `eval.max_new_tokens`, `eval.num_beams`, a `DECODE_PROMPT_TOKENS`-token prompt), lowered for `params`
    (sharded ShapeDtypeStructs: the trainable and frozen trees together) under the mesh's rules. The
    images are split over the batch axes when their number divides, else replicated."""
    ev, size = config.eval, config.data.image_size
    b = int(ev.batch_size)
    batch_spec = P(sharding.BATCH_AXES) if b % sharding.data_parallel_size(mesh) == 0 else P()
    shard = NamedSharding(mesh, batch_spec)
    pixels = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=shard)
    ids = jax.ShapeDtypeStruct((b, DECODE_PROMPT_TOKENS), jnp.int32, sharding=shard)

    def decode(params, pixels, ids, mask):
        return decoding.generate(model, params, pixels, ids, mask, max_new_tokens=int(ev.max_new_tokens),
                                 num_beams=int(ev.num_beams))

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.axis_rules(tuple(config.mesh.axis_rules))):
        return jax.jit(decode).lower(params, pixels, ids, ids)


def memory_summary(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis (None fields when the backend has none)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes", "alias_size_in_bytes")
    return {n: int(getattr(m, n)) for n in names if hasattr(m, n)}


def peak_bytes(memory: dict) -> int:
    """A program's per-device peak from its memory summary: arguments + outputs not aliased to a
    (donated) argument + temporaries + code."""
    return (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] - memory["alias_size_in_bytes"]
            + memory["temp_size_in_bytes"] + memory["generated_code_size_in_bytes"])
