"""Checkpoints: exact resume after SIGTERM or a crash, resume onto another mesh, and what a
checkpoint holds (trainable params + Adam state for them only, the data position; no frozen params)."""
import json
import logging
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from blip2_jax import checkpoint, sharding
from blip2_jax.train import loop
from tests import toy_task as toy
from tests.toy_task import compile_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("compile_cache")

ONE = jax.devices()[:1]


def _train(workdir, cfg=None, devices=ONE, hook=None):
    return loop.train(cfg or toy.config(), toy.make_task(evaluate=False), toy.data_factory(),
                      str(workdir), devices=devices, step_hook=hook)


@pytest.fixture(scope="module")
def reference(toy_reference):
    """An uninterrupted 6-step run on one device, checkpoints every 2 steps (conftest.py's `toy_reference`)."""
    workdir, out = toy_reference
    assert out["step"] == 6 and not out["preempted"]
    return workdir, toy.losses(workdir)


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _sigterm_at(step):
    def hook(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, reference):
    _, ref = reference
    out = _train(tmp_path, hook=_sigterm_at(3))
    assert out["preempted"] and out["step"] == 3
    assert _steps(tmp_path) == [2, 3]   # step 3 saved on the signal (every-2 schedule gives 2)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    out = _train(tmp_path)
    assert not out["preempted"] and out["step"] == 6
    assert toy.losses(tmp_path) == ref  # bit for bit, all 6 steps


def test_crash_resumes_from_last_checkpoint_exactly(tmp_path, reference):
    _, ref = reference

    def crash(step):
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp_path, hook=crash)
    assert _steps(tmp_path) == [2]
    _train(tmp_path)                     # re-runs step 3 from the step-2 checkpoint
    assert toy.losses(tmp_path) == ref   # the re-run step 3 equals the original one exactly


def test_resume_onto_another_mesh(tmp_path, reference):
    _, ref = reference
    _train(tmp_path, hook=_sigterm_at(3))                         # 1 device
    _train(tmp_path, toy.mesh_config(toy.config(), 2, 2, 2), devices=None)  # 8 devices
    got = toy.losses(tmp_path)
    for step in range(1, 7):
        np.testing.assert_allclose(got[step], ref[step], rtol=0, atol=1e-5, err_msg=f"step {step}")


def test_checkpoint_holds_only_trainable_state_and_data_position(reference):
    workdir, _ = reference
    assert _steps(workdir) == [2, 4, 6]
    path = workdir / "checkpoints" / "6"
    state = ocp.StandardCheckpointer().restore(path / "state")
    assert set(state) == {"step", "params", "opt_state", "rng"} and int(state["step"]) == 6
    nbytes = lambda tree: sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))
    task = toy.make_task()
    abstract = jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    assert nbytes(state["params"]) == param_bytes
    # Adam's mu and nu for every trainable leaf, plus int32 step counters: nothing else
    counters = nbytes(state["opt_state"]) - 2 * param_bytes
    assert 0 < counters <= 16
    # the frozen table (bf16 [37, 16]) is nowhere in the checkpoint
    shapes = {(np.asarray(x).shape, np.asarray(x).dtype) for x in jax.tree.leaves(state)}
    assert ((toy.VOCAB, toy.EMBED), np.dtype("bfloat16")) not in shapes
    assert not any(s == (toy.VOCAB, toy.EMBED) for s, _ in shapes)
    # the data position: grain's Orbax handler, one JSON file per process
    assert json.loads((path / "data" / "process_0-of-1.json").read_text()) == {"index": 6}


def _tiny_state():
    return {"step": np.int32(3), "params": {"w": np.arange(3, dtype=np.float32)}, "rng": np.zeros(2, np.uint32)}


def _abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=device), state)


