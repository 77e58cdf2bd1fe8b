"""The train loop on a toy task: mesh invariance, RNG derivation, frozen params, gradient
accumulation, NaN handling, metrics output."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import toy_task as toy
from tests.toy_task import compile_cache  # noqa: F401  (fixture)
from blip2_jax import config_sections, sharding
from blip2_jax.train import loop, optimizer


pytestmark = pytest.mark.usefixtures("compile_cache")


def _train(workdir, cfg, task=None, data=None, devices=None, hook=None):
    return loop.train(cfg, task or toy.make_task(), data or toy.data_factory(), str(workdir),
                      devices=devices, step_hook=hook)


def _first_loss_by_hand(cfg, task):
    """Step 1's loss from fresh params, computed outside the loop with the documented RNG."""
    root = jax.random.PRNGKey(cfg.seed)
    params = sharding.unbox(task.init_trainable(jax.random.fold_in(root, 0)))
    frozen = sharding.unbox(task.init_frozen(jax.random.fold_in(root, 1)))
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, 2), 0), 0)
    batch = toy.ToyData(cfg.train.batch_size)._batch(0)
    batch.pop("caption")
    loss, _ = jax.jit(task.loss_fn, static_argnums=4)(params, frozen, batch, rng, True)
    return float(loss)


def test_same_losses_on_every_mesh_and_frozen_params_untouched(toy_reference, tmp_path):
    cfg = toy.config(checkpoint_every=0)  # the reference's 6 steps (it is the checkpoint tests' too)
    ref_dir, ref = toy_reference
    ref_losses = toy.losses(ref_dir)
    assert sorted(ref_losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(ref_losses[1], _first_loss_by_hand(cfg, toy.make_task()), rtol=1e-6)
    assert ref_losses[1] != ref_losses[2] != ref_losses[3]   # it trains: the losses move

    # The 2x2x2 run gets a frozen tree from load_frozen and records what evaluate() sees.
    frozen_in = {"embedding": None}
    seen = {}

    def load_frozen(abstract):
        leaf = abstract["embedding"]
        value = jax.random.normal(jax.random.PRNGKey(7), leaf.shape).astype(leaf.dtype)
        frozen_in["embedding"] = np.asarray(value)
        return {"embedding": jax.device_put(value, leaf.sharding)}

    def evaluate(params, frozen, step):
        seen["frozen"] = np.asarray(frozen["embedding"])
        seen["sharding"] = frozen["embedding"].sharding.spec
        return {"n_params": sum(x.size for x in jax.tree.leaves(params))}

    base = toy.make_task(evaluate=False)
    for mesh in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        workdir = tmp_path / "x".join(map(str, mesh))
        if mesh == (2, 2, 2):
            out = _train(workdir, toy.mesh_config(cfg, *mesh),
                         task=dataclasses.replace(toy.make_task(), load_frozen=load_frozen,
                                                  evaluate=evaluate))
            continue
        _train(workdir, toy.mesh_config(cfg, *mesh), task=base)
        got = toy.losses(workdir)
        for step in (1, 2, 3):
            np.testing.assert_allclose(got[step], ref_losses[step], rtol=0, atol=1e-5,
                                       err_msg=f"mesh {mesh}, step {step}")
    # frozen: bit-identical after training, bfloat16, sharded by its logical axes (vocab 37 is
    # indivisible by tensor=2, so that dim is replicated; embed -> fsdp)
    assert seen["frozen"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(seen["frozen"].view(np.uint16),
                                  frozen_in["embedding"].view(np.uint16))
    assert seen["sharding"] == jax.sharding.PartitionSpec(None, "fsdp")
    assert out["step"] == 6 and out["n_params"] == sum(
        x.size for x in jax.tree.leaves(jax.eval_shape(base.init_trainable, jax.random.PRNGKey(0))))
    # outputs: metrics.jsonl, TensorBoard events, MFU, eval metrics, handlers restored
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(ref_dir / "tensorboard"))
    assert {"loss", "ce", "contrastive", "temp", "learning_rate", "grad_norm", "eval_loss",
            "steps_per_sec", "examples_per_sec", "mfu"} <= set(ref)
    np.testing.assert_allclose(ref["examples_per_sec"], 16 * ref["steps_per_sec"], rtol=1e-9)
    np.testing.assert_allclose(ref["mfu"], ref["examples_per_sec"] * 1e6 / 1e9, rtol=1e-9)
    with open(ref_dir / "metrics.jsonl") as f:
        lrs = {r["step"]: r["learning_rate"] for r in map(json.loads, f) if "learning_rate" in r}
    sched = optimizer.make_schedule(cfg.optimizer, cfg.train.total_steps)
    for step in range(1, 7):  # step s uses the schedule at s-1 updates
        np.testing.assert_allclose(lrs[step], float(sched(step - 1)), rtol=1e-6)


def _step_fns(task, cfg, mesh, accums):
    tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.train.total_steps)
    rules = sharding.axis_rules()
    root = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(task.init_trainable, root)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    state_shardings, _ = loop.train_state_shardings(sharding.unbox(boxed), shardings, tx, mesh)
    fresh = lambda: loop._fresh_state(task, tx, root, root, mesh, rules, state_shardings)
    steps = {k: loop.make_train_step(task, tx, schedule, mesh, state_shardings,
                                     grad_accum_steps=k, skip_nonfinite=False) for k in accums}
    frozen = loop.make_frozen(task, jax.random.PRNGKey(1), mesh, rules)
    return fresh, steps, frozen


