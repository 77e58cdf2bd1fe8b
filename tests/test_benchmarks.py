"""The speed benchmarks at tiny sizes, so that they never rot: each runs as its command does and prints its
JSON line, and what it compares is the same computation on both sides (equal step-0 losses, identical
tokens). The timings themselves are not asserted: a 2-core CI machine shares its cores."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def _check_timings(out: dict) -> None:
    assert out["ours_s"] > 0 and out["theirs_s"] > 0
    assert out["ratio"] == pytest.approx(out["theirs_s"] / out["ours_s"])
    assert 0 <= out["clean_rounds"] <= out["rounds"]


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_train_step_benchmark_compares_equal_steps(llm):
    (out,) = _run("train_step.py", "--size=tiny", f"--llm={llm}", "--rounds=2", "--threads=1")
    assert (out["benchmark"], out["llm"], out["baseline"]) == ("stage2_train_step", llm, "hf")
    assert out["loss_step0"]["ours"] == pytest.approx(out["loss_step0"]["hf"], rel=1e-5)
    _check_timings(out)


def test_train_step_benchmark_bfloat16_against_our_float32():
    (out,) = _run("train_step.py", "--size=tiny", "--frozen_dtype=bfloat16", "--baseline=ours_float32",
                  "--rounds=2")
    losses = out["loss_step0"]
    assert losses["ours"] == pytest.approx(losses["ours_float32"], rel=3e-2)
    _check_timings(out)


def test_generate_benchmark_decodes_the_same_tokens_as_hf():
    outs = _run("generate.py", "--size=small", "--max_new_tokens=4", "--beams=3", "--repeats=1", "--batch=2")
    assert [o["decoding"] for o in outs] == ["greedy", "beam3"]
    for out in outs:
        assert out["token_agreement"] == 1.0
        _check_timings(out)
