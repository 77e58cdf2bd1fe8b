"""Schedules against hand computations, the weight-decay mask, and AdamW's update."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from blip2_jax import config_sections
from blip2_jax.train import optimizer


def _cfg(**kw):
    c = dict(schedule="warmup_cosine", peak_lr=1e-4, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=10,
             steps_per_epoch=0, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, grad_clip_norm=0.0)
    c.update(kw)
    return ml_collections.ConfigDict(c)


def test_warmup_cosine_matches_hand_computation():
    sched = optimizer.make_schedule(_cfg(), total_steps=110)
    hand = {
        0: 1e-6,
        5: 1e-6 + (1e-4 - 1e-6) * 5 / 10,
        10: 1e-4,                                           # end of warmup: peak
        35: 1e-5 + 0.9e-4 * 0.5 * (1 + math.cos(math.pi * 25 / 100)),
        60: 1e-5 + 0.9e-4 * 0.5,                           # halfway through the cosine
        110: 1e-5,                                          # the end: min_lr
        500: 1e-5,                                          # past the end: stays at min_lr
    }
    for step, want in hand.items():
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, err_msg=f"step {step}")


@pytest.mark.parametrize("warmup,total", [(10, 110), (0, 50), (20, 20), (2000, 10)])
def test_warmup_cosine_every_step_matches_formula(warmup, total):
    """optax's schedule is the module docstring's formula at every step, past the end included, to
    float32 rounding (2 ulp of peak_lr); a run no longer than its warmup still warms up."""
    peak, warm, low = 1e-4, 1e-6, 1e-5
    sched = optimizer.make_schedule(_cfg(warmup_steps=warmup), total_steps=total)
    decay = max(total - warmup, 1)
    for s in range(max(total, warmup) + 50):
        if s < warmup:
            want = warm + (peak - warm) * s / warmup
        else:
            want = low + (peak - low) * 0.5 * (1 + math.cos(math.pi * min(s - warmup, decay) / decay))
        got = sched(jnp.int32(s))
        assert got.dtype == jnp.float32
        assert abs(float(got) - want) <= 2.4e-7 * peak, f"step {s}: {float(got)} != {want}"


def test_lavis_epoch_cosine_matches_hand_computation():
    # 4 epochs of 25 steps, warmup of 10 steps inside epoch 0
    sched = optimizer.make_schedule(_cfg(schedule="lavis_epoch_cosine", steps_per_epoch=25),
                                    total_steps=100)
    cos = lambda e: 1e-5 + 0.9e-4 * 0.5 * (1 + math.cos(math.pi * e / 4))
    hand = {0: 1e-6, 4: 1e-6 + (1e-4 - 1e-6) * 0.4, 10: 1e-4, 24: 1e-4,  # epoch 0 after warmup: peak
            25: cos(1), 49: cos(1), 50: cos(2), 99: cos(3)}
    for step, want in hand.items():
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, err_msg=f"step {step}")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optimizer.make_schedule(_cfg(schedule="lavis_epoch_cosine"), total_steps=100)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="optimizer.schedule='linear'"):
        optimizer.make_schedule(_cfg(schedule="linear"), 10)


def _params():
    return {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
            "ln": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
            "query_tokens": jnp.ones((1, 2, 4)), "temp": jnp.ones(()),
            "conv": {"bias": jnp.ones((2, 2))}}


def test_decay_mask_covers_exactly_the_multi_dim_weights():
    mask = optimizer.decay_mask(_params())
    assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False, "bias": False},
                    "query_tokens": True, "temp": False, "conv": {"bias": False}}


def test_adamw_first_step_matches_hand_computation():
    """One AdamW step: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p * mask)."""
    cfg = _cfg(schedule="constant", peak_lr=0.1, grad_clip_norm=0.5)
    tx, _ = optimizer.make_optimizer(cfg, total_steps=10)
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    n = sum(x.size for x in jax.tree.leaves(params))
    g = 0.3 * min(1.0, 0.5 / (0.3 * math.sqrt(n)))           # clipped by global norm
    adam = g / (abs(g) + 1e-8)                                # m_hat/sqrt(v_hat) at step 1
    mask = optimizer.decay_mask(params)
    for (u, p, m) in zip(jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(mask)):
        want = -0.1 * (adam + (0.05 * np.asarray(p) if m else 0.0))
        np.testing.assert_allclose(np.asarray(u), np.broadcast_to(want, u.shape), rtol=1e-5)
    assert int(optimizer.update_count(state)) == 1


def test_vit_layer_decay_scales_each_block_as_lavis():
    """LAVIS `get_optimizer_params` + EVA `get_num_layer` with L=3 blocks and decay 0.9: embeddings
    lr * 0.9**4, block i lr * 0.9**(3 - i), other ViT leaves lr * 0.9; outside the ViT lr. Checked on
    the actual update (SGD-like: AdamW's first step moves every leaf by -lr * sign(g))."""
    ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    params = {"vision": {"embeddings": {"patch_kernel": ones(2, 2)}, "layers_0": {"fc1": {"kernel": ones(2, 2)}},
                         "layers_1": {"fc1": {"kernel": ones(2, 2)}}, "layers_2": {"fc1": {"kernel": ones(2, 2)}},
                         "post": {"scale": ones(2)}},
              "qformer": {"kernel": ones(2, 2)}}
    want = {("vision", "embeddings", "patch_kernel"): 0.9 ** 4, ("vision", "layers_0", "fc1", "kernel"): 0.9 ** 3,
            ("vision", "layers_1", "fc1", "kernel"): 0.9 ** 2, ("vision", "layers_2", "fc1", "kernel"): 0.9,
            ("vision", "post", "scale"): 0.9, ("qformer", "kernel"): 1.0}
    scales = flatten_dict(optimizer.vit_layer_scales(params, 0.9))
    assert scales == pytest.approx(want, rel=1e-12)

    cfg = config_sections.loop_config().optimizer
    cfg.update(schedule="constant", peak_lr=1e-3, weight_decay=0.0, vit_layer_decay=0.9)
    tx, _ = optimizer.make_optimizer(cfg, total_steps=10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in flatten_dict(updates).items():
        np.testing.assert_allclose(np.asarray(u), -1e-3 * want[path], rtol=1e-5, err_msg="/".join(path))
    cfg.vit_layer_decay = 1.0  # off: every leaf at lr
    tx, _ = optimizer.make_optimizer(cfg, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    for u in jax.tree.leaves(updates):
        np.testing.assert_allclose(np.asarray(u), -1e-3, rtol=1e-5)