def test_grad_accumulation_equals_one_big_batch():
    cfg = toy.config()
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    data = toy.ToyData(16)
    batches = [sharding.make_global_batch(data._batch(i), mesh) for i in range(2)]
    with jax.set_mesh(mesh):
        # a loss that is a per-example mean: accumulation over 4 micro-batches == one batch
        fresh, steps, frozen = _step_fns(toy.make_task(dropout=0.0, contrastive=False), cfg, mesh,
                                         (1, 4))
        states = {k: fresh() for k in steps}
        for batch in batches:
            out = {}
            for k, step in steps.items():
                states[k], out[k] = step(states[k], frozen, batch)
            np.testing.assert_allclose(out[4]["loss"], out[1]["loss"], rtol=0, atol=1e-6)
        flat = {k: jax.tree.leaves(states[k]["params"]) for k in steps}
        for a, b in zip(flat[1], flat[4]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
        # In-batch negatives come from the micro-batch: the step's "contrastive" metric (reported,
        # not in this loss) is the mean over the strided micro-batches i, i+4, i+8, ...
        task = toy.make_task(dropout=0.0, contrastive=False)
        fresh_state = fresh()
        params = jax.device_get(fresh_state["params"])
        got = {k: float(step(fresh() if k == 1 else fresh_state, frozen, batches[0])[1]["contrastive"])
               for k, step in steps.items()}
        host = data._batch(0)
        host.pop("caption")
        loss_fn = jax.jit(task.loss_fn, static_argnums=4)
        con = lambda b: float(loss_fn(params, frozen, b, None, False)[1]["contrastive"])
        np.testing.assert_allclose(got[1], con(host), rtol=1e-5)
        np.testing.assert_allclose(
            got[4], np.mean([con(jax.tree.map(lambda x: x[i::4], host)) for i in range(4)]),
            rtol=1e-5)
        assert abs(got[1] - got[4]) > 0.1


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    cfg = toy.config(checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="at step 3"):
        _train(tmp_path, cfg, data=toy.data_factory(nan_at=2), devices=jax.devices()[:1])
    # the non-finite state was never checkpointed
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [1, 2]


def test_nonfinite_update_is_skipped(tmp_path):
    from blip2_jax import checkpoint
    cfg = toy.config(checkpoint_every=1, skip_nonfinite_updates=True)
    out = _train(tmp_path, cfg, data=toy.data_factory(nan_at=2), devices=jax.devices()[:1],
                 task=toy.make_task(evaluate=False))
    losses = toy.losses(tmp_path)
    assert np.isnan(losses[3]) and np.isfinite(losses[4]) and out["step"] == 6
    assert out["skipped_updates"] == 0  # the last window (step 6) skipped nothing
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    try:
        import orbax.checkpoint as ocp
        read = lambda s: ocp.StandardCheckpointer().restore(
            tmp_path / "checkpoints" / str(s) / "state")
        s2, s3, s4 = read(2), read(3), read(4)
    finally:
        ckpt.close()
    assert int(s3["step"]) == 3
    # step 3 changed nothing but the step counter; step 4 updated again
    for a, b in zip(jax.tree.leaves((s2["params"], s2["opt_state"])),
                    jax.tree.leaves((s3["params"], s3["opt_state"]))):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(s3["params"]["Dense_0"]["kernel"], s4["params"]["Dense_0"]["kernel"])


def _bad(mutate):
    d = config_sections.loop_config().to_dict()
    mutate(d)
    import ml_collections
    return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["train"].update(chekpoint_every=5), "train.chekpoint_every: unknown field"),
    (lambda d: d["train"].update(total_steps="10"), "train.total_steps='10': expected int"),
    (lambda d: d["train"].update(skip_nonfinite_updates=1), "train.skip_nonfinite_updates=1"),
    (lambda d: d["optimizer"].update(b2=1.5), "optimizer.b2=1.5"),
    (lambda d: d["optimizer"].update(schedule="linear"), "optimizer.schedule='linear'"),
    (lambda d: d["mesh"].update(data=3), "mesh.data * mesh.fsdp * mesh.tensor"),
    (lambda d: d["mesh"].update(axis_rules=(("embed", "model"),)), "mesh.axis_rules"),
    (lambda d: d["train"].update(batch_size=12), "train.batch_size=12"),
    (lambda d: d["train"].update(batch_size=16, grad_accum_steps=4), "train.batch_size=16"),
    (lambda d: d.pop("optimizer"), "optimizer: missing"),
    (lambda d: d["train"].update(profile_steps=(5, 2)), "train.profile_steps=(5, 2)"),
])
def test_config_validation_names_the_field(mutate, field):
    from blip2_jax import config_validation
    with pytest.raises(config_validation.ConfigError, match=re.escape(field)):
        config_validation.validate(_bad(mutate), num_devices=8)