def test_data_state_must_be_json_and_roundtrips(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ckpt.save(1, _tiny_state(), {"not": object()})
    ckpt.save(2, _tiny_state(), {"index": 3, "epoch": [1, 2]})
    state, data = ckpt.restore(2, _abstract(_tiny_state()))
    assert data == {"index": 3, "epoch": [1, 2]}
    np.testing.assert_array_equal(state["params"]["w"], np.arange(3))
    ckpt.close()


def test_checkpoint_of_the_earlier_data_format_still_resumes(tmp_path):
    """Checkpoints written before grain's handler kept every process's data state in one JSON item."""
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(_tiny_state()),
                                            data=ocp.args.JsonSave({"0": {"json": {"index": 7}}})))
    manager.close()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    state, data = ckpt.restore(4, _abstract(_tiny_state()))
    assert data == {"index": 7} and int(state["step"]) == 3
    ckpt.close()


def _as_if_written_by_two_processes(directory, step, states):
    """Rewrites checkpoint `step`'s data item as two processes' grain handler would have written it."""
    data = directory / str(step) / "data"
    (data / "process_0-of-1.json").unlink()
    for i, state in enumerate(states):
        (data / f"process_{i}-of-2.json").write_text(json.dumps(state))


def test_data_state_of_another_process_count_reshards_from_its_global_position(tmp_path):
    """A checkpoint of 2 processes on 1: process 0's data state, which carries the global position (each
    process derives its own from it: tests/test_data_pipeline.py); without one, an error saying why."""
    directory = tmp_path / "checkpoints"
    ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
    ckpt.save(2, _tiny_state(), {})
    ckpt.save(4, _tiny_state(), {})
    ckpt.close()
    _as_if_written_by_two_processes(directory, 2, [{"global_position": 32, "p": 0}, {"global_position": 32, "p": 1}])
    _as_if_written_by_two_processes(directory, 4, [{"index": 4}, {"index": 4}])  # a state that cannot re-shard
    ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
    state, data = ckpt.restore(2, _abstract(_tiny_state()))
    assert data == {"global_position": 32, "p": 0} and int(state["step"]) == 3
    with pytest.raises(ValueError, match=r"process 0 of 1, and its data state has no global position"):
        ckpt.restore(4, _abstract(_tiny_state()))
    ckpt.close()


def test_latest_params_loads_quietly(reference, caplog, capfd):
    """A workdir load logs no Orbax warning ("Metadata file does not exist": Checkpointer.metadata
    looks for a step-level metadata file inside the item directory)."""
    workdir, _ = reference
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        step, params = checkpoint.latest_params(str(workdir))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []
    assert "Metadata file" not in capfd.readouterr().err
    task = toy.make_task()
    abstract = sharding.unbox(jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0)))
    assert step == 6 and jax.tree.structure(params) == jax.tree.structure(abstract)
    assert all(isinstance(x, np.ndarray) and x.shape == a.shape
               for x, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)))


def test_unfinished_saves_are_removed_at_start(tmp_path, capfd):
    """A save killed mid-write (kill -9) leaves Orbax's `<step>.orbax-checkpoint-tmp...` directory;
    the next start deletes it, says so, and resumes from the newest finished checkpoint."""
    directory = tmp_path / "checkpoints"
    ckpt = checkpoint.Checkpointer(str(directory), async_save=False)
    state = {"step": np.int32(2), "params": {"w": np.ones((2, 3), np.float32)}}
    ckpt.save(2, state, {"index": 2})
    ckpt.close()
    for name in ("4.orbax-checkpoint-tmp", "6.orbax-checkpoint-tmp-1733068800123456"):
        (directory / name / "state.orbax-checkpoint-tmp").mkdir(parents=True)
        (directory / name / "state.orbax-checkpoint-tmp" / "partial").write_bytes(b"\0" * 64)
    capfd.readouterr()
    ckpt = checkpoint.Checkpointer(str(directory))
    try:
        assert sorted(os.listdir(directory)) == ["2"]
        assert ckpt.latest_step() == 2
        restored, data = ckpt.restore(2, jax.tree.map(np.asarray, state))
    finally:
        ckpt.close()
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert data == {"index": 2}
    err = capfd.readouterr().err
    assert "removed 2 unfinished checkpoint save(s)" in err and "4.orbax-checkpoint-tmp" in err
