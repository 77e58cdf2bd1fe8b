"""The one train loop, shared by every stage: `train(config, task, make_data, workdir)`.

Read top to bottom: mesh -> frozen params -> train state (fresh and sharded, or restored from the
workdir's latest checkpoint onto this mesh) -> jitted step -> loop (metrics, NaN checks,
evaluation, checkpoints, preemption) -> final metrics.

Train state: a plain dict `{"step": int32[], "params": trainable tree, "opt_state": optax state,
"rng": uint32[2]}`. The step's RNG is `fold_in(state["rng"], step)` (then folded with the
micro-batch index), so a resumed run, and a run on another mesh, draws the same numbers
(`jax_threefry_partitionable` is on, so random bits do not depend on sharding either).

Gradient accumulation (`train.grad_accum_steps = k`): one step consumes one global batch of
`train.batch_size` rows and makes one optimizer update. The batch is cut into k micro-batches of
`batch_size / k` rows (micro-batch i holds rows i, i+k, i+2k, ..., so every device keeps its share
of each micro-batch); gradients, losses and metrics are the mean over micro-batches, taken with a
`lax.scan` inside the step. In-batch negatives (ITC, ITM hard negatives) therefore come from the
micro-batch: `batch_size / k` examples, gathered over all devices.

Step numbering: "step s" is the s-th update (1-based); metrics, NaN messages and checkpoints use it.
A checkpoint at step s holds the state after s updates and the data position after s batches.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from blip2_jax import checkpoint as checkpoint_lib
from blip2_jax import sharding as sharding_lib
from blip2_jax.spec import model as spec
from blip2_jax.train import metrics as metrics_lib
from blip2_jax.train import optimizer as optimizer_lib
from blip2_jax.train.task import DataIterator, Task


# --------------------------------------------------------------------------------------------
# Train state and step
# --------------------------------------------------------------------------------------------

def _replicated(mesh):
    return NamedSharding(mesh, P())


def train_state_shardings(abstract_params, param_shardings, tx, mesh):
    """Shardings of the whole train state: Adam moments follow their parameter, the rest replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: _replicated(mesh))
    return {"step": _replicated(mesh), "params": param_shardings, "opt_state": opt_shardings,
            "rng": _replicated(mesh)}, abstract_opt


def abstract_train_state(task: Task, tx: optax.GradientTransformation, init_key, mesh, rules):
    """`(abstract state, state shardings)`: the train state as ShapeDtypeStructs carrying their
    shardings (Orbax restore and ahead-of-time compilation targets); no array is allocated."""
    boxed = jax.eval_shape(task.init_trainable, init_key)
    param_shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
    abstract_params = sharding_lib.unbox(boxed)
    state_shardings, abstract_opt = train_state_shardings(abstract_params, param_shardings, tx, mesh)
    abstract_state = sharding_lib.abstract_with_shardings(
        {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
         "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)},
        state_shardings)
    return abstract_state, state_shardings


def _split_micro(x, k, mesh):
    """`[B, ...] -> [k, B/k, ...]` with micro-batch i = rows i, i+k, ... (keeps rows on their device)."""
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    spec = P(None, sharding_lib.BATCH_AXES)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule, mesh,
                    state_shardings, *, grad_accum_steps: int, skip_nonfinite: bool):
    """The jitted `(state, frozen, batch) -> (state, metrics)`; `state` is donated."""
    param_shardings = state_shardings["params"]

    def grads_of(params, frozen, batch, rng):
        def loss(p):
            value, metrics = task.loss_fn(p, frozen, batch, rng, True)
            return value.astype(jnp.float32), metrics
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return value, metrics, grads

    def step(state, frozen, batch):
        params = state["params"]
        rng = jax.random.fold_in(state["rng"], state["step"])
        if grad_accum_steps == 1:
            loss, metrics, grads = grads_of(params, frozen, batch, jax.random.fold_in(rng, 0))
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, grad_accum_steps, mesh), batch)

            def body(acc, xs):
                i, mb = xs
                out = grads_of(params, frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, out), None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(grads_of, params, frozen, first, rng))
            total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
            loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, total)
        # Keep gradients on the parameters' shardings (a reduce-scatter under FSDP).
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        grad_norm = optax.global_norm(grads)
        learning_rate = schedule(optimizer_lib.update_count(state["opt_state"]))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_params = keep(new_params, params)
            opt_state = keep(opt_state, state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state,
                     "rng": state["rng"]}
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                   "learning_rate": learning_rate, "finite": finite}
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, None))


# --------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------

