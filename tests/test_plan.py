"""The TPU planner (`python -m blip2_jax.plan`): the demo configs compiled for a 4-chip TPU v5p slice by
the real TPU compiler (libtpu), no TPU and no weights; the per-device bytes checked against the
parameter trees. Skipped when libtpu is not installed (`pip install -r requirements-tpu.txt`;
`launch/setup.sh --test` installs it)."""
import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from blip2_jax import plan, sharding
from blip2_jax.train import aot, stage1, stage2
from configs import stage1 as stage1_config
from configs import stage2 as stage2_config
from configs import text_lm as text_lm_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -r requirements-tpu.txt): "
                                         "no TPU compiler to plan with")
TOPOLOGY = "v5p:2x2x1"  # 4 chips, one host
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def training_precision():
    """Plan what training compiles: JAX's default matmul precision (conftest sets "highest" for the
    numerics tests, which makes the TPU compiler emulate float32 matmuls in several passes)."""
    with jax.default_matmul_precision(None):
        yield


def demo_stage2(llm: str, **mesh):
    """`configs/stage2.py:demo_<llm>`, scanned, its tiny LLM described by the text LM demo's HF fields."""
    config = stage2_config.get_config(f"demo_{llm}")
    config.model.text = dict(text_lm_config.get_config(f"demo_{llm}").model.text, vocab_size=64)
    config.model.scan_layers = True
    config.mesh.update(mesh)
    return config


@needs_libtpu
@pytest.mark.parametrize("llm", ["opt", pytest.param("t5", marks=pytest.mark.slow)])
def test_stage2_demo_plan_has_the_shard_sizes_of_the_param_trees(llm):
    config = demo_stage2(llm, data=1, fsdp=4, tensor=1)
    report = plan.plan(config, TOPOLOGY)
    b = report["per_device_bytes"]
    assert report["topology"] == TOPOLOGY and report["devices"] == 4 and report["fits"] is True
    assert report["hbm_bytes"] == 95 * 2 ** 30 and report["compile_seconds"] > 0
    # What the train loop would place on one device: the same config's trees created on 4 CPU devices.
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    task = stage2.make_task(plan.planning_config(config), mesh)
    rules = sharding.axis_rules(())
    trainable, _ = sharding.create_sharded(task.init_trainable, jax.random.PRNGKey(0), mesh, rules)
    frozen, _ = sharding.create_sharded(task.init_frozen, jax.random.PRNGKey(1), mesh, rules)
    on_one = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert b["trainable"] == on_one(trainable) < 4 * aot.count(trainable)  # fsdp=4 splits the embed dims
    assert b["frozen"] == on_one(frozen)
    assert 2 * b["trainable"] <= b["optimizer"] <= 2 * b["trainable"] + 64  # Adam's mu, nu (+ its counters)
    assert b["peak"] >= b["frozen"] + b["trainable"] + b["optimizer"] + b["temporaries"] > 0
    decode = report["decode"]
    assert decode["batch"] == config.eval.batch_size and 0 < decode["temporaries"] < decode["peak"]
    assert 0 < report["model_flops_per_device"] and 0 < report["compiler_flops_per_device"]
    assert report["step_seconds_estimate"]["lower_bound"] > 0


@needs_libtpu
@pytest.mark.slow  # the stage-1 step compiles for ~40 s of CPU; the stage-2 test covers the planner's code
def test_stage1_demo_plan_replicated_holds_every_parameter_on_each_chip():
    config = stage1_config.get_config("demo")
    config.mesh.update(data=4, fsdp=1, tensor=1)
    report = plan.plan(config, TOPOLOGY)
    b, params = report["per_device_bytes"], report["params"]
    assert report["fits"] is True and report["decode"] is None
    assert b["trainable"] == 4 * params["trainable"] and b["frozen"] == 4 * params["frozen"]  # float32
    # The parameter count, independently: the stage-1 demo's trainable tree by eval_shape.
    task = stage1.make_task(plan.planning_config(config), sharding.make_mesh(config.mesh, jax.devices()[:4]))
    assert params["trainable"] == aot.count(jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0)))


def _lowered_text(config) -> str:
    """The train step `config` lowers to for the 4-chip slice (StableHLO), as the planner lowers it."""
    config = plan.planning_config(config)
    mesh = sharding.make_mesh(config.mesh, plan.topology_devices(TOPOLOGY))
    task = (stage1 if config.task == "stage1" else stage2).make_task(config, mesh)
    return aot.lower_train_step(config, task, mesh).lowered.as_text()


@needs_libtpu
@pytest.mark.parametrize("demo", ["stage2_opt", pytest.param("stage2_t5", marks=pytest.mark.slow),
                                  pytest.param("stage1", marks=pytest.mark.slow)])
