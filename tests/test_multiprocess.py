"""Two JAX processes on this machine (4 simulated CPU devices each, gloo collectives) train the stage-1
demo at tiny sizes as one 8-device run: stopped by SIGTERM and restarted, their losses, data and
retrieval evaluation equal one process's; checkpoints re-shard between process counts and meshes.

Compiling the step dominates (each process compiles it; about a minute on 2 busy cores), so the tests
share two 2-process launches. One run in one workdir (`chain`), every segment's losses against the
uninterrupted 1-process, 8-device `reference` (data=8):
  steps 1-2  2 processes x 4 devices (tests/multiprocess_worker.py), fresh, SIGTERM (process 1) at 2;
  steps 3-4  1 process x 2 devices (this process), resumed from their checkpoint, SIGTERM at 4;
  steps 5-6  2 processes x 4 devices through `python -m blip2_jax.main --distributed
             --coordinator_address=... --num_processes=2 --process_id=I`, resumed from that 1-process
             checkpoint, with the retrieval evaluation at the end.
and the 2-process step-2 checkpoint resumed on 1 process x 8 devices with fsdp=4 x data=2.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import multiprocess_worker as worker
from tests import tiny_configs
from tests.toy_task import compile_cache, losses  # noqa: F401  (fixture)
from tests.helpers import subprocess_xla_flags

pytestmark = pytest.mark.usefixtures("compile_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 16  # global batch of worker.config; 8 rows a process with 2
FIRST_STOP, SECOND_STOP = 2, 4  # where the 2-process and the 1-process segments are stopped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(commands: list[list[str]], timeout: float = 300) -> list[str]:
    """Starts one process per command (4 CPU devices each), waits for all; their stdouts. On a failure or
    a timeout, ends the ones still running and fails with the stderr of each."""
    env = {**os.environ, "XLA_FLAGS": subprocess_xla_flags(4), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO}
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
        raise
    failed = [f"process {i}: exit {rc}\n{err[-3000:]}" for i, (rc, _, err) in enumerate(outs) if rc != 0]
    assert not failed, "\n".join(failed)
    return [out for _, out, _ in outs]


def _process_flags(port: int, i: int) -> list[str]:
    return [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]


def _workers(shapes_dir, workdir, sigterm_at: int = 0, evaluate: bool = True) -> list[dict]:
    """The 2-process run of `worker.config` in `workdir` (tests/multiprocess_worker.py); final metrics."""
    port = _free_port()
    outs = _run_processes([[sys.executable, "-m", "tests.multiprocess_worker", *_process_flags(port, i),
                            f"--shapes_dir={shapes_dir}", f"--workdir={workdir}", f"--sigterm_at={sigterm_at}",
                            f"--evaluate={int(evaluate)}"]
                           for i in range(2)])
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def _cli(shapes_dir, workdir) -> list[dict]:
    """The same run through the CLI: `python -m blip2_jax.main --distributed ...` in both processes."""
    port = _free_port()
    overrides = tiny_configs.flags(worker.config(shapes_dir), "stage1", "demo")
    outs = _run_processes([[sys.executable, "-m", "blip2_jax.main", "--config=configs/stage1.py:demo",
                            f"--workdir={workdir}", "--distributed", *_process_flags(port, i), *overrides,
                            # No persistent cache: only process 0 writes it, and a process that finds its
                            # programs there while the other compiles would wait past gloo's 30 s.
                            "--compilation_cache="]
                           for i in range(2)])
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def _rows_of(batches: list[list[int]], process: int, count: int) -> list[list[int]]:
    """Each global batch's block of rows that `process` of `count` reads."""
    block = ROWS // count
    return [b[process * block:(process + 1) * block] for b in batches]


def _copy_checkpoint(workdir, step: int, into) -> None:
    shutil.copytree(os.path.join(workdir, "checkpoints", str(step)), os.path.join(into, "checkpoints", str(step)))


def _assert_losses(got: dict, expected: dict, steps) -> None:
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        np.testing.assert_allclose(got[s], expected[s], rtol=0, atol=1e-5, err_msg=f"step {s}")


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
    """One process, 8 devices (data=8), uninterrupted: `(workdir, final metrics, step -> loss, the image
    ids of each global batch)`."""
    workdir = str(tmp_path_factory.mktemp("mp_reference"))
    out = worker.train(worker.config(shapes_dir), workdir, "0")
    assert out["step"] == 6 and not out["preempted"]
    return workdir, out, losses(workdir), worker.recorded(workdir, "0")


