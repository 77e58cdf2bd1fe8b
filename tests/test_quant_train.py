"""int8 frozen towers in the train loop (`model.frozen_dtype="int8"`): the stage-2 frozen tree loaded from
the tiny HF BLIP-2 OPT is int8 (values) + float32 (scales) within half a step of the float32 tree, the
step-0 loss within a stated bound of the float32 run from the same weights, an 8-device FSDP run trains
with finite losses and its scales sharded like the output channels they scale, the frozen bytes at the
stage-2 demo's sizes, and the config checks."""
import dataclasses

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict as flatten

from blip2_jax import config_validation, workdir
from blip2_jax import sharding as sharding_lib
from blip2_jax.evaluate import load as load_lib
from blip2_jax.models import quant
from blip2_jax.spec import model as spec
from blip2_jax.spec import weights
from blip2_jax.train import loop, stage2
from tests import tiny_configs
from tests.test_stage2 import _Batches, _batch, _config, _hf_loss, _hf_projection, _init_params
from tests.toy_task import compile_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("compile_cache")
# |step-0 loss (int8 frozen towers) - step-0 loss (float32)| on the tiny BLIP-2 OPT (measured: 5.5e-3;
# bfloat16 towers alone: 6.3e-4), in nats: 0.02 is 0.3% of the loss (5.9).
LOSS_BOUND = 0.02


@pytest.fixture(scope="module")
def opt_dirs(hf_blip2):
    hf, blip2_dir, llm_dir = hf_blip2("opt")
    return hf, blip2_dir, llm_dir


def test_int8_frozen_tree_and_step0_loss_against_float32(opt_dirs):
    """The float32 references: the checkpoints' tensors as read (numpy), and the step-0 loss of HF's float32
    model on the same weights and batch (which our float32 run matches to 1e-5: tests/test_stage2.py)."""
    hf, blip2_dir, llm_dir = opt_dirs
    config = _config("opt", blip2_dir, llm_dir)
    config.model.frozen_dtype = "int8"
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
    task = stage2.make_task(config, mesh)
    trainable, frozen, _ = _init_params(task, config, mesh)
    trainable = {**trainable, "language_projection": _hf_projection(hf)}
    batch = _batch("opt", hf, np.random.default_rng(0))
    with jax.set_mesh(mesh):
        loss8, _ = jax.jit(task.loss_fn, static_argnums=4)(trainable, frozen, batch, jax.random.PRNGKey(0), False)
    loss32 = _hf_loss("opt", hf, batch)
    cfg = spec.stage2_config(config)
    flat8 = flatten(frozen)
    flat32 = flatten({**weights.load_vision(blip2_dir, cfg), **weights.load_llm(llm_dir, cfg)})
    assert set(flat8) == set(flat32) and sorted(frozen) == ["language_model", "vision"]
    n_quantised = 0
    for path, leaf in flat8.items():
        if path[-1] in ("kernel", "embedding"):  # every matrix: int8 values, float32 per-channel scales
            assert quant.is_quantized(leaf), path
            assert leaf.values.dtype == jnp.int8 and leaf.scale.dtype == jnp.float32, path
            # within half a quantisation step of the float32 weight it was quantised from
            err = np.abs(np.asarray(leaf.astype(jnp.float32)) - flat32[path])
            assert np.all(err <= np.asarray(leaf.scale) / 2 + 1e-7), path
            n_quantised += 1
        else:  # biases, norms, position embeddings: bfloat16, the compute dtype
            assert leaf.dtype == jnp.bfloat16, path
    assert n_quantised >= 20
    print(f"step-0 loss: float32 (HF) {loss32:.6f}, int8 {float(loss8):.6f}, |diff| {abs(float(loss8) - loss32):.2e}")
    assert 0 < abs(float(loss8) - loss32) <= LOSS_BOUND, (float(loss8), loss32)


