"""Losses of blip2_jax.train.losses against independent torch/numpy reimplementations of LAVIS/HF."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip2_jax.train import losses

RTOL, ATOL = 2e-5, 2e-6


def _normalised(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# cross_entropy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_torch(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (4, 7))
    targets[0, :3] = -100
    targets[2, 5] = -100
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=smoothing)
    want = F.cross_entropy(
        torch.tensor(logits, dtype=torch.float64).reshape(-1, 11),
        torch.tensor(targets).reshape(-1),
        label_smoothing=smoothing,
        ignore_index=-100,
    )
    np.testing.assert_allclose(float(got), want.item(), rtol=RTOL, atol=ATOL)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    got = losses.cross_entropy(jnp.ones((2, 3, 5)), jnp.full((2, 3), -100))
    assert float(got) == 0.0


def test_soft_cross_entropy_matches_formula():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 6)).astype(np.float32)
    t = rng.random((5, 6)).astype(np.float32)
    t /= t.sum(1, keepdims=True)
    lt = torch.tensor(logits, dtype=torch.float64)
    want = -(F.log_softmax(lt, 1) * torch.tensor(t, dtype=torch.float64)).sum(1).mean()
    got = losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(t))
    np.testing.assert_allclose(float(got), want.item(), rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# ITC
# ------------------------------------------------------------------------------------------------
def test_itc_similarities_is_max_over_queries():
    rng = np.random.default_rng(2)
    img, txt = _normalised(rng, 5, 3, 8), _normalised(rng, 5, 8)
    sim_i2t, sim_t2i = losses.itc_similarities(jnp.asarray(img), jnp.asarray(txt))
    want = np.array([[max(img[i, q] @ txt[t] for q in range(3)) for t in range(5)] for i in range(5)])
    np.testing.assert_allclose(np.asarray(sim_i2t), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sim_t2i), want.T, rtol=1e-5, atol=1e-6)


def _lavis_rank_loss(img_local, txt_local, img_all, txt_all, temp, rank, ids_local=None, ids_all=None):
    """LAVIS blip2_qformer ITC for one rank (torch), given the 'gathered' features."""
    sim_q2t = torch.matmul(img_local.unsqueeze(1), txt_all.unsqueeze(-1)).squeeze(-1)
    sim_i2t = sim_q2t.max(-1)[0] / temp
    sim_t2q = torch.matmul(txt_local.unsqueeze(1).unsqueeze(1), img_all.permute(0, 2, 1)).squeeze(-2)
    sim_t2i = sim_t2q.max(-1)[0] / temp
    bs = img_local.shape[0]
    if ids_local is not None:
        pos = torch.eq(ids_local.view(-1, 1), ids_all.view(1, -1)).double()
        tgt = pos / pos.sum(1, keepdim=True)
        tgt = 0.9 * tgt + 0.1 * torch.ones_like(tgt) / tgt.size(1)
        lt2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * tgt, dim=1).mean()
        li2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * tgt, dim=1).mean()
        return (lt2i + li2t) / 2
    targets = torch.arange(rank * bs, rank * bs + bs)
    return (
        F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)
    ) / 2


def _torch_ddp_itc(img, txt, temp, world, keep_local_grad, ids=None):
    """Simulates `world` DDP ranks: per-rank loss, gathered features detached (the local slot too
    unless keep_local_grad), grads averaged over ranks as DDP does. Returns (mean loss, grads)."""
    img_t = torch.tensor(img, dtype=torch.float64, requires_grad=True)
    txt_t = torch.tensor(txt, dtype=torch.float64, requires_grad=True)
    temp_t = torch.tensor(temp, dtype=torch.float64, requires_grad=True)
    ids_t = None if ids is None else torch.tensor(ids)
    bs = img.shape[0] // world
    total = 0.0
    for r in range(world):
        sl = slice(r * bs, (r + 1) * bs)

        def gather(x):
            parts = [x[k * bs:(k + 1) * bs] for k in range(world)]
            return torch.cat([p if (k == r and keep_local_grad) else p.detach() for k, p in enumerate(parts)])

        loss_r = _lavis_rank_loss(
            img_t[sl], txt_t[sl], gather(img_t), gather(txt_t), temp_t, r,
            None if ids_t is None else ids_t[sl], ids_t,
        )
        (loss_r / world).backward()  # DDP: average of per-rank gradients
        total += loss_r.item() / world
    return total, img_t.grad.numpy(), txt_t.grad.numpy(), temp_t.grad.item()


def _jax_itc(img, txt, temp, **kw):
    fn = jax.jit(jax.value_and_grad(
        lambda a, b, t: losses.itc_loss(a, b, t, **kw), argnums=(0, 1, 2)))
    val, (gi, gt, gtemp) = fn(jnp.asarray(img), jnp.asarray(txt), jnp.float32(temp))
    return float(val), np.asarray(gi), np.asarray(gt), float(gtemp)


@pytest.fixture(scope="module")
def itc_inputs():
    rng = np.random.default_rng(3)
    return _normalised(rng, 8, 4, 16), _normalised(rng, 8, 16), 0.07


def _assert_same(jax_out, torch_out):
    val, gi, gt, gtemp = jax_out
    tval, tgi, tgt, tgtemp = torch_out
    np.testing.assert_allclose(val, tval, rtol=RTOL)
    np.testing.assert_allclose(gi, tgi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gt, tgt, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gtemp, tgtemp, rtol=1e-4)


def test_itc_full_gradient_matches_single_process_torch(itc_inputs):
    img, txt, temp = itc_inputs
    # One process, nothing detached: the plain mathematical gradient.
    _assert_same(_jax_itc(img, txt, temp), _torch_ddp_itc(img, txt, temp, 1, keep_local_grad=True))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_itc_detach_other_side_matches_lavis_for_any_world_size(itc_inputs, world):
    img, txt, temp = itc_inputs
    _assert_same(
        _jax_itc(img, txt, temp, detach_other_side=True),
        _torch_ddp_itc(img, txt, temp, world, keep_local_grad=False),
    )


def test_itc_value_independent_of_gradient_convention_and_grads_differ(itc_inputs):
    img, txt, temp = itc_inputs
    full, detached = (_jax_itc(img, txt, temp, detach_other_side=d) for d in (False, True))
    assert detached[0] == pytest.approx(full[0], rel=1e-6)
    # The conventions are genuinely different gradients (the test above is not vacuous).
    assert not np.allclose(full[1], detached[1], rtol=1e-3)


def test_itc_value_matches_lavis_formula_with_temp(itc_inputs):
    img, txt, _ = itc_inputs
    for temp in (0.07, 0.5):
        got = float(losses.itc_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(temp)))
        want, *_ = _torch_ddp_itc(img, txt, temp, 1, keep_local_grad=True)
        np.testing.assert_allclose(got, want, rtol=RTOL)


def test_itc_image_ids_soft_targets_match_lavis(itc_inputs):
    img, txt, temp = itc_inputs
    ids = np.array([3, 3, 7, 1, 7, 7, 9, 3])
    for world in (1, 2):
        _assert_same(
            _jax_itc(img, txt, temp, image_ids=jnp.asarray(ids), detach_other_side=True),
            _torch_ddp_itc(img, txt, temp, world, keep_local_grad=False, ids=ids),
        )


def test_itc_unique_image_ids_equal_hard_targets(itc_inputs):
    img, txt, temp = itc_inputs
    a = losses.itc_loss(jnp.asarray(img), jnp.asarray(txt), temp)
    b = losses.itc_loss(jnp.asarray(img), jnp.asarray(txt), temp, image_ids=jnp.arange(8) * 5)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_itc_on_sharded_global_batch_equals_unsharded(itc_inputs):
    img, txt, temp = itc_inputs
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    img_s, txt_s = jax.device_put(img, shard), jax.device_put(txt, shard)
    fn = jax.jit(lambda a, b: losses.itc_loss(a, b, temp))
    np.testing.assert_allclose(
        float(fn(img_s, txt_s)), float(fn(jnp.asarray(img), jnp.asarray(txt))), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# ITM hard negatives
# ------------------------------------------------------------------------------------------------
def _draw(sim_i2t, sim_t2i, n, image_ids=None):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    fn = jax.jit(jax.vmap(lambda k: losses.itm_hard_negatives(sim_i2t, sim_t2i, k, image_ids=image_ids)))
    neg_img, neg_txt = fn(keys)
    return np.asarray(neg_img), np.asarray(neg_txt)


def _lavis_weights(sim, mask):
    """LAVIS: positives filled with -10000, then softmax (torch)."""
    s = torch.tensor(np.asarray(sim), dtype=torch.float64).masked_fill(torch.tensor(np.asarray(mask)), -10000)
    return F.softmax(s, dim=1).numpy()


def _chi_square_ok(draws, probs):
    """Pearson chi-square per row over the columns with positive probability; a 1e-6-level bound."""
    n = draws.shape[0]
    for row in range(probs.shape[0]):
        counts = np.bincount(draws[:, row], minlength=probs.shape[1])
        support = probs[row] > 0
        assert counts[~support].sum() == 0, f"row {row} drew a zero-probability column"
        exp = n * probs[row, support]
        chi2 = ((counts[support] - exp) ** 2 / exp).sum()
        dof = support.sum() - 1
        # mean dof, sd sqrt(2 dof): 6 sd above the mean is a ~1e-6 false-alarm rate.
        assert chi2 < dof + 6 * math.sqrt(2 * dof) + 6, (row, chi2, dof)


def test_itm_hard_negatives_follow_lavis_softmax_and_skip_diagonal():
    rng = np.random.default_rng(4)
    sim = rng.standard_normal((6, 6)).astype(np.float32) * 1.5
    sim_t2i = sim.T + rng.standard_normal((6, 6)).astype(np.float32) * 0.3  # not exactly the transpose
    neg_img, neg_txt = _draw(jnp.asarray(sim), jnp.asarray(sim_t2i), 30000)
    assert neg_img.dtype == np.int32 and neg_img.shape == (30000, 6)
    eye = np.eye(6, dtype=bool)
    assert not np.any(neg_img == np.arange(6)) and not np.any(neg_txt == np.arange(6))
    _chi_square_ok(neg_img, _lavis_weights(sim_t2i, eye))
    _chi_square_ok(neg_txt, _lavis_weights(sim, eye))


def test_itm_hard_negatives_chi_square_detects_a_wrong_distribution():
    # Guards the statistical test itself: uniform weights must be rejected for peaked sims.
    sim = np.diag(np.zeros(6)) + np.arange(6)[None, :] * 1.0
    neg_img, _ = _draw(jnp.asarray(sim), jnp.asarray(sim), 20000)
    uniform = (1 - np.eye(6)) / 5
    with pytest.raises(AssertionError):
        _chi_square_ok(neg_img, uniform)


def test_itm_hard_negatives_exclude_same_image_ids():
    rng = np.random.default_rng(5)
    sim = rng.standard_normal((6, 6)).astype(np.float32)
    ids = np.array([0, 0, 1, 2, 2, 2])
    neg_img, neg_txt = _draw(jnp.asarray(sim), jnp.asarray(sim.T), 20000, image_ids=jnp.asarray(ids))
    same = ids[:, None] == ids[None, :]
    assert not np.any(ids[neg_img] == ids[None, :])
    assert not np.any(ids[neg_txt] == ids[None, :])
    _chi_square_ok(neg_img, _lavis_weights(sim.T, same))
    _chi_square_ok(neg_txt, _lavis_weights(sim, same))


def test_itm_hard_negatives_degenerate_rows_fall_back_to_other_rows():
    sim = np.random.default_rng(6).standard_normal((4, 4)).astype(np.float32) * 5
    # Every caption of the batch is from one image: no true negative exists.
    neg_img, neg_txt = _draw(jnp.asarray(sim), jnp.asarray(sim.T), 8000, image_ids=jnp.zeros(4, jnp.int32))
    off_diag_uniform = (1 - np.eye(4)) / 3
    for draws in (neg_img, neg_txt):
        assert not np.any(draws == np.arange(4))
        _chi_square_ok(draws, off_diag_uniform)
    # Mixed: ids [0, 0, 0, 1] -> rows 0..2 only have column 3; row 3 samples among 0..2.
    ids = jnp.asarray([0, 0, 0, 1])
    neg_img, _ = _draw(jnp.asarray(sim), jnp.asarray(sim.T), 2000, image_ids=ids)
    assert np.all(neg_img[:, :3] == 3) and np.all(neg_img[:, 3] < 3)
    # B == 1: the only index is the row itself.
    one = jnp.zeros((1, 1))
    a, b = losses.itm_hard_negatives(one, one, jax.random.PRNGKey(1))
    assert int(a[0]) == 0 and int(b[0]) == 0


def test_itm_hard_negatives_safe_for_huge_logits():
    # With an unclamped temperature |sim/temp| can approach 1e4; positives must still never win.
    sim = np.full((3, 3), -2e4, np.float32)
    np.fill_diagonal(sim, 5e4)
    neg_img, neg_txt = _draw(jnp.asarray(sim), jnp.asarray(sim), 500)
    assert not np.any(neg_img == np.arange(3)) and not np.any(neg_txt == np.arange(3))


def test_itm_hard_negatives_stop_gradient():
    sim = jnp.asarray(np.random.default_rng(7).standard_normal((4, 4)), jnp.float32)

    def f(s):
        ni, nt = losses.itm_hard_negatives(s, s.T, jax.random.PRNGKey(0))
        return jnp.sum(jnp.take(s, ni, axis=0) * 0) + jnp.sum(ni.astype(jnp.float32))

    assert np.all(np.asarray(jax.grad(f)(sim)) == 0)


# ------------------------------------------------------------------------------------------------
# ITM batch, loss, accuracy
# ------------------------------------------------------------------------------------------------
def test_itm_batch_lavis_order_on_pytrees():
    b = 4
    ids = np.arange(b * 3).reshape(b, 3)
    mask = np.arange(b * 3).reshape(b, 3) % 2
    images = np.arange(b * 2 * 5, dtype=np.float32).reshape(b, 2, 5)
    neg_img = np.array([2, 0, 3, 1])
    neg_txt = np.array([1, 3, 0, 2])
    (ids3, mask3), img3, labels = losses.itm_batch(
        (jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(images), jnp.asarray(neg_img), jnp.asarray(neg_txt))
    np.testing.assert_array_equal(ids3, np.concatenate([ids, ids, ids[neg_txt]]))
    np.testing.assert_array_equal(mask3, np.concatenate([mask, mask, mask[neg_txt]]))
    np.testing.assert_array_equal(img3, np.concatenate([images, images[neg_img], images]))
    np.testing.assert_array_equal(labels, [1] * b + [0] * (2 * b))


def test_itm_loss_and_accuracy():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((9, 2)).astype(np.float32)
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0])
    want = F.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels)).item()
    np.testing.assert_allclose(float(losses.itm_loss(jnp.asarray(logits), jnp.asarray(labels))), want, rtol=RTOL)
    acc = float(losses.itm_accuracy(jnp.asarray(logits), jnp.asarray(labels)))
    assert acc == pytest.approx(np.mean(logits.argmax(1) == labels))
    hand = jnp.asarray([[0.0, 1.0], [2.0, 1.0], [0.0, -1.0]])
    assert float(losses.itm_accuracy(hand, jnp.asarray([1, 1, 0]))) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------
# ITG and LM losses
# ------------------------------------------------------------------------------------------------
def test_itg_loss_matches_torch_shifted_smoothed_ce():
    rng = np.random.default_rng(9)
    B, T, V = 3, 6, 13
    logits = rng.standard_normal((B, T, V)).astype(np.float32) * 2
    ids = rng.integers(1, V, (B, T))
    att = np.ones((B, T), np.int64)
    att[0, 4:] = 0
    att[2, 2:] = 0
    ids[att == 0] = 0  # [PAD]
    labels = torch.tensor(ids).masked_fill(torch.tensor(att) == 0, -100)
    want = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(
        torch.tensor(logits, dtype=torch.float64)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    got = losses.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(att))
    np.testing.assert_allclose(float(got), want.item(), rtol=RTOL)
    # The last real token's prediction of padding must not count: changing padded logits is a no-op.
    logits2 = logits.copy()
    logits2[0, 4:] += 100.0
    got2 = losses.itg_loss(jnp.asarray(logits2), jnp.asarray(ids), jnp.asarray(att))
    np.testing.assert_allclose(float(got2), float(got), rtol=1e-6)


def test_lm_loss_matches_hf_external_loss():
    rng = np.random.default_rng(10)
    B, Qn, T, V = 2, 3, 5, 17
    logits = rng.standard_normal((B, Qn + T, V)).astype(np.float32)
    labels = rng.integers(0, V, (B, T))
    labels[0, :2] = -100
    labels[1, 4] = -100
    # HF Blip2ForConditionalGeneration: logits[:, -labels.size(1):], shift, CE(mean), no smoothing.
    lt = torch.tensor(logits, dtype=torch.float64)[:, -T:, :]
    want = torch.nn.CrossEntropyLoss(reduction="mean")(
        lt[:, :-1].reshape(-1, V), torch.tensor(labels)[:, 1:].reshape(-1))
    got = losses.lm_loss(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(got), want.item(), rtol=RTOL)
    got_aligned = losses.lm_loss(jnp.asarray(logits[:, Qn:]), jnp.asarray(labels))
    np.testing.assert_allclose(float(got_aligned), want.item(), rtol=RTOL)
