"""`layers.Dropout` and `layers.dropout_mask`: flax's dropout bit for bit, the mask behind an optimization
barrier (so that the TPU compiler generates each mask's threefry code once instead of fusing it into
every consumer: docs/pod_planning.md, "Compile time")."""
import dataclasses

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from blip2_jax.models import layers
from blip2_jax.models import t5 as t5_model


class _Two(nn.Module):
    """Two dropouts of the given class, auto-named as a model's are."""
    cls: type

    @nn.compact
    def __call__(self, x):
        return self.cls(0.1)(x, deterministic=False), self.cls(0.3, broadcast_dims=(-2,))(x, deterministic=False)


def test_dropout_is_flax_dropout_bit_for_bit():
    x = jnp.arange(2 * 5 * 7, dtype=jnp.float32).reshape(2, 5, 7) + 1.0
    rngs = {"dropout": jax.random.PRNGKey(3)}
    ours, flax_ = _Two(layers.Dropout).apply({}, x, rngs=rngs), _Two(nn.Dropout).apply({}, x, rngs=rngs)
    for a, b in zip(ours, flax_):
        np.testing.assert_array_equal(a, b)
    grad = lambda cls: jax.grad(lambda x: jnp.sum(_Two(cls).apply({}, x, rngs=rngs)[0] ** 2))(x)  # noqa: E731
    np.testing.assert_array_equal(grad(layers.Dropout), grad(nn.Dropout))
    assert layers.Dropout(0.1).apply({}, x, deterministic=True) is x


def test_dropout_mask_is_bernoulli():
    key = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(layers.dropout_mask(key, 0.2, (3, 40)), jax.random.bernoulli(key, 0.8, (3, 40)))


def _primitives(jaxpr, counts):
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitives(sub, counts)
    return counts


def test_every_t5_dropout_mask_is_behind_a_barrier():
    """A T5 train step's masks: one optimization barrier per mask drawn (scanned and rematerialised)."""
    cfg = t5_model.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2,
                            num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.1)
    cfg = dataclasses.replace(cfg, scan_layers=True, remat=True)
    model = t5_model.T5ForConditionalGeneration(cfg)
    ids = jnp.ones((2, 5), jnp.int32)
    v = model.init(jax.random.key(0), input_ids=ids, decoder_input_ids=ids)

    def loss(v):
        logits = model.apply(v, input_ids=ids, decoder_input_ids=ids, deterministic=False,
                             rngs={"dropout": jax.random.key(1)})
        return jnp.mean(logits)

    counts = _primitives(jax.make_jaxpr(jax.grad(loss))(v).jaxpr, {})
    masks = counts.get("random_bits", 0)
    # encoder block 4, decoder block 6, each stack's input and output 2: 16 in the forward, drawn again by remat
    assert masks >= 16
    assert counts.get("optimization_barrier", 0) >= masks