def test_int8_fsdp_run_on_8_devices_trains_and_keeps_the_frozen_int8_tree(opt_dirs, tokenizer_dir, tmp_path):
    hf, blip2_dir, llm_dir = opt_dirs
    config = _config("opt", blip2_dir, llm_dir, batch_size=8)
    config.model.frozen_dtype = "int8"
    config.train.update(total_steps=2, log_every=1, checkpoint_every=0, async_checkpointing=False)
    config.optimizer.update(peak_lr=1e-3, warmup_steps=1, warmup_lr=1e-3, min_lr=1e-3)
    config.mesh.update(data=1, fsdp=8)
    config_validation.validate(config, num_devices=8)
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:8])
    task = stage2.make_task(config, mesh)
    seen = {}

    def record(trainable, frozen, step):
        seen["frozen"] = frozen
        return {}

    out = loop.train(config, dataclasses.replace(task, evaluate=record), lambda: _Batches("opt", hf, 8),
                     str(tmp_path), mesh=mesh)
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert out["step"] == 2 and len(losses) == 2 and np.all(np.isfinite(losses)), losses
    # The scale of an FSDP-sharded matrix is sharded like the output channels it scales: the values'
    # spec with the reduced (input) axis replicated.
    scales_sharded = 0
    for path, leaf in flatten(seen["frozen"]).items():
        if not quant.is_quantized(leaf):
            continue
        assert leaf.values.dtype == jnp.int8, path
        spec_v, spec_s = leaf.values.sharding.spec, leaf.scale.sharding.spec
        axes = quant.scale_axes(leaf)
        for i in range(leaf.values.ndim):
            want = None if i in axes else (spec_v[i] if i < len(spec_v) else None)
            assert (spec_s[i] if i < len(spec_s) else None) == want, (path, spec_v, spec_s)
        scales_sharded += any(a is not None for a in spec_s)
    assert scales_sharded > 0
    # The workdir reloads the tree it trained against (the run config says int8), also through the loading
    # path of the evaluation CLI and the server (`--frozen_dtype=int8`).
    assert workdir.run_config(str(tmp_path)).model.frozen_dtype == "int8"
    params = load_lib.load_model(str(tmp_path), tokenizer=tokenizer_dir("opt"), frozen_dtype="int8").params
    reloaded = flatten({k: params[k] for k in ("vision", "language_model")})
    for path, leaf in flatten(seen["frozen"]).items():
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(reloaded[path]), jax.device_get(leaf))


def _demo_frozen_bytes(frozen_dtype: str) -> int:
    """Bytes of the frozen tree of `configs/stage2.py:demo_opt` (its LLM: the text LM demo's OPT, its
    384-token vocabulary), from abstract shapes."""
    config = tiny_configs.load("stage2", "demo_opt")
    config.model.text = dict(tiny_configs.load("text_lm", "demo_opt").model.text, vocab_size=384)
    config.init.llm_checkpoint = ""  # the LLM of model.text
    config.model.frozen_dtype = frozen_dtype
    _, init_frozen = spec.init_fns(config, spec.model_of(config))
    abstract = jax.eval_shape(init_frozen, jax.random.PRNGKey(0))
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(sharding_lib.unbox(abstract)))


def test_int8_frozen_bytes_are_at_most_55_percent_of_bfloat16_at_demo_size():
    ratio = _demo_frozen_bytes("int8") / _demo_frozen_bytes("bfloat16")
    print(f"stage-2 demo frozen bytes, int8 / bfloat16: {ratio:.4f}")
    assert 0.45 < ratio <= 0.55, ratio


def _frozen_kernels_are_int8(config) -> dict:
    """The abstract frozen tree `config`'s loop creates, after checking every matrix in it is int8."""
    _, init_frozen = spec.init_fns(config, spec.model_of(config))
    frozen = sharding_lib.unbox(jax.eval_shape(init_frozen, jax.random.PRNGKey(0)))
    kernels = [leaf for path, leaf in flatten(frozen).items() if path[-1] == "kernel"]
    assert kernels and all(quant.is_quantized(k) and k.values.dtype == jnp.int8 for k in kernels)
    return frozen


def test_config_checks_of_int8():
    stage1 = tiny_configs.stage1()
    stage1.model.frozen_dtype = "int8"  # stage 1: the frozen ViT int8 (its run: 3 steps' losses within 3e-4)
    config_validation.validate(stage1, num_devices=1)
    assert sorted(_frozen_kernels_are_int8(stage1)) == ["vision"]
    stage1.model.train_vision = True
    with pytest.raises(config_validation.ConfigError, match=r"model.frozen_dtype='int8' with model.train_vision"):
        config_validation.validate(stage1, num_devices=1)
    stage1.model.frozen_dtype = "int4"
    with pytest.raises(config_validation.ConfigError, match=r"model.frozen_dtype='int4': expected one of"):
        config_validation.validate(stage1, num_devices=1)
    # Stage 2 with a trained ViT keeps its LLM frozen: int8 quantises the LLM, the ViT trains in float32.
    stage2_config = tiny_configs.stage2("opt")
    stage2_config.model.update(frozen_dtype="int8", train_vision=True)
    stage2_config.model.text = dict(tiny_configs.load("text_lm", "demo_opt").model.text, vocab_size=64)
    config_validation.validate(stage2_config, num_devices=1)
    assert sorted(_frozen_kernels_are_int8(stage2_config)) == ["language_model"]
    init_trainable, _ = spec.init_fns(stage2_config, spec.model_of(stage2_config))
    vision = sharding_lib.unbox(jax.eval_shape(init_trainable, jax.random.PRNGKey(0)))["vision"]
    assert {x.dtype for x in jax.tree.leaves(vision)} == {jnp.dtype(jnp.float32)}
