"""The speed benchmarks at tiny sizes, so that they never rot: each runs as its command does and prints its
JSON line, and what it compares is the same computation on both sides (equal step-0 losses, identical
tokens). The timings themselves are not asserted: a 2-core CI machine shares its cores."""
import json
import os
import subprocess
import sys

import jax
import pytest

from tests.helpers import subprocess_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags(), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": REPO}
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


def test_stage1_step_benchmark_compares_equal_steps_with_the_torch_reference():
    """benchmarks/stage1_step.py at tiny size: our stage-1 step and the torch reference (HF retrieval model +
    ITG head + LAVIS's losses) agree at step 0 on the total and on each of ITC, ITM and ITG (the torch side
    takes our hard negatives there; with others its ITM loss differs by ~3e-4 relative)."""
    (out,) = _run("stage1_step.py", "--size=tiny", "--rounds=2", "--threads=1")
    assert (out["benchmark"], out["size"]) == ("stage1_train_step", "tiny")
    ours, theirs = out["loss_step0"]["ours"], out["loss_step0"]["torch"]
    for part in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        assert ours[part] == pytest.approx(theirs[part], rel=1e-5), part
    assert ours["loss"] == pytest.approx(ours["loss_itc"] + ours["loss_itm"] + ours["loss_itg"], rel=1e-6)
    _check_timings(out)


def test_generate_benchmark_decodes_the_same_tokens_as_hf():
    outs = _run("generate.py", "--size=small", "--max_new_tokens=4", "--beams=3", "--repeats=1", "--batch=2")
    assert [o["decoding"] for o in outs] == ["greedy", "beam3"]
    for out in outs:
        assert out["token_agreement"] == 1.0
        _check_timings(out)


def test_accelerator_benchmark_runs_the_loops_step_and_picks_the_largest_batch_that_fits(hf_blip2, monkeypatch):
    """benchmarks/accelerator.py on the 8 simulated CPU devices with the tiny stage-2 config: the real step runs,
    images/s and MFU follow from the step time, and `--batch=auto` keeps the largest doubling of the
    batch whose compiled peak fits the device memory (a limit set between the peaks of batches 8 and 16)."""
    from benchmarks import accelerator
    from tests import tiny_configs

    config = tiny_configs.stage2("opt")
    config.init.llm_checkpoint = hf_blip2("opt")[2]  # the architecture (and weights) of a tiny OPT
    config = accelerator.planning_config(config)
    out = accelerator.run(config, "8", steps=1, peak=1e12)
    assert out["devices"] == 8 and out["global_batch"] == 8 and out["loss_finite"]
    assert out["images_per_second"] == pytest.approx(8 / out["step_seconds"])
    assert out["mfu"] == pytest.approx(out["images_per_second"] * out["flops_per_example"] / 8e12)
    assert out["flops_per_example"] > 0 and out["peak_bytes_per_device"] > 0

    mesh = accelerator.sharding.make_mesh(config.mesh, accelerator.jax.local_devices())
    peak8, peak16 = (accelerator.compile_step(config, mesh, b)[3] for b in (8, 16))
    assert peak16 > peak8
    monkeypatch.setattr(accelerator, "memory_limit",
                        lambda device: int((peak8 + peak16) / 2 / accelerator.MEMORY_HEADROOM))
    assert accelerator.run(config, "auto", steps=1)["global_batch"] == 8


def test_profile_step_splits_the_step_time_by_model_part(hf_blip2):
    """benchmarks/profile_step.py on the tiny stage-2 config: every part of a stage-2 step shows up (the frozen
    ViT forward only, the LLM forward and its backward to the queries, the Q-Former both ways, AdamW) and
    the shares add up to 1."""
    from benchmarks import profile_step
    from tests import tiny_configs

    assert profile_step.part_of("jit(step)/jvp(Blip2OPT)/vit_features/vision/layers_0/attn/dot_general") == "vision"
    assert profile_step.part_of("jit(step)/transpose(jvp(language_model))/layers_3/fc1/dot_general") == "llm"
    assert profile_step.part_of("jit(step)/sqrt") == "optimizer"
    assert profile_step.part_of("jit(step)/transpose(jvp(Blip2OPT.image_embeds))/ln_vision/mul") == "qformer"
    config = tiny_configs.stage2("opt")
    config.mesh.data = 1  # one device: a tiny step on 8 simulated devices is mostly its gradient all-reduce
    config.init.llm_checkpoint = hf_blip2("opt")[2]
    out = profile_step.profile(config, batch=8, steps=1, devices=jax.local_devices()[:1])
    shares = out["shares"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    for part in ("vision/forward", "llm/forward", "llm/backward", "qformer/forward", "qformer/backward",
                 "optimizer"):
        assert shares.get(part, 0) > 0, (part, shares)
    assert shares.get("vision/backward", 0) < 0.01  # frozen: no gradient is computed through the ViT


@pytest.mark.parametrize("case", ["stage1", "stage1_bfloat16", "stage2_opt_bfloat16", "stage2_t5"])
def test_accelerator_torch_benchmark_runs_the_reference_step_with_our_flop_count(case, hf_blip2, shapes_dir):
    """benchmarks/accelerator_torch.py on the CPU with the tiny configs: the torch reference's step runs at the
    config's shapes (frozen towers in bfloat16 where the config says so), its loss is finite, and images/s
    and MFU follow from the step time and our task's FLOPs per example (the figure accelerator.py uses)."""
    from benchmarks import accelerator_torch
    from blip2_jax import sharding
    from blip2_jax.plan import planning_config
    from blip2_jax.train import stage1, stage2
    from tests import tiny_configs

    if case.startswith("stage1"):
        config = tiny_configs.stage1(shapes_dir)
    else:
        llm = case.split("_")[1]
        config = tiny_configs.stage2(llm)
        config.init.llm_checkpoint = hf_blip2(llm)[2]  # the architecture of a tiny OPT / T5
    config.model.frozen_dtype = "bfloat16" if case.endswith("bfloat16") else "float32"
    out = accelerator_torch.run(config, batch=4, steps=1, device="cpu", peak=1e12, threads=1)
    assert out["fits"] and out["loss_finite"] and out["implementation"] == "torch"
    assert (out["global_batch"], out["frozen_dtype"]) == (4, config.model.frozen_dtype)
    assert out["images_per_second"] == pytest.approx(4 / out["step_seconds"])
    assert out["mfu"] == pytest.approx(out["images_per_second"] * out["flops_per_example"] / 1e12)
    planned = planning_config(config)
    mesh = sharding.make_mesh(planned.mesh, jax.devices()[:1])
    task = (stage1 if case.startswith("stage1") else stage2).make_task(planned, mesh)
    assert out["flops_per_example"] == pytest.approx(task.flops_per_example)


def test_accelerator_torch_benchmark_refuses_what_the_reference_cannot_express(shapes_dir):
    from benchmarks import accelerator_torch
    from tests import tiny_configs

    config = tiny_configs.stage1(shapes_dir)
    config.model.train_vision = True
    with pytest.raises(ValueError, match="train_vision"):
        accelerator_torch.run(config, batch=2, steps=1, device="cpu")
