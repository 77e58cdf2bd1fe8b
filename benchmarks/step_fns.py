"""One train step on each side, as the train-step benchmarks time it: ours is the train loop's own jitted
step, theirs a torch forward, backward and AdamW step. Both use the same optimizer settings (AdamW, lr
1e-4, weight decay 0.05, eps 1e-8) over the trainable parameters only, and both record every step's
metrics as floats, so that a benchmark can compare the step-0 losses of the two sides.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

LR, WEIGHT_DECAY, EPS = 1e-4, 0.05, 1e-8
STATE_SEED = 0  # our train state's RNG: `PRNGKey(STATE_SEED)`


def loss_key(step: int):
    """The RNG key our step `step` hands `loss_fn` (one micro-batch: `loop.make_train_step` folds in the
    step, then the micro-batch index 0), so that a benchmark can redo the step's random draws."""
    import jax

    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(STATE_SEED), step), 0)


def loop_step_fn(loss_fn: Callable, trainable: dict, frozen: dict, batch: dict, name: str = "bench"):
    """The train loop's jitted step (`train/loop.make_train_step`) around `loss_fn(trainable, frozen, batch,
    rng, train) -> (loss, metrics)` on a one-device mesh, AdamW over `trainable` only.

    Returns `(step, metrics)`: each `step()` runs one step and appends its metrics (floats) to `metrics`
    (reading them waits for the step)."""
    import jax
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from blip2_jax.train import loop
    from blip2_jax.train.task import Task

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    schedule = optax.constant_schedule(LR)  # a schedule: the loop logs the learning rate from its count
    tx = optax.adamw(schedule, weight_decay=WEIGHT_DECAY, eps=EPS)
    task = Task(init_trainable=lambda rng: trainable, name=name, loss_fn=loss_fn)
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), trainable)
    state_shardings, _ = loop.train_state_shardings(trainable, replicated, tx, mesh)
    train_step = loop.make_train_step(task, tx, schedule, mesh, state_shardings, grad_accum_steps=1,
                                      skip_nonfinite=False)
    state = {"step": jax.numpy.zeros((), jax.numpy.int32), "params": trainable, "opt_state": tx.init(trainable),
             "rng": jax.random.PRNGKey(STATE_SEED)}
    box = {"state": jax.device_put(state, state_shardings)}
    batch = jax.device_put(batch)
    metrics: list[dict] = []

    def step():
        box["state"], out = train_step(box["state"], frozen, batch)
        metrics.append({k: float(v) for k, v in jax.device_get(out).items()})

    return step, metrics


def torch_step_fn(compute: Callable[[], dict], trainable: list):
    """A torch step: `compute()` (a dict of scalar tensors with the total under "loss"), its backward and
    AdamW over the `trainable` tensors. Returns `(step, metrics)` as `loop_step_fn` does."""
    import torch

    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
    metrics: list[dict] = []

    def step():
        opt.zero_grad(set_to_none=True)
        out = compute()
        out["loss"].backward()
        opt.step()
        metrics.append({k: float(v.detach()) for k, v in out.items()})

    return step, metrics
