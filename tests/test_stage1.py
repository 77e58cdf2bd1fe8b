"""Stage 1 end to end on the tiny shapes dataset: the CLI, losses on a mesh, exact resume, frozen ViT.

Every run of the tiny config (`tests/tiny_configs.stage1`: 5 steps) on one device compiles the same
train step as the 1-device `reference` run; the compile cache makes those compilations lookups.
"""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from blip2_jax import sharding
from blip2_jax.train import loop, stage1
from tests import tiny_configs
from tests.toy_task import compile_cache, losses  # noqa: F401  (fixture)
from tests.helpers import subprocess_xla_flags

pytestmark = pytest.mark.usefixtures("compile_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = jax.devices()[:1]


def run(cfg, workdir, devices=None, hook=None):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    return loop.train(cfg, stage1.make_task(cfg, mesh), stage1.make_data(cfg), str(workdir), mesh=mesh,
                      step_hook=hook)


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
    """step -> loss of the uninterrupted 1-device run (checkpoints every 2 steps)."""
    workdir = tmp_path_factory.mktemp("stage1_reference")
    out = run(tiny_configs.stage1(shapes_dir, checkpoint_every=2), workdir, devices=ONE)
    assert out["step"] == 5 and not out["preempted"]
    return losses(workdir)


def test_main_runs_the_demo_config_and_ends_with_one_json_line(shapes_dir, tmp_path):
    c = tiny_configs.stage1(shapes_dir, total_steps=2, batch_size=8)  # as command-line overrides of the demo
    c.eval.source.path, c.eval.batch_size = shapes_dir, 8  # with the retrieval eval
    overrides = tiny_configs.flags(c, "stage1", "demo")
    proc = subprocess.run([sys.executable, "-m", "blip2_jax.main", "--config=configs/stage1.py:demo",
                           f"--workdir={tmp_path}", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "XLA_FLAGS": subprocess_xla_flags(1)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("loss", "loss_itc", "loss_itm", "loss_itg", "temperature", "itm_accuracy", "t2i_r1", "i2t_r1"):
        assert key in final, key
    assert 0.0 <= final["t2i_r1"] <= 1.0 and final["step"] == 2
    assert np.isfinite(final["loss"]) and final["loss"] > 0
    # The run recorded its config: the public loader rebuilds the trained model from the workdir.
    import blip2_jax
    from blip2_jax.checkpoint import load_run_config
    recorded = load_run_config(str(tmp_path))
    assert recorded.task == "stage1" and recorded.train.total_steps == 2
    model, params = blip2_jax.from_pretrained(str(tmp_path))
    assert type(model).__name__ == "Blip2Stage1" and model.config.vision.image_size == c.data.image_size
    assert {"vision", "qformer", "query_tokens", "temp"} <= set(params)


def test_same_losses_on_a_data_fsdp_tensor_mesh(shapes_dir, reference, tmp_path):
    """The stage-1 model's shardings (ViT, Q-Former, ITC over the global batch) change no loss: data=2 x
    fsdp=2 x tensor=2 against one device. The loop's invariance on each mesh axis alone (data=8,
    data=2 x fsdp=4) is tests/test_loop.py's, on the toy task."""
    assert reference[1] != reference[2] != reference[3]
    c = tiny_configs.stage1(shapes_dir)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    run(c, tmp_path)
    got = losses(tmp_path)
    assert sorted(got) == sorted(reference)
    for step in got:
        np.testing.assert_allclose(got[step], reference[step], rtol=0, atol=1e-4, err_msg=f"step {step}")


def test_sigterm_then_resume_gives_the_uninterrupted_losses(shapes_dir, reference, tmp_path):
    cfg = tiny_configs.stage1(shapes_dir, checkpoint_every=2)

    def sigterm_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    out = run(cfg, tmp_path, devices=ONE, hook=sigterm_at_3)
    assert out["preempted"] and out["step"] == 3
    run(cfg, tmp_path, devices=ONE)
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert got[step] == reference[step], (step, got[step], reference[step])


def test_frozen_vit_is_untouched_and_not_in_the_trainable_state(shapes_dir, tmp_path):
    cfg = tiny_configs.stage1(shapes_dir)
    mesh = sharding.make_mesh(cfg.mesh, ONE)
    task = stage1.make_task(cfg, mesh)
    trainable = jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0))
    frozen = jax.eval_shape(task.init_frozen, jax.random.PRNGKey(0))
    assert set(frozen) == {"vision"} and "vision" not in trainable
    # ln_vision trains with the Q-Former, as in LAVIS.
    assert {"ln_vision", "query_tokens", "qformer", "temp", "lm_bias"} <= set(trainable)

    seen, given = {}, {}

    def load_frozen(abstract):  # a known frozen tree, placed on the shardings the loop asks for
        keys = iter(jax.random.split(jax.random.PRNGKey(5), len(jax.tree.leaves(abstract))))
        tree = jax.tree.map(lambda a: jax.device_put(jax.random.normal(next(keys), a.shape, a.dtype), a.sharding),
                            abstract)
        given["frozen"] = jax.tree.map(np.asarray, tree)
        return tree

    def capture(tr, fr, step):
        seen["frozen"] = jax.tree.map(np.asarray, fr)
        return {}

    import dataclasses
    task = dataclasses.replace(task, load_frozen=load_frozen, evaluate=capture)
    out = loop.train(cfg, task, stage1.make_data(cfg), str(tmp_path), mesh=mesh)
    assert out["step"] == cfg.train.total_steps
    jax.tree.map(np.testing.assert_array_equal, seen["frozen"], given["frozen"])


def test_train_vision_trains_the_vit_and_a_later_run_loads_it_frozen_from_the_workdir(shapes_dir, tmp_path):
    cfg = tiny_configs.stage1(shapes_dir, total_steps=2, checkpoint_every=2)
    cfg.model.train_vision = True  # LAVIS's freeze_vit=False
    mesh = sharding.make_mesh(cfg.mesh, ONE)
    task = stage1.make_task(cfg, mesh)
    assert "vision" in jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0))
    assert jax.eval_shape(task.init_frozen, jax.random.PRNGKey(0)) == {} and task.load_frozen is None
    first = {}

    def keep_first(tr, fr, step):
        first.setdefault("vision", jax.tree.map(np.asarray, tr["vision"]))
        return {}

    import dataclasses
    init = jax.jit(lambda key: sharding.unbox(task.init_trainable(key)))  # one compile; eagerly ~10 s a call
    start = jax.tree.map(np.asarray, init(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0))["vision"])
    loop.train(cfg, dataclasses.replace(task, evaluate=keep_first), stage1.make_data(cfg), str(tmp_path / "vit"),
               mesh=mesh)
    trained = first["vision"]  # after the 2 steps (evaluate runs at the end)
    # Every ViT tensor moved from its initial value, by two AdamW steps' worth (<= ~2 x peak LR 1e-3).
    change = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(trained))]
    assert all(0 < c < 5e-3 for c in change), change

    # Fine-tuning it further: the trainable ViT starts from that workdir's.
    again = tiny_configs.stage1(shapes_dir)
    again.model.train_vision, again.init.vision_checkpoint = True, str(tmp_path / "vit")
    with jax.set_mesh(mesh):
        fresh = init(jax.random.PRNGKey(3))  # `again` has the same trainable tree
        loaded = stage1.make_task(again, mesh).load_trainable(fresh)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded["vision"]), trained)

    frozen_cfg = tiny_configs.stage1(shapes_dir)  # the reference's program: a compile-cache hit
    frozen_cfg.init.vision_checkpoint = str(tmp_path / "vit")
    seen = {}
    task2 = stage1.make_task(frozen_cfg, mesh)
    task2 = dataclasses.replace(task2, evaluate=lambda tr, fr, s: seen.update(fr=fr) or {})
    loop.train(frozen_cfg, task2, stage1.make_data(frozen_cfg), str(tmp_path / "frozen"), mesh=mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, seen["fr"]["vision"]), trained)

    no_vit = tiny_configs.stage1(shapes_dir)
    no_vit.init.vision_checkpoint = str(tmp_path / "frozen")  # its checkpoint trained no ViT
    with pytest.raises(ValueError, match="holds no trained ViT"):
        stage1.make_task(no_vit, mesh).load_frozen(None)
