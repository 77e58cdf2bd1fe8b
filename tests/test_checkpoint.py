"""Checkpoints: exact resume after SIGTERM or a crash, resume onto another mesh, and what a
checkpoint holds (trainable params + Adam state for them only, the data position; no frozen params)."""
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from blip2_jax import checkpoint
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
    data = ocp.JsonCheckpointHandler().restore(path / "data")
    assert data == {"0": {"json": {"index": 6}}}


def test_data_state_encoding_roundtrips_bytes_and_json():
    for state in [b"\x00grain\xffstate", {"index": 3, "epoch": [1, 2]}]:
        assert checkpoint.decode_data_state(checkpoint.encode_data_state(state)) == state
    with pytest.raises(TypeError):
        checkpoint.encode_data_state({"not": object()})
