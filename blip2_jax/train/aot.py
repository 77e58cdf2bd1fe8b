"""Ahead-of-time: lower and compile a stage's sharded train step from abstract shapes (no weights).

Used to check that paper-scale configs fit before a pod is booked:
`python benchmarks/compile_paper_scale.py --config=configs/stage1.py:vit_g` prints parameter counts
and the compiled program's memory analysis per device.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from blip2_jax import sharding
from blip2_jax.train import loop, optimizer


def count(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


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


def compile_train_step(config, task, mesh):
    """`(compiled step, {"trainable": n, "frozen": n})`, all from shapes."""
    rules = sharding.axis_rules(config.mesh.axis_rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.train.total_steps)
    boxed = jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0))
    param_shardings = sharding.logical_shardings(boxed, mesh, rules)
    state_shardings, abstract_opt = loop.train_state_shardings(sharding.unbox(boxed), param_shardings, tx, mesh)
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": sharding.unbox(boxed),
                      "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    abstract_state = sharding.abstract_with_shardings(abstract_state, state_shardings)
    frozen_boxed = jax.eval_shape(task.init_frozen, jax.random.PRNGKey(1))
    frozen = sharding.abstract_with_shardings(sharding.unbox(frozen_boxed),
                                              sharding.logical_shardings(frozen_boxed, mesh, rules))
    step = loop.make_train_step(task, tx, schedule, mesh, state_shardings,
                                grad_accum_steps=config.train.grad_accum_steps,
                                skip_nonfinite=config.train.skip_nonfinite_updates)
    compiled = step.lower(abstract_state, frozen, abstract_batch(config, mesh)).compile()
    return compiled, {"trainable": count(abstract_state["params"]), "frozen": count(frozen)}


def memory_summary(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis (None fields when the backend has none)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes", "alias_size_in_bytes")
    return {n: int(getattr(m, n)) for n in names if hasattr(m, n)}
