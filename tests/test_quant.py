"""int8 weight-only quantisation of the frozen towers (`from_pretrained(..., frozen_dtype="int8")`):
the quantiser's error bound, per-row embedding lookups, scanned stacks, logits and greedy tokens
against float32 on the tiny HF BLIP-2 OPT, and the frozen memory against bfloat16 at paper scale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blip2_jax
from blip2_jax.models import quant
from blip2_jax.models.layers import Embed


def test_quantize_error_is_at_most_half_a_step_per_channel():
    w = np.random.default_rng(0).normal(size=(3, 16, 8)).astype(np.float32)  # a stacked [L, in, out] kernel
    q = quant.quantize(w, (1,))
    assert q.values.dtype == np.int8 and q.scale.shape == (3, 1, 8)
    np.testing.assert_allclose(q.scale, np.abs(w).max(axis=1, keepdims=True) / 127, rtol=1e-6)
    assert np.all(np.abs(np.asarray(q.astype(jnp.float32)) - w) <= q.scale / 2 + 1e-7)
    tree = quant.quantize_tree({"layers": {"kernel": w, "bias": w[0, 0]}, "emb": {"embedding": w[0]}})
    assert quant.is_quantized(tree["layers"]["kernel"]) and isinstance(tree["layers"]["bias"], np.ndarray)
    assert tree["emb"]["embedding"].scale.shape == (16, 1)  # one scale per row
    assert quant.tree_nbytes(tree) == quant.quantized_nbytes({"layers": {"kernel": w, "bias": w[0, 0]},
                                                              "emb": {"embedding": w[0]}})


def test_quantised_embedding_lookup_reads_each_rows_scale():
    table = np.random.default_rng(1).normal(size=(11, 6)).astype(np.float32) * np.arange(1, 12)[:, None]
    q = quant.quantize(table, (1,))
    ids = jnp.array([[3, 10, 0]])
    got = Embed(11, 6).apply({"params": {"embedding": jax.tree.map(jnp.asarray, q)}}, ids)
    np.testing.assert_allclose(got, np.asarray(q.astype(jnp.float32))[np.asarray(ids)], rtol=1e-6)


@pytest.fixture(scope="module")
def three_precisions(hf_blip2):
    _, path, _ = hf_blip2("opt")
    return {name: blip2_jax.from_pretrained(path, frozen_dtype=d)
            for name, d in (("float32", None), ("bfloat16", jnp.bfloat16), ("int8", "int8"))}


def test_int8_logits_and_greedy_tokens_against_float32(three_precisions):
    """Bound stated in the README: max |int8 - float32| <= 5% of max |float32| on these logits (bfloat16
    alone: ~2%); greedy tokens agree."""
    (m32, p32), (mbf, pbf), (m8, p8) = three_precisions.values()
    assert {type(x) for x in jax.tree.leaves(p8["language_model"], is_leaf=quant.is_quantized)} >= {quant.QuantizedArray}
    size = m32.config.vision.image_size
    rng = np.random.default_rng(0)
    px = rng.normal(size=(4, size, size, 3)).astype(np.float32)
    ids = rng.integers(4, m32.config.text.vocab_size, (4, 9))
    mask = np.ones_like(ids)
    ref = np.asarray(m32.apply({"params": p32}, px, ids, mask), np.float32)
    scale = np.abs(ref).max()
    err8 = np.abs(np.asarray(m8.apply({"params": p8}, px, ids, mask), np.float32) - ref).max() / scale
    errbf = np.abs(np.asarray(mbf.apply({"params": pbf}, px, ids, mask), np.float32) - ref).max() / scale
    assert err8 <= 0.05 and errbf <= 0.05, (err8, errbf)
    assert err8 > 0  # it is quantised
    g32 = blip2_jax.generate(m32, p32, px, ids[:, :3], mask[:, :3], max_new_tokens=8)
    g8 = blip2_jax.generate(m8, p8, px, ids[:, :3], mask[:, :3], max_new_tokens=8)
    assert np.mean(np.asarray(g32) == np.asarray(g8)) >= 0.9


def test_int8_frozen_memory_is_at_most_55_percent_of_bfloat16_at_paper_scale():
    """From shapes (nothing allocated): the frozen EVA ViT-g + OPT-2.7B of `configs/stage2.py:opt2.7b`."""
    from blip2_jax.models.blip2 import abstract_params
    from blip2_jax.spec import model as spec_model

    from tests.test_paper_scale_stage2 import OPT_2_7B, paper_config

    model = spec_model.model_of(paper_config("opt2.7b", OPT_2_7B))
    frozen = {k: v for k, v in abstract_params(model).items() if k in ("vision", "language_model")}
    bf16 = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(frozen))
    as_bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), frozen)
    ratio = quant.quantized_nbytes(as_bf16) / bf16
    assert 0.45 < ratio <= 0.55, ratio


def test_save_pretrained_of_an_int8_model_writes_float_weights(three_precisions, tmp_path):
    from tests.helpers import read_checkpoint

    m8, p8 = three_precisions["int8"]
    blip2_jax.save_pretrained(m8, p8, str(tmp_path / "out"))
    tensors, _ = read_checkpoint(str(tmp_path / "out"))
    key = next(k for k in tensors if k.startswith("language_model.") and k.endswith("fc1.weight"))
    assert tensors[key].dtype == np.float32
