"""T5 / FlanT5 parity against Hugging Face `T5ForConditionalGeneration` (torch, float32) on tiny random models."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from blip2_jax.convert import t5 as t5_convert
from blip2_jax.convert.hf_io import CheckpointReader
from flax.traverse_util import flatten_dict as flatten
from blip2_jax.models import t5 as t5_model
from blip2_jax.models.layers import take_batch_rows
from tests.helpers import (assert_bad_keys_listed, assert_close, assert_dropout_and_remat, random_params,
                           read_checkpoint, write_checkpoint)

CONFIGS = {
    # FlanT5 as BLIP-2 runs it: gated GELU with exact "gelu", its own lm_head, no output scaling.
    # Few buckets and a short max distance so that the logarithmic buckets are exercised.
    "gated_gelu_untied": dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                              num_heads=4, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                              relative_attention_num_buckets=8, relative_attention_max_distance=12,
                              tie_word_embeddings=False),
    # Original T5: relu FFN, head tied to `shared`, decoder output scaled by d_model**-0.5;
    # inner dim (heads * d_kv = 36) != d_model.
    "relu_tied_scaled": dict(vocab_size=87, d_model=48, d_kv=6, d_ff=64, num_layers=3, num_decoder_layers=2,
                             num_heads=6, feed_forward_proj="relu", tie_word_embeddings=True),
}


def _redraw(model: torch.nn.Module, seed: int, untie: bool) -> None:
    """Re-draw every weight so that each layer matters; give an untied model its own head.

    Linear weights get a variance-preserving spread (std fan_in**-0.5; `q` also d_kv**-0.5, since T5
    does not scale its scores), so every sublayer moves the residual stream by as much as it holds,
    while the bfloat16 comparison stays meaningful (with larger spreads HF's own bfloat16 run drifts
    by more than 3e-2 from its float32 run). Norm scales 1 +- 0.2, embeddings std 1, position bias 0.5.
    """
    g = torch.Generator().manual_seed(seed)
    if untie:  # transformers 5.x ties lm_head at construction; a FlanT5 file carries its own
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name == "shared.weight":
                p.copy_(noise)
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * noise)
            else:
                std = p.shape[1] ** -0.5 * (model.config.d_kv ** -0.5 if name.endswith(".q.weight") else 1.0)
                p.copy_(std * noise)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_t5(request, tmp_path_factory):
    kw = CONFIGS[request.param]
    cfg = transformers.T5Config(**kw, dropout_rate=0.0, attn_implementation="eager")
    assert cfg.dense_act_fn == kw.get("dense_act_fn", cfg.dense_act_fn)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    _redraw(model, seed=len(request.param), untie=not kw["tie_word_embeddings"])
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return model, path


def _inputs(vocab, batch=3, enc_len=13, dec_len=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(batch, enc_len))
    mask = np.ones((batch, enc_len), np.int64)
    mask[1, -4:] = 0  # right padding
    mask[2, :2] = 0  # left padding (T5's relative positions allow either)
    dec = rng.integers(2, vocab, size=(batch, dec_len))
    dec[:, 0] = 0  # decoder start token
    dec_mask = np.ones((batch, dec_len), np.int64)
    dec_mask[0, -3:] = 0
    return ids, mask, dec, dec_mask


def _hf(model, ids, mask, dec, dec_mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask))
    return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


def test_relative_position_buckets_match_hf():
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (8, 12), (16, 40)):
            ref = HFT5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance).numpy()
            ours = t5_model.relative_position_bucket(jnp.asarray(rel.numpy()), bidirectional, num_buckets,
                                                     max_distance)
            np.testing.assert_array_equal(np.asarray(ours), ref)


def test_parity_float32(hf_t5):
    model, path = hf_t5
    ids, mask, dec, dec_mask = _inputs(model.config.vocab_size)
    ref, ref_enc = _hf(model, ids, mask, dec, dec_mask)
    ours, params = t5_convert.load(path)
    cfg = ours.config
    assert cfg.scale_decoder_outputs == model.config.scale_decoder_outputs
    assert cfg.tie_word_embeddings == (model.lm_head.weight is model.shared.weight)
    assert cfg.dense_act_fn == model.config.dense_act_fn and cfg.is_gated_act == model.config.is_gated_act
    shapes = jax.eval_shape(lambda: ours.init(jax.random.key(0), input_ids=jnp.zeros((1, 3), jnp.int32),
                                              decoder_input_ids=jnp.zeros((1, 2), jnp.int32)))
    assert jax.tree.map(lambda s: s.shape, nn.unbox(shapes["params"])) == jax.tree.map(lambda x: x.shape, params)

    @jax.jit
    def run(params, ids, mask, dec, dec_mask):
        v = {"params": params}
        embeds = ours.apply(v, ids, method="embed")
        enc = ours.apply(v, embeds, mask, method="encode")
        logits, cache = ours.apply(v, dec, enc, mask, dec_mask, method="decode")
        assert cache is None
        return enc, logits, ours.apply(v, embeds, mask, dec, dec_mask)

    enc, logits, full = run(params, *map(jnp.asarray, (ids, mask, dec, dec_mask)))
    enc_err = assert_close(np.asarray(enc)[mask == 1], ref_enc[mask == 1])
    assert logits.dtype == jnp.float32 and logits.shape == ref.shape
    valid = dec_mask == 1
    err = assert_close(np.asarray(logits)[valid], ref[valid])
    np.testing.assert_allclose(np.asarray(full), np.asarray(logits), atol=1e-6, rtol=1e-6)
    print(f"T5 f32 max err logits {err:.2e} (max|HF| {np.abs(ref).max():.2f}), encoder {enc_err:.2e}")


def test_parity_bfloat16_keeps_wo_float32(hf_t5):
    model, path = hf_t5
    ids, mask, dec, dec_mask = _inputs(model.config.vocab_size, seed=1)
    ref, _ = _hf(model, ids, mask, dec, dec_mask)
    ours, params = t5_convert.load(path, dtype=jnp.bfloat16)
    for path_, x in flatten(params).items():
        assert x.dtype == (jnp.float32 if "wo" in path_ else jnp.bfloat16), path_
    # The module itself creates `wo` in float32 when the tower is bfloat16.
    init = jax.eval_shape(lambda: ours.init(jax.random.key(0), input_ids=jnp.zeros((1, 3), jnp.int32),
                                            decoder_input_ids=jnp.zeros((1, 2), jnp.int32)))
    init_dtypes = jax.tree.map(lambda s: s.dtype, nn.unbox(init["params"]))
    assert init_dtypes == jax.tree.map(lambda x: x.dtype, params)
    logits = jax.jit(ours.apply)({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                 decoder_input_ids=jnp.asarray(dec), decoder_attention_mask=jnp.asarray(dec_mask))
    assert logits.dtype == jnp.float32
    valid = dec_mask == 1
    err = assert_close(np.asarray(logits)[valid], ref[valid], tol=3e-2)
    print(f"T5 bf16 max err {err:.2e} (max|HF| {np.abs(ref).max():.2f})")


def test_incremental_decoding_matches_full_forward(hf_t5):
    """Cross K/V computed once; a 2-token prefill then one token at a time equals the full decoder pass."""
    model, path = hf_t5
    ours, params = t5_convert.load(path)
    ids, mask, dec, _ = _inputs(model.config.vocab_size, seed=2)
    dec_mask = np.ones_like(dec)
    @jax.jit
    def full_pass(params, ids, mask, dec):
        v = {"params": params}
        enc = ours.apply(v, ours.apply(v, ids, method="embed"), mask, method="encode")
        return enc, ours.apply(v, dec, enc, mask, method="decode")[0]

    enc, full = full_pass(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
    ref, _ = _hf(model, ids, mask, dec, dec_mask)

    first = jax.jit(lambda p, x, e, m, c: ours.apply({"params": p}, x, e, m, cache=c, method="decode"))
    step = jax.jit(lambda p, x, c: ours.apply({"params": p}, x, None, None, cache=c, method="decode"))
    cache = t5_model.init_cache(ours.config, ids.shape[0], max_len=10, dtype=jnp.float32)
    logits, cache = first(params, jnp.asarray(dec[:, :2]), enc, jnp.asarray(mask), cache)
    assert cache["cross"] is not None and len(cache["cross"]) == ours.config.num_decoder_layers
    pieces = [logits]
    for t in range(2, dec.shape[1]):
        logits, cache = step(params, jnp.asarray(dec[:, t:t + 1]), cache)
        pieces.append(logits)
    assert step._cache_size() == 1  # one compilation for every one-token step
    inc = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    np.testing.assert_allclose(inc, np.asarray(full), atol=1e-5, rtol=1e-5)
    assert_close(inc[dec_mask == 1], ref[dec_mask == 1])

    # Beam reordering (generate's take_batch_rows), cross-attention K/V included.
    order = jnp.array([1, 1, 0])
    _, c0 = first(params, jnp.asarray(dec[:, :2]), enc, jnp.asarray(mask),
                  t5_model.init_cache(ours.config, 3, 10, jnp.float32))
    c0 = take_batch_rows(c0, order)
    nxt, _ = step(params, jnp.asarray(dec[np.asarray(order), 2:3]), c0)
    np.testing.assert_allclose(np.asarray(nxt[:, 0]), np.asarray(full)[np.asarray(order), 2], atol=1e-5, rtol=1e-5)


def test_save_roundtrip_loads_in_transformers(hf_t5, tmp_path):
    model, path = hf_t5
    ours, params = t5_convert.load(path)
    out = str(tmp_path / "saved")
    t5_convert.save(params, ours.config, out)
    with CheckpointReader(out) as r:
        assert ("lm_head.weight" in r) == (not ours.config.tie_word_embeddings)
        assert "encoder.embed_tokens.weight" not in r
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.scale_decoder_outputs == model.config.scale_decoder_outputs
    assert reloaded.config.dense_act_fn == model.config.dense_act_fn
    ids, mask, dec, dec_mask = _inputs(model.config.vocab_size, seed=3)
    valid = dec_mask == 1
    np.testing.assert_allclose(_hf(reloaded, ids, mask, dec, dec_mask)[0][valid],
                               _hf(model, ids, mask, dec, dec_mask)[0][valid], atol=1e-5, rtol=1e-5)
    with open(os.path.join(out, "config.json")) as f:
        again = t5_model.T5Config.from_hf(json.load(f), tie_word_embeddings=ours.config.tie_word_embeddings)
    assert again == ours.config


def test_tied_copies_ignored_and_bad_keys_listed(hf_t5, tmp_path):
    _, path = hf_t5
    tensors, config = read_checkpoint(path)
    # Files written with the tied copies spelled out still load (documented ignore pattern).
    tensors["encoder.embed_tokens.weight"] = tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"]
    t5_convert.load(write_checkpoint(tmp_path / "copies", tensors, config))

    assert_bad_keys_listed(t5_convert.load, path, tmp_path / "bad",
                           missing="decoder.block.1.layer.2.DenseReluDense.wo.weight",
                           unexpected="decoder.block.1.layer.2.DenseReluDense.wx.weight")


@pytest.mark.parametrize("saved", [
    {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},  # FlanT5 hub config (pre-5.x)
    {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu", "tie_word_embeddings": False},  # BLIP-2's text_config
    {"feed_forward_proj": "relu"},  # original T5: scaled
    {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": True, "scale_decoder_outputs": False},  # 5.x save
    {"feed_forward_proj": "gated-silu", "tie_word_embeddings": True},
])
def test_config_semantics_follow_transformers(saved):
    """Activation, gating and output scaling read from a config dict exactly as transformers 5.x reads it."""
    hf = transformers.T5Config.from_dict(dict(saved))
    ours = t5_model.T5Config.from_hf(dict(saved))
    assert (ours.dense_act_fn, ours.is_gated_act, ours.scale_decoder_outputs) == (
        hf.dense_act_fn, hf.is_gated_act, hf.scale_decoder_outputs)
    assert ours.tie_word_embeddings  # head tied unless the converter finds `lm_head.weight`
    keys = {r.hf_key for r in t5_convert.rules(ours, hf_prefix="language_model.")}
    assert "language_model.shared.weight" in keys and not any("lm_head" in k for k in keys)


def test_dropout_and_remat():
    """Dropout only when asked (rng 'dropout'); remat (static `deterministic`) gives the same logits."""
    cfg = t5_model.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=2,
                            num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.3)
    model = t5_model.T5ForConditionalGeneration(cfg)
    remat = t5_model.T5ForConditionalGeneration(dataclasses.replace(cfg, remat=True))
    ids, mask, dec, _ = map(jnp.asarray, _inputs(cfg.vocab_size, enc_len=5, dec_len=4, seed=4))

    v = random_params(lambda: model.init(jax.random.key(1), input_ids=ids, decoder_input_ids=dec))

    @jax.jit
    def run(v, rng):
        kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        drop = lambda: model.apply(v, **kw, deterministic=False, rngs={"dropout": rng})  # noqa: E731
        return model.apply(v, **kw), drop(), drop(), remat.apply(v, **kw)

    assert_dropout_and_remat(run, v)
