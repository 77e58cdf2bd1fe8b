"""`model.attention_impl="pallas"` (the Pallas TPU flash-attention kernel, `models/pallas_attention.py`)
against the einsum form, run on CPU in Pallas's TPU interpret mode: outputs and gradients (q, k, v and
an additive bias such as T5's relative bias), padded lengths, masks, grouped-query heads, several
blocks, a shard_map under a CPU mesh; whole BLIP-2 models (OPT and T5) in float32. `tests/test_plan.py` compiles the kernel for TPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import blip2_jax
from blip2_jax import sharding
from blip2_jax.models import layers, pallas_attention
from blip2_jax.models.blip2 import build_model
from tests.helpers import assert_close, blip2_call_args, with_attention_impl


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_len, heads, head_dim)).astype(np.float32)
    k, v = (rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    return rng, q, k, v


def _loss_and_grads(impl, q, k, v, bias, scale):
    """A non-linear loss of the attention output, its value and gradients wrt q, k, v and the bias."""
    def loss(q, k, v, bias):
        out = layers.dot_product_attention(q, k, v, bias, scale=scale, impl=impl)
        return jnp.sum(out * jnp.cos(out))
    with pltpu.force_tpu_interpret_mode():
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)


@pytest.mark.parametrize("q_len, kv_len, kv_heads, bias_kind, scale", [
    (5, 7, 4, "mask", None),       # one block each, both lengths padded (16, 128)
    (5, 7, 2, "relative", 1.0),    # grouped-query heads; T5: a trainable [1, H, Tq, Tk] bias, unscaled scores
    (140, 260, 2, "mask", None),   # several blocks (256 queries, 384 keys after padding)
], ids=["padded-mask", "gqa-t5-bias", "multi-block"])
def test_pallas_equals_einsum_attention_and_gradients(q_len, kv_len, kv_heads, bias_kind, scale):
    rng, q, k, v = _inputs(0, 2 if q_len < 128 else 1, q_len, kv_len, 4, kv_heads)
    if bias_kind == "mask":
        mask = rng.random((q.shape[0], 1, q_len, kv_len)) > 0.3
        mask[..., 0] = True
        bias = layers.mask_to_bias(mask)
    else:
        bias = rng.normal(size=(1, 4, q_len, kv_len)).astype(np.float32)
    (value, grads) = _loss_and_grads("pallas", q, k, v, bias, scale)
    (ref_value, ref_grads) = _loss_and_grads("xla", q, k, v, bias, scale)
    assert_close(value, ref_value, tol=1e-5)
    for name, g, ref in zip("q k v bias".split(), grads, ref_grads):
        assert g.shape == ref.shape, name
        assert_close(g, ref, tol=1e-5)


def test_pallas_without_bias_masks_the_padded_keys():
    """No bias: the padded keys are masked by the kernel's segment ids alone."""
    _, q, k, v = _inputs(1, 2, 3, 9, 2, 2)
    with pltpu.force_tpu_interpret_mode():
        out = layers.dot_product_attention(q, k, v, impl="pallas")
    assert_close(out, layers.dot_product_attention(q, k, v), tol=1e-5)


@pytest.mark.parametrize("batch", [4, 3], ids=["split", "replicated-batch"])
def test_pallas_under_a_mesh_is_a_shard_map_over_batch_and_heads(batch):
    """Under `jax.set_mesh` (as the train step runs) the kernel runs per shard: batch over data x fsdp, heads
    over tensor, by the logical axis rules; a batch the mesh does not divide is replicated."""
    rng, q, k, v = _inputs(3, batch, 6, 10, 4, 2)
    bias = layers.mask_to_bias(rng.random((batch, 1, 6, 10)) > 0.2)
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    attend = jax.jit(lambda q, k, v, b: layers.dot_product_attention(q, k, v, b, impl="pallas"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.axis_rules()), pltpu.force_tpu_interpret_mode():
        assert "shard_map" in str(jax.make_jaxpr(attend)(q, k, v, bias))
        out = attend(q, k, v, bias)
    assert_close(out, layers.dot_product_attention(q, k, v, bias), tol=1e-5)


def test_pallas_with_attention_dropout_takes_the_einsum_form():
    """The kernel has no dropout: a training call with attention dropout is the einsum form, same draws."""
    _, q, k, v = _inputs(2, 1, 4, 4, 2, 2)
    kw = dict(dropout_rate=0.5, deterministic=False, dropout_rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(layers.dot_product_attention(q, k, v, impl="pallas", **kw),
                                  layers.dot_product_attention(q, k, v, **kw))


@pytest.mark.parametrize("q_shape, k_shape, message", [
    ((1, 4, 2, 200), (1, 4, 2, 200), "head_dim 200"),
    ((1, 4, 3, 8), (1, 4, 2, 8), "3 query heads"),
    ((1, 4, 2, 8), (1, 4, 2, 16), "head dims q 8, k 16"),
])
def test_pallas_refuses_what_the_kernel_cannot_take(q_shape, k_shape, message):
    with pytest.raises(ValueError, match=message):
        layers.dot_product_attention(np.zeros(q_shape, np.float32), np.zeros(k_shape, np.float32),
                                     np.zeros(k_shape, np.float32), impl="pallas")


def test_padded_lengths_and_block_sizes():
    assert pallas_attention.padded_lengths(1, 40) == (16, 128)      # a decoding step
    assert pallas_attention.padded_lengths(257, 257) == (384, 384)  # the ViT's patches + CLS
    sizes = pallas_attention.block_sizes(384, 512)
    assert (sizes.block_q, sizes.block_k, sizes.block_q_dq, sizes.block_k_dkv) == (128, 512, 128, 512)


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_blip2_logits_equal_with_pallas_attention(hf_blip2, llm):
    _, path, _ = hf_blip2(llm)
    model, params = blip2_jax.from_pretrained(path)
    args = blip2_call_args(model, llm)
    ref = model.apply({"params": params}, *args)
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(build_model(with_attention_impl(model.config, "pallas")).apply)({"params": params}, *args)
    # T5's tiny random model amplifies float32 rounding: any one tower's attention through "fused" alone
    # moves its logits (max 6.1) by 5-6e-5, the kernel in each tower by 3-5e-5; all three together 1.5e-4.
    assert_close(out, ref, tol=1e-5 if llm == "opt" else 5e-5)
