"""The three BLIP-2 Q-Former masks, and the ITG pass over cached query keys/values."""
import numpy as np
import jax
import jax.numpy as jnp

from blip2_jax.models.blip2 import Blip2Config, Blip2Stage1
from blip2_jax.models.qformer import QFormerConfig, attention_mask
from blip2_jax.models.vit import VisionConfig

NQ = 3
TEXT_MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])  # 4 text slots, padding at the end


def expected(kind, row_mask):
    """Written out by position: who may attend to whom, for one example."""
    t = len(row_mask)
    n = NQ + t
    out = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            i_query, j_query = i < NQ, j < NQ
            j_valid = j_query or row_mask[j - NQ] == 1
            if kind == "bidirectional":
                ok = True
            elif kind == "unimodal":
                ok = i_query == j_query
            else:  # multimodal causal: queries see queries; text sees all queries and earlier text
                ok = j_query if i_query else (j_query or j <= i)
            out[i, j] = ok and j_valid
    return out


def test_masks_let_exactly_the_intended_positions_see_each_other():
    for kind in ("bidirectional", "unimodal", "causal"):
        got = np.asarray(attention_mask(kind, NQ, jnp.asarray(TEXT_MASK)))
        for b in range(2):
            np.testing.assert_array_equal(got[b], expected(kind, TEXT_MASK[b]), err_msg=kind)


def tiny_model():
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=16, patch_size=8)
    qformer = QFormerConfig(hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24, vocab_size=30,
                            max_position_embeddings=16, encoder_hidden_size=16, num_query_tokens=NQ,
                            cross_attention_frequency=2)
    return Blip2Stage1(Blip2Config(vision=vision, qformer=qformer, num_query_tokens=NQ, image_text_hidden_size=8))


def test_itg_over_cached_query_kv_equals_one_causal_pass():
    model = tiny_model()
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    ids = rng.integers(1, 30, size=(2, 4))
    mask = jnp.asarray(TEXT_MASK)
    params = model.init(jax.random.PRNGKey(0), pixels, ids, mask)["params"]
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)

    def cached(m):
        embeds = m.image_embeds(m.vit_features(pixels))
        _, _, kvs = m.image_features(embeds)
        return m.itg_logits(ids, mask, kvs)

    def one_pass(m):
        embeds = m.image_embeds(m.vit_features(pixels))
        queries = jnp.broadcast_to(m.query_tokens, (2, NQ, 16))
        hidden, _ = m.qformer(query_embeds=queries, input_ids=ids, self_mask=attention_mask("causal", NQ, mask),
                              image_embeds=embeds)
        h = jax.nn.gelu(m.lm_transform(hidden[:, NQ:]), approximate=False)
        return m.qformer.attend_word_embeddings(m.lm_transform_ln(h)) + m.lm_bias

    a = model.apply({"params": params}, method=cached)
    b = model.apply({"params": params}, method=one_pass)
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], rtol=1e-5, atol=1e-5)
    # The text really sees the image: other pixels change the ITG logits.
    c = model.apply({"params": params}, method=lambda m: m.itg_logits(
        ids, mask, m.image_features(m.image_embeds(m.vit_features(pixels[::-1])))[2]))
    assert np.abs(np.asarray(c) - np.asarray(a))[valid].max() > 1e-3