class _StopRequest:
    """Set by SIGTERM/SIGINT; the loop checkpoints and returns at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops right away
        self.signal = signum

    def requested(self) -> bool:
        local = self.signal is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        # All processes must agree on the step at which they stop and checkpoint.
        return bool(multihost_utils.process_allgather(np.array(local)).any())

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

class _Window:
    """Host-side running means of the per-step metrics between two log lines, and their timing."""

    def __init__(self):
        self.reset(time.perf_counter(), 0)

    def reset(self, now, step):
        self.sums, self.count, self.skipped = {}, 0, 0
        self.restart_timer(now, step)

    def restart_timer(self, now, step):
        self.start, self.start_step = now, step

    def add(self, metrics):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def means(self):
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


class _StepProfiler:
    """A `jax.profiler` trace of steps N+1..M (`train.profile_steps = (N, M)`) into `<workdir>/profile`:
    started before step N+1 is dispatched, stopped once step M has finished (it blocks on it)."""

    def __init__(self, steps, workdir: str):
        self.first, self.last = tuple(steps) if steps else (None, None)
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before(self, step: int) -> None:
        """Called with the number of steps done, before the next one is dispatched."""
        if step == self.first:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, device_metrics) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(device_metrics)
            self.stop()
            metrics_lib.print_progress(f"profile of steps {self.first + 1}..{step} in {self.directory}")

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _nonfinite_message(step, m):
    return (f"non-finite loss or gradient at step {step}: loss={float(m['loss'])}, "
            f"grad_norm={float(m['grad_norm'])}. Set train.skip_nonfinite_updates=True to skip "
            "such updates instead of stopping.")


def train(config: ml_collections.ConfigDict, task: Task, make_data: Callable[[], DataIterator],
          workdir: str, *, mesh: Optional[jax.sharding.Mesh] = None,
          devices: Optional[Sequence[jax.Device]] = None,
          step_hook: Optional[Callable[[int], None]] = None) -> dict:
    """Trains `task` for `config.train.total_steps`, resuming from `workdir` if it holds checkpoints.

    Args:
      config: see `blip2_jax.config_sections.loop_config()` for the fields read here.
      task: the stage's hooks (`blip2_jax.train.task.Task`).
      make_data: zero-argument factory of the per-process data iterator.
      workdir: checkpoints in `workdir/checkpoints`, metrics in `workdir/metrics.jsonl` and
        `workdir/tensorboard`, the config in `workdir/run_config.json`.
      mesh: a prebuilt mesh (main.py builds it first so the task can use it); default
        `sharding.make_mesh(config.mesh, devices)`.
      devices: the devices for the default mesh (default: all).
      step_hook: called on the host as `step_hook(step)` after each step is dispatched (tests use it
        to simulate preemption and crashes).

    Returns the final metrics: the means of the last training window (the steps since the previous
    log line, up to the last step run, also when a signal stopped the run between two log steps), the
    last evaluation's metrics under their own names, `step`, and `preempted` (True when a signal ended
    the run).
    Raises FloatingPointError naming the step if a loss or gradient is NaN/Inf (unless
    `train.skip_nonfinite_updates`).
    """
    jax.config.update("jax_threefry_partitionable", True)
    tc, total = config.train, int(config.train.total_steps)
    mesh = mesh or sharding_lib.make_mesh(config.mesh, devices)
    rules = sharding_lib.axis_rules(tuple(config.mesh.axis_rules))
    accum = int(tc.grad_accum_steps)
    init_key, frozen_key, train_key = spec.run_keys(config.seed)
    # What the run is, for `blip2_jax.from_pretrained(workdir)` (rewritten on every (re)start).
    checkpoint_lib.save_run_config(workdir, config)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # ---- frozen params: loaded or random, never trained, never checkpointed ----
        frozen = make_frozen(task, frozen_key, mesh, rules)

        # ---- optimizer and the train state's shardings (no arrays allocated yet) ----
        tx, schedule = optimizer_lib.make_optimizer(config.optimizer, total)
        abstract_state, state_shardings = abstract_train_state(task, tx, init_key, mesh, rules)

        # ---- fresh start or resume ----
        ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, checkpoint_lib.CHECKPOINTS),
                                           keep=int(tc.keep_checkpoints),
                                           async_save=bool(tc.async_checkpointing))
        data = make_data()
        start = ckpt.latest_step()
        if start is None:
            state = _fresh_state(task, tx, init_key, train_key, mesh, rules, state_shardings)
            start = 0
        else:
            state, data_state = ckpt.restore(start, abstract_state)
            data.set_state(data_state)
            metrics_lib.print_progress(f"resumed from {ckpt.directory}/{start}")

        metrics_lib.print_progress(metrics_lib.write_parameter_overview(workdir, state["params"], frozen))
        train_step = make_train_step(task, tx, schedule, mesh, state_shardings,
                                     grad_accum_steps=accum,
                                     skip_nonfinite=bool(tc.skip_nonfinite_updates))
        writer = metrics_lib.MetricWriter(workdir)
        profiler = _StepProfiler(tc.get("profile_steps", ()), workdir)
        try:
            with _StopRequest() as stop:
                result, params = _run(config, task, mesh, frozen, state, data, train_step, ckpt, writer,
                                      profiler, stop, start, total, step_hook)
            if task.on_finish is not None and not result["preempted"]:
                task.on_finish(params, workdir)
            return result
        finally:
            profiler.stop()
            writer.close()
            ckpt.close()


def make_frozen(task: Task, rng, mesh, rules) -> dict:
    """The frozen tree of `task` ({} if it has none): `task.load_frozen` (given the abstract, sharded
    tree) when it returns one, else drawn from `task.init_frozen(rng)`; on every (re)start."""
    if task.init_frozen is None:
        return {}
    return sharding_lib.create_or_load(task.init_frozen, rng, mesh, rules, load=task.load_frozen)


def _fresh_state(task, tx, init_key, train_key, mesh, rules, state_shardings):
    params, param_shardings = sharding_lib.create_sharded(task.init_trainable, init_key, mesh, rules)
    if task.load_trainable is not None:
        params = jax.device_put(task.load_trainable(params), param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params)
    replicated = _replicated(mesh)
    return {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated), "params": params,
            "opt_state": opt_state,
            # a host copy: the state is donated, the caller's key must survive
            "rng": jax.device_put(np.asarray(train_key), replicated)}


def _run(config, task, mesh, frozen, state, data, train_step, ckpt, writer, profiler, stop, start, total,
         step_hook):
    tc = config.train
    log_every, eval_every = max(int(tc.log_every), 1), int(tc.eval_every)
    ckpt_every, skip = int(tc.checkpoint_every), bool(tc.skip_nonfinite_updates)
    peak = float(tc.peak_flops_per_device) * mesh.devices.size
    batch_size = int(tc.batch_size)
    window, last_logged, eval_metrics = _Window(), {}, {}
    timer_started = False
    pending = None          # (step, device metrics) of the last dispatched step, checked one step late
    step, saved_step = start, start

    def check(item):
        """Fetches one step's metrics (blocks on that step), checks them, logs at log steps."""
        nonlocal timer_started
        s, device_metrics = item
        m = jax.device_get(device_metrics)
        finite = bool(m.pop("finite"))
        if not finite and not skip:
            raise FloatingPointError(_nonfinite_message(s, m))
        window.add(m)
        now = time.perf_counter()
        if not timer_started:  # the first step includes compilation: time from its end
            window.restart_timer(now, s)
            timer_started = True
        if not finite:
            window.skipped += 1
            metrics_lib.print_progress(f"step {s}: non-finite loss or gradient, update skipped")
        if s % log_every == 0 or s == total:
            log(s, now)

    def log(s, now):
        """Writes and prints the window's means (steps since the last log line, up to step s)."""
        nonlocal last_logged
        out = window.means()
        if skip:
            out["skipped_updates"] = window.skipped
        eta, timed, elapsed = None, s - window.start_step, now - window.start
        if timed > 0 and elapsed > 0:
            sps = timed / elapsed
            out.update(steps_per_sec=sps, examples_per_sec=sps * batch_size)
            if task.flops_per_example and peak > 0:
                out["mfu"] = sps * batch_size * task.flops_per_example / peak
            eta = (total - s) / sps
        writer.write(s, out)
        metrics_lib.print_progress(metrics_lib.format_progress(s, total, out, eta))
        last_logged = out
        window.reset(now, s)

    def evaluate(s):
        nonlocal eval_metrics
        if task.evaluate is None:
            return
        eval_metrics = {k: float(v) for k, v in task.evaluate(state["params"], frozen, s).items()}
        writer.write(s, eval_metrics, prefix="eval/")
        metrics_lib.print_progress(metrics_lib.format_progress(s, total, eval_metrics, None))

    def save(s):
        nonlocal saved_step
        ckpt.save(s, state, data.get_state())
        saved_step = s

    preempted = False
    while step < total:
        if stop.requested():
            preempted = True
            break
        profiler.before(step)
        batch = sharding_lib.make_global_batch(next(data), mesh)
        state, device_metrics = train_step(state, frozen, batch)
        step += 1
        profiler.after(step, device_metrics)
        if pending is not None:
            check(pending)
        pending = (step, device_metrics)
        if step_hook is not None:
            step_hook(step)
        at_eval = eval_every > 0 and step % eval_every == 0 and step < total
        at_ckpt = ckpt_every > 0 and step % ckpt_every == 0
        if at_eval or at_ckpt:
            check(pending)  # never evaluate or save a state whose update was non-finite
            pending = None
            if at_eval:
                evaluate(step)
            if at_ckpt:
                save(step)
    profiler.stop()  # a run stopped (or resumed) inside the profiled steps
    if pending is not None:
        check(pending)
    if window.count:
        # A signal stopped the run between two log steps: report the steps since the last log line,
        # so that the final metrics are those of the step it stopped at, not an earlier window's.
        log(step, time.perf_counter())
    if not preempted:
        evaluate(step)
    if saved_step != step or ckpt.latest_step() is None:
        save(step)
    ckpt.wait()
    writer.flush()
    if preempted:
        metrics_lib.print_progress(f"stopped by signal {stop.signal} at step {step}; checkpoint saved")
    return {**last_logged, **eval_metrics, "step": step, "preempted": preempted}, state["params"]