def _sigterm_at(step):
    def hook(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


@pytest.fixture(scope="module")
def chain(shapes_dir, tmp_path_factory):
    """The run of the module docstring: `(workdir, what each segment left, the CLI's final metrics)`."""
    workdir = str(tmp_path_factory.mktemp("mp_chain"))
    seen = {}
    stopped = _workers(shapes_dir, workdir, sigterm_at=FIRST_STOP, evaluate=False)
    seen["two_processes"] = [(o["step"], o["preempted"]) for o in stopped]
    seen["checkpoints"] = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    seen["data"] = sorted(f for f in os.listdir(os.path.join(workdir, "checkpoints", str(FIRST_STOP), "data"))
                          if f.startswith("process_"))
    seen["yielded_two"] = [worker.recorded(workdir, str(p)) for p in range(2)]
    seen["step_2_copy"] = str(tmp_path_factory.mktemp("mp_step2"))
    _copy_checkpoint(workdir, FIRST_STOP, seen["step_2_copy"])

    out = worker.train(worker.config(shapes_dir, evaluate=False), workdir, "one", devices=jax.devices()[:2],
                       step_hook=_sigterm_at(SECOND_STOP))
    seen["one_process"] = (out["step"], out["preempted"])
    seen["yielded_one"] = worker.recorded(workdir, "one")
    final = _cli(shapes_dir, workdir)
    return workdir, seen, final


def test_two_processes_train_stop_resume_and_evaluate_as_one(reference, chain):
    ref_dir, ref_out, ref_losses, ref_batches = reference
    workdir, seen, final = chain
    assert seen["two_processes"] == [(FIRST_STOP, True)] * 2  # process 1's SIGTERM stops both at one step
    # The checkpoint is written once, collectively: one step, one state, a data state per process.
    assert seen["checkpoints"] == [str(FIRST_STOP)]
    assert seen["data"] == ["process_0-of-2.json", "process_1-of-2.json"]
    # Each process read only its own block of every global batch: the reference's rows there.
    for p in range(2):
        assert seen["yielded_two"][p] == _rows_of(ref_batches[:FIRST_STOP], p, 2)
    # 2 -> 1 process: the data goes on where the two left it (no example repeated or skipped).
    assert seen["one_process"] == (SECOND_STOP, True)
    assert seen["yielded_one"] == ref_batches[FIRST_STOP:SECOND_STOP]
    # Every segment's losses are the 1-process run's; metrics.jsonl has one record a step (process 0's).
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == list(range(1, 7))
    _assert_losses(losses(workdir), ref_losses, range(1, 7))
    # 1 -> 2 processes through the CLI; its retrieval evaluation at the end ran on both processes (6
    # held-out images each, padded to 2 batches of 4) and equals the reference's, on both.
    assert [(o["step"], o["preempted"]) for o in final] == [(6, False)] * 2
    recall = [k for k in ref_out if k.startswith(("t2i_", "i2t_"))]
    assert len(recall) == 6
    for o in final:
        assert {k: o[k] for k in recall} == {k: ref_out[k] for k in recall}


def test_two_process_checkpoint_resumes_on_another_mesh(shapes_dir, reference, chain, tmp_path):
    """The 2 processes x 4 devices (data=8) step-2 checkpoint on 1 process x 8 devices, fsdp=4 x data=2."""
    _, _, ref_losses, ref_batches = reference
    shutil.copytree(chain[1]["step_2_copy"], tmp_path, dirs_exist_ok=True)
    cfg = worker.config(shapes_dir, evaluate=False)
    cfg.mesh.update(data=2, fsdp=4)
    out = worker.train(cfg, str(tmp_path), "0")
    assert out["step"] == 6
    _assert_losses(losses(tmp_path), ref_losses, range(FIRST_STOP + 1, 7))
    assert worker.recorded(str(tmp_path), "0") == ref_batches[FIRST_STOP:]


def test_captioning_evaluation_on_two_processes_equals_one(shapes_dir, tokenizer_dir, tmp_path):
    """Stage 2's captioning evaluation on 2 processes (each its 6 images, padded to 2 batches of 4) gives
    the metrics of 1 process x 8 devices, every image captioned once."""
    expected = worker.caption_metrics(shapes_dir, tokenizer_dir("opt"))
    assert expected["num_images"] == 12
    port = _free_port()
    outs = _run_processes([[sys.executable, "-m", "tests.multiprocess_worker", *_process_flags(port, i),
                            f"--shapes_dir={shapes_dir}", f"--workdir={tmp_path}",
                            f"--caption_with_tokenizer={tokenizer_dir('opt')}"] for i in range(2)])
    for out in outs:
        assert json.loads(out.strip().splitlines()[-1]) == expected