def test_valid_config_passes_and_int_is_accepted_for_float():
    from blip2_jax import config_validation
    config_validation.validate(_bad(lambda d: d["optimizer"].update(peak_lr=1)), num_devices=8)
    config_validation.validate(toy.config(), num_devices=8)


def test_main_rejects_a_bad_override_before_any_compute(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from blip2_jax import config_sections\n\n"
                   "def get_config(arg=None):\n    return config_sections.loop_config()\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    run = lambda *a: subprocess.run([sys.executable, "-m", "blip2_jax.main", f"--config={cfg}",
                                     f"--workdir={tmp_path / 'w'}", *a], capture_output=True,
                                    text=True, env=env, cwd=root, timeout=120)
    out = run("--config.train.batch_size=12", "--config.task=stage1")
    assert out.returncode != 0 and "train.batch_size=12" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def _sigterm_at(step):
    def hook(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def test_preempted_run_reports_the_metrics_of_the_step_it_stopped_at(tmp_path):
    one = jax.devices()[:1]
    task = toy.make_task(evaluate=False)
    per_step = _train(tmp_path / "a", toy.config(log_every=1, checkpoint_every=0), task=task, devices=one,
                      hook=_sigterm_at(3))
    losses = toy.losses(tmp_path / "a")
    assert per_step["preempted"] and per_step["step"] == 3 and sorted(losses) == [1, 2, 3]
    # log_every=2: step 2 logs steps 1-2; the signal at step 3 flushes the window holding step 3 alone
    out = _train(tmp_path / "b", toy.config(log_every=2, checkpoint_every=0), task=task, devices=one,
                 hook=_sigterm_at(3))
    assert out["preempted"] and out["step"] == 3
    np.testing.assert_allclose(out["loss"], losses[3], rtol=1e-6)
    got = toy.losses(tmp_path / "b")
    assert sorted(got) == [2, 3]
    np.testing.assert_allclose(got[2], (losses[1] + losses[2]) / 2, rtol=1e-6)
    # log_every=4: no log line before the signal; the final metrics still hold steps 1-3
    out = _train(tmp_path / "c", toy.config(log_every=4, checkpoint_every=0), task=task, devices=one,
                 hook=_sigterm_at(3))
    np.testing.assert_allclose(out["loss"], (losses[1] + losses[2] + losses[3]) / 3, rtol=1e-6)
    assert out["step"] == 3 and "steps_per_sec" in out


def test_profile_steps_writes_a_trace_of_those_steps(tmp_path):
    """`train.profile_steps=(N, M)`: a jax.profiler trace of steps N+1..M under <workdir>/profile, and the run's
    losses are those of an unprofiled run."""
    cfg = toy.config(checkpoint_every=0, total_steps=4, profile_steps=(1, 3))
    result = _train(tmp_path / "profiled", cfg)
    traces = [f for _, _, files in os.walk(tmp_path / "profiled" / "profile") for f in files
              if f.endswith(".xplane.pb")]
    assert len(traces) == 1
    plain = _train(tmp_path / "plain", toy.config(checkpoint_every=0, total_steps=4))
    assert toy.losses(str(tmp_path / "profiled")) == toy.losses(str(tmp_path / "plain"))
    assert result["step"] == plain["step"] == 4