def test_demo_plans_compile_with_the_pallas_attention_kernel(demo):
    """`model.attention_impl="pallas"`: libtpu compiles the Mosaic flash-attention kernels of every tower's
    attention (forward, and the backward's dK/dV and dQ kernels of the trained towers) in the train step,
    and stage 2's decode step; the lowered step holds them as TPU custom calls."""
    if demo == "stage1":
        config = stage1_config.get_config("demo")
        config.mesh.update(data=4, fsdp=1, tensor=1)
    else:
        config = demo_stage2(demo.split("_")[1], data=1, fsdp=4, tensor=1)
    config.model.attention_impl = "pallas"
    assert _lowered_text(config).count("tpu_custom_call") >= 3
    report = plan.plan(config, TOPOLOGY)
    assert report["fits"] is True and report["per_device_bytes"]["peak"] > 0
    assert (report["decode"] is None) == (demo == "stage1")


def test_bad_topology_is_one_error_line():
    """An unknown chip generation: one `error:` line naming the value, exit status 2 (no libtpu needed)."""
    out = subprocess.run([sys.executable, "-m", "blip2_jax.plan", "--config=configs/stage1.py:demo",
                          "--topology=v7:2x2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --topology=v7:2x2:"), out.stderr


@needs_libtpu
@pytest.mark.parametrize("topology, mesh, message", [
    ("v5p:3x3x3", dict(data=-1), "v5p:3x3x3"),                  # libtpu refuses the shape
    (TOPOLOGY, dict(data=2, fsdp=1, tensor=1), "4 chips"),      # the mesh does not cover the slice
])
def test_plan_errors_name_the_value(topology, mesh, message):
    config = stage1_config.get_config("demo")
    config.mesh.update(mesh)
    with pytest.raises(plan.PlanError, match=message):
        plan.plan(config, topology)


@needs_libtpu
@pytest.mark.slow  # one more stage-2 compile (~30 s on 2 cores); tests/test_quant_train.py checks the trees
def test_int8_stage2_demo_plan_holds_the_int8_frozen_tree():
    """`model.frozen_dtype="int8"`: the plan's frozen bytes are those of the int8 tree the loop creates (int8
    values sharded like the weights, float32 scales like their output channels), under 60% of bfloat16's
    per chip (not 50%: at these tiny widths the scales of the matrices whose output axis is not sharded,
    replicated on every chip, are a visible share)."""
    config = demo_stage2("opt", data=1, fsdp=4, tensor=1)
    config.model.frozen_dtype = "int8"
    report = plan.plan(config, TOPOLOGY, decode=False)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    task = stage2.make_task(plan.planning_config(config), mesh)
    frozen, _ = sharding.create_sharded(task.init_frozen, jax.random.PRNGKey(1), mesh, sharding.axis_rules(()))
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jax.numpy.dtype(t) for t in ("int8", "float32", "bfloat16")}
    assert report["per_device_bytes"]["frozen"] == sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(frozen))
    config.model.frozen_dtype = "bfloat16"
    bf16 = jax.eval_shape(stage2.make_task(plan.planning_config(config), mesh).init_frozen, jax.random.PRNGKey(1))
    bf16_per_chip = aot.per_device_bytes(sharding.abstract_with_shardings(
        bf16, sharding.logical_shardings(bf16, mesh, sharding.axis_rules(()))))
    assert report["per_device_bytes"]["frozen"] < 0.6 * bf16_per_chip


@pytest.mark.parametrize("module, variant", [(stage1_config, v) for v in stage1_config.PLANNED]
                         + [(stage2_config, v) for v in stage2_config.PLANNED])
def test_planned_variants_split_the_paper_batch_over_their_slice(module, variant):
    """Each `<variant>_v5p32` keeps the paper's global batch and splits every micro-batch evenly over the
    16 chips of a v5p-32 (the rows of docs/pod_planning.md were planned with these settings)."""
    config, paper = module.get_config(variant), module.get_config(module.PLANNED[variant][0])
    assert config.train.batch_size == config.data.global_batch_size == paper.train.batch_size
    mesh = config.mesh
    assert mesh.data * mesh.fsdp * mesh.tensor == 16
    assert (config.train.batch_size // config.train.grad_accum_steps) % (mesh.data * mesh.fsdp) == 0


def test_the_known_libtpu_crashes_are_error_lines_not_segfaults():
    config = stage2_config.get_config("flant5xl")
    config.mesh.update(data=8, fsdp=1, tensor=2)
    with pytest.raises(plan.PlanError, match="mesh.tensor=1"):
        plan.planning_config(config)
    config = stage2_config.get_config("flant5xxl_v5p32")
    config.train.grad_accum_steps = 5
    with pytest.raises(plan.PlanError, match="grad_accum_steps=1"):
        plan.planning_config(config)
    config.model.llm_dropout = False  # what the error suggests: then it plans
    assert plan.planning_config(config).train.grad_accum_steps == 5


def test_the_planner_and_main_import_into_one_process():
    """`blip2_jax.plan` defines its flags only when run as a program: importing it next to
    `blip2_jax.main` (whose `--config` lives in the same absl registry) must not clash."""
    import importlib

    importlib.import_module("blip2_jax.main")
    assert callable(plan.plan) and not hasattr(plan, "_CONFIG")
