"""BLIP-2 training losses as pure, jit-able JAX functions.

Everything here works on GLOBAL arrays: under `jax.jit` with sharded inputs the batch axis is the
whole global batch and XLA inserts whatever collectives a gather or a reduction needs, so no
function takes a mesh or calls a collective itself. All losses are computed in float32 whatever
the input dtype.

Shapes use B = global batch, Q = query tokens, E = embedding width, T = text length, V = vocab.

Semantics follow LAVIS `blip2_qformer.py` (see shared/reference/blip2-reference.md, section 1) and
Hugging Face `Blip2ForConditionalGeneration` for the stage-2 LM loss.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100
PyTree = Any


# ----------------------------------------------------------------------------------------------
# Cross-entropy
# ----------------------------------------------------------------------------------------------
def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Mean cross-entropy over non-ignored positions, as `torch.nn.functional.cross_entropy`.

    Args:
      logits: [..., C] unnormalised scores.
      targets: [...] integer class ids; positions equal to `ignore_index` are left out.
      label_smoothing: ε; the per-position loss is `(1-ε)·(-log p_target) + ε·mean_c(-log p_c)`,
        torch's definition (the smoothing mass ε/C also lands on the target class).
      ignore_index: target value that marks a position to ignore.

    Returns:
      Scalar float32: sum of per-position losses / number of non-ignored positions. Where every
      position is ignored torch returns NaN; this returns 0 (the count is clamped to 1), so a batch
      of pure padding does not poison a training run.
    """
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = targets != ignore_index
    safe_targets = jnp.where(valid, targets, 0)
    nll = -jnp.take_along_axis(logp, safe_targets[..., None], axis=-1)[..., 0]
    per_position = nll
    if label_smoothing:
        smooth = -jnp.mean(logp, axis=-1)
        per_position = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    per_position = jnp.where(valid, per_position, 0.0)
    count = jnp.maximum(jnp.sum(valid), 1)
    return jnp.sum(per_position) / count


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """Mean over rows of `-Σ_c target_c · log_softmax(logits)_c`.

    Args:
      logits: [N, C]; target_probs: [N, C], each row a distribution (not checked).
    Returns:
      Scalar float32.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(target_probs.astype(jnp.float32) * logp, axis=-1))


# ----------------------------------------------------------------------------------------------
# ITC: image-text contrastive
# ----------------------------------------------------------------------------------------------
def _max_query_sim(image_feats: jax.Array, text_feats: jax.Array) -> jax.Array:
    """[B_img, Q, E] x [B_txt, E] -> [B_img, B_txt]: max over queries of the dot product."""
    # HIGHEST: B*B*Q*E is small, and TF32/bf16 passes would blur similarities that a small
    # temperature multiplies by ~14.
    sim_q = jnp.einsum(
        "iqe,te->itq",
        image_feats.astype(jnp.float32),
        text_feats.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.max(sim_q, axis=-1)


def itc_similarities(image_feats: jax.Array, text_feats: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image-text similarities as LAVIS's ITC computes them, without the temperature.

    Args:
      image_feats: [B, Q, E] per-query image features, already L2-normalised per query.
      text_feats: [B, E] [CLS] text features, already L2-normalised.

    Returns:
      (sim_i2t [B, B], sim_t2i [B, B]) with `sim_i2t[i, t] = max_q <image_feats[i, q], text_feats[t]>`
      and `sim_t2i = sim_i2t.T` (rows are texts). Float32.
    """
    sim_i2t = _max_query_sim(image_feats, text_feats)
    return sim_i2t, sim_i2t.T


def itc_targets(batch: int, *, label_smoothing: float, image_ids: Optional[jax.Array]) -> jax.Array:
    """[B, B] soft ITC targets.

    Without `image_ids`: `(1-ε)·I + ε/B`, which makes the soft CE equal to torch's
    `cross_entropy(sim, arange(B), label_smoothing=ε)`.
    With `image_ids` [B] (LAVIS COCO retrieval fine-tuning): positives are all pairs with the same
    image id, normalised per row, then `(1-ε)·pos/|pos| + ε/B` (LAVIS hard-codes ε = 0.1 there).
    """
    if image_ids is None:
        pos = jnp.eye(batch, dtype=jnp.float32)
    else:
        ids = jnp.reshape(image_ids, (-1,))
        pos = (ids[:, None] == ids[None, :]).astype(jnp.float32)
        pos = pos / jnp.sum(pos, axis=1, keepdims=True)
    return (1.0 - label_smoothing) * pos + label_smoothing / batch


def itc_loss(
    image_feats: jax.Array,
    text_feats: jax.Array,
    temp: jax.Array,
    *,
    label_smoothing: float = 0.1,
    image_ids: Optional[jax.Array] = None,
    detach_other_side: bool = False,
) -> jax.Array:
    """Symmetric image-text contrastive loss over the global batch (LAVIS ITC).

    `loss = (CE(sim_i2t / temp) + CE(sim_t2i / temp)) / 2`, each a mean over the B rows, with
    in-batch negatives from the whole global batch and label smoothing ε (soft targets over all
    same-image pairs when `image_ids` is given; see `itc_targets`).

    Gradient conventions (the loss VALUE is the same for both):
      - default (`detach_other_side=False`): full gradients, the single-process mathematical
        gradient of the loss.
      - `detach_other_side=True`: the "other" side (the text side for i2t, the image side for t2i)
        carries no gradient in any entry. This is exactly LAVIS: its `concat_all_gather` (under
        `torch.no_grad`) returns freshly gathered buffers, so even the local rank's slot has no
        gradient. Combined with DDP's gradient averaging and per-rank mean losses, the result does
        not depend on the number of GPUs.

    Args:
      image_feats: [B, Q, E] L2-normalised per-query image features.
      text_feats: [B, E] L2-normalised text features.
      temp: scalar temperature (learnable; no clamp here, as in BLIP-2).
      label_smoothing: ε (LAVIS: 0.1).
      image_ids: optional [B] ints; pairs sharing an id are all positives.
      detach_other_side: see above.

    Returns:
      Scalar float32 loss.
    """
    batch = text_feats.shape[0]
    if detach_other_side:
        sg = jax.lax.stop_gradient
        sim_i2t = _max_query_sim(image_feats, sg(text_feats))
        sim_t2i = _max_query_sim(sg(image_feats), text_feats).T
    else:
        sim_i2t, sim_t2i = itc_similarities(image_feats, text_feats)
    temp = jnp.asarray(temp, jnp.float32)
    targets = itc_targets(batch, label_smoothing=label_smoothing, image_ids=image_ids)
    loss_i2t = soft_cross_entropy(sim_i2t / temp, targets)
    loss_t2i = soft_cross_entropy(sim_t2i / temp, targets)
    return (loss_i2t + loss_t2i) / 2


# ----------------------------------------------------------------------------------------------
# ITM: image-text matching with hard negatives
# ----------------------------------------------------------------------------------------------
def itm_positive_mask(batch: int, image_ids: Optional[jax.Array] = None) -> jax.Array:
    """[B, B] bool: which (row, column) pairs are positives (diagonal, or same image id)."""
    if image_ids is None:
        return jnp.eye(batch, dtype=bool)
    ids = jnp.reshape(image_ids, (-1,))
    return ids[:, None] == ids[None, :]


def _sample_negatives(logits: jax.Array, positive: jax.Array, rng: jax.Array) -> jax.Array:
    """One column per row from softmax(logits) restricted to the non-positive columns."""
    batch = logits.shape[0]
    has_negative = jnp.any(~positive, axis=1, keepdims=True)
    # Degenerate rows (every column a positive, e.g. all captions of one image): draw uniformly
    # among the columns other than the row's own index, i.e. a same-image caption/image labelled
    # "no match" rather than the very pair labelled "match" (LAVIS would draw uniformly over all
    # columns, the diagonal included). With B == 1 the only column is the row itself.
    fallback = ~jnp.eye(batch, dtype=bool) if batch > 1 else jnp.ones((1, 1), bool)
    allowed = jnp.where(has_negative, ~positive, fallback)
    logits = jnp.where(has_negative, logits.astype(jnp.float32), 0.0)
    # -inf rather than LAVIS's -10000: identical distribution whenever LAVIS's positives have
    # negligible mass, and never a positive even if an unclamped temperature makes |sim/temp|
    # comparable to 1e4.
    logits = jnp.where(allowed, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1)


def itm_hard_negatives(
    sim_i2t: jax.Array,
    sim_t2i: jax.Array,
    rng: jax.Array,
    *,
    image_ids: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """Hard negatives for ITM, sampled from the softmax of the similarities (LAVIS).

    Args:
      sim_i2t: [B, B] temperature-scaled image-to-text similarities (rows are images).
      sim_t2i: [B, B] temperature-scaled text-to-image similarities (rows are texts).
      rng: PRNG key.
      image_ids: optional [B]; when given every pair with the same image id counts as a positive
        (LAVIS COCO fine-tuning), otherwise only the diagonal (LAVIS pretraining).

    Returns:
      (neg_image_idx [B]: for each text, the index of its negative image,
       neg_text_idx [B]: for each image, the index of its negative text), int32 global indices.
      Column j of row b is drawn with probability softmax(sim[b])_j renormalised over the
      non-positive columns (= LAVIS's softmax with positives filled with -10000). A row with no
      non-positive column draws uniformly among the other rows' indices (see `_sample_negatives`).
      The similarities are stop-gradient'ed.
    """
    sim_i2t = jax.lax.stop_gradient(sim_i2t)
    sim_t2i = jax.lax.stop_gradient(sim_t2i)
    positive = itm_positive_mask(sim_t2i.shape[0], image_ids)
    rng_t2i, rng_i2t = jax.random.split(rng)
    neg_image_idx = _sample_negatives(sim_t2i, positive, rng_t2i)
    neg_text_idx = _sample_negatives(sim_i2t, positive.T, rng_i2t)
    return neg_image_idx.astype(jnp.int32), neg_text_idx.astype(jnp.int32)


def itm_batch(
    texts: PyTree,
    images: PyTree,
    neg_image_idx: jax.Array,
    neg_text_idx: jax.Array,
) -> tuple[PyTree, PyTree, jax.Array]:
    """Builds the 3B-row ITM batch in LAVIS order.

    Args:
      texts: pytree of arrays with leading axis B (e.g. `(input_ids, attention_mask)`).
      images: pytree of arrays with leading axis B (e.g. frozen-ViT features [B, P, D]).
      neg_image_idx: [B] negative image for each text; neg_text_idx: [B] negative text per image.

    Returns:
      (texts_3b, images_3b, labels [3B] int32) with texts `[pos, pos, neg]`, images
      `[pos, neg, pos]` and labels `[1]*B + [0]*2B`. Gathers keep gradients (LAVIS gathers the
      image embeddings with `all_gather_with_grad`).
    """
    def cat(pos, neg_idx, order):
        neg = jnp.take(pos, neg_idx, axis=0)
        return jnp.concatenate([pos, neg, pos] if order == "image" else [pos, pos, neg], axis=0)

    texts_3b = jax.tree_util.tree_map(lambda x: cat(x, neg_text_idx, "text"), texts)
    images_3b = jax.tree_util.tree_map(lambda x: cat(x, neg_image_idx, "image"), images)
    batch = neg_image_idx.shape[0]
    labels = jnp.concatenate([jnp.ones(batch, jnp.int32), jnp.zeros(2 * batch, jnp.int32)])
    return texts_3b, images_3b, labels


def itm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Plain cross-entropy of the ITM logits [3B, 2] against labels [3B] (no smoothing)."""
    return cross_entropy(logits, labels)


def itm_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose argmax over the 2 ITM classes equals the label."""
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# Language modelling
# ----------------------------------------------------------------------------------------------
def itg_loss(
    logits: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    label_smoothing: float = 0.1,
) -> jax.Array:
    """Stage-1 image-grounded text generation loss (LAVIS ITG).

    Args:
      logits: [B, T, V] LM-head scores at each text position of the decoder pass.
      input_ids: [B, T] decoder input ids ([DEC] first); the labels are these ids.
      attention_mask: [B, T]; padding (0) is ignored.
      label_smoothing: ε (LAVIS: 0.1).

    Returns:
      Scalar: CE of `logits[:, :-1]` against `labels[:, 1:]`, mean over non-ignored tokens.
    """
    labels = jnp.where(attention_mask == 0, IGNORE_INDEX, input_ids)
    return cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing=label_smoothing)


def lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Stage-2 causal LM loss, as Hugging Face `Blip2ForConditionalGeneration` computes it.

    Args:
      logits: [B, T', V] with T' >= T; only the last T positions are used (HF slices
        `logits[:, -labels.shape[1]:]`, e.g. to drop the query-token positions).
      labels: [B, T] target ids, -100 where ignored (prompt, padding, queries).

    Returns:
      Scalar: CE of `logits[:, :-1]` against `labels[:, 1:]`, mean over non-ignored tokens,
      no label smoothing.
    """
    logits = logits[:, logits.shape[1] - labels.shape[1]:]
    return cross_entropy(logits[:, :-1], labels[:, 1:])
