"""OPT parity against Hugging Face `OPTForCausalLM` (torch, float32) on tiny random models."""
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

from blip2_jax.convert import opt as opt_convert
from blip2_jax.convert.hf_io import CheckpointReader
from blip2_jax.models import opt as opt_model
from blip2_jax.models.layers import take_batch_rows
from tests.helpers import assert_bad_keys_listed, assert_close, assert_dropout_and_remat, random_params

CONFIGS = {
    # opt-350m-like: word_embed_proj_dim != hidden_size (project_in/out), pre-LN, tied head.
    "proj_preln_tied": dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                            num_attention_heads=4, max_position_embeddings=40, word_embed_proj_dim=16,
                            activation_function="relu", tie_word_embeddings=True),
    # post-LN blocks (do_layer_norm_before False), more heads and layers, gelu, untied head.
    "postln_untied": dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, ffn_dim=80,
                          num_attention_heads=6, max_position_embeddings=40, do_layer_norm_before=False,
                          activation_function="gelu", tie_word_embeddings=False),
}


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight with a spread that makes each layer matter (HF's init is std 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.25 * noise)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_opt(request, tmp_path_factory):
    cfg = transformers.OPTConfig(**CONFIGS[request.param], dropout=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    _redraw(model, seed=len(request.param))
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return model, path


def _inputs(vocab, batch=3, length=9, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, :3] = 0  # left padding, as batched generation uses
    mask[2, :1] = 0
    ids[mask == 0] = 1
    return ids, mask


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_parity_float32_left_padding(hf_opt):
    model, path = hf_opt
    ids, mask = _inputs(model.config.vocab_size)
    ref = _hf_logits(model, ids, mask)
    ours, params = opt_convert.load(path)
    assert ours.config.tie_word_embeddings == model.config.tie_word_embeddings
    # The structure the module itself creates is exactly what the converter produced.
    shapes = jax.eval_shape(lambda: ours.init(jax.random.key(0), input_ids=jnp.zeros((1, 2), jnp.int32)))
    assert (jax.tree.map(lambda s: s.shape, nn.unbox(shapes["params"]))
            == jax.tree.map(lambda x: x.shape, params))

    embeds = ours.apply({"params": params}, jnp.asarray(ids), method="embed")
    logits, cache = ours.apply({"params": params}, embeds, jnp.asarray(mask))
    assert logits.dtype == jnp.float32 and logits.shape == ref.shape and cache is None
    valid = mask == 1  # padded positions carry no meaning
    err = assert_close(np.asarray(logits)[valid], ref[valid])
    by_ids, _ = ours.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(by_ids), np.asarray(logits))
    print(f"OPT f32 max err {err:.2e} (max|HF| {np.abs(ref).max():.2f})")


def test_parity_bfloat16(hf_opt):
    model, path = hf_opt
    ids, mask = _inputs(model.config.vocab_size, seed=1)
    ref = _hf_logits(model, ids, mask)
    ours, params = opt_convert.load(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    logits, _ = ours.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.float32
    valid = mask == 1
    err = assert_close(np.asarray(logits)[valid], ref[valid], tol=3e-2)
    print(f"OPT bf16 max err {err:.2e} (max|HF| {np.abs(ref).max():.2f})")


def test_incremental_decoding_matches_full_forward(hf_opt):
    """Prefill a left-padded prompt into a fixed-size cache, then decode one token at a time."""
    model, path = hf_opt
    ours, params = opt_convert.load(path)
    ids, mask = _inputs(model.config.vocab_size, length=9, seed=2)
    ref = _hf_logits(model, ids, mask)
    full, _ = ours.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))

    step = jax.jit(lambda p, x, m, c: ours.apply({"params": p}, input_ids=x, attention_mask=m, cache=c))
    prompt = 5
    cache = opt_model.init_cache(ours.config, ids.shape[0], max_len=12, dtype=jnp.float32)
    logits, cache = step(params, jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]), cache)
    pieces = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, cache = step(params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        pieces.append(logits)
    assert int(cache["index"]) == ids.shape[1]
    inc = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    valid = mask == 1
    np.testing.assert_allclose(inc[valid], np.asarray(full)[valid], atol=1e-5, rtol=1e-5)
    assert_close(inc[valid], ref[valid])

    # Beam reordering (generate's take_batch_rows): rows of the cache follow `order`, and decoding
    # continues as for those rows.
    order = jnp.array([2, 0, 2])
    _, cache = step(params, jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]),
                    opt_model.init_cache(ours.config, 3, 12, jnp.float32))
    cache = take_batch_rows(cache, order)
    nxt, _ = step(params, jnp.asarray(ids[np.asarray(order), prompt:prompt + 1]),
                  jnp.asarray(mask[np.asarray(order), prompt:prompt + 1]), cache)
    np.testing.assert_allclose(np.asarray(nxt[:, 0]), np.asarray(full)[np.asarray(order), prompt],
                               atol=1e-5, rtol=1e-5)


def test_save_roundtrip_loads_in_transformers(hf_opt, tmp_path):
    model, path = hf_opt
    ours, params = opt_convert.load(path)
    out = str(tmp_path / "saved")
    opt_convert.save(params, ours.config, out)
    with CheckpointReader(out) as r:
        assert ("lm_head.weight" in r) == (not ours.config.tie_word_embeddings)
    reloaded = transformers.OPTForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = _inputs(model.config.vocab_size, seed=3)
    np.testing.assert_allclose(_hf_logits(reloaded, ids, mask)[mask == 1], _hf_logits(model, ids, mask)[mask == 1],
                               atol=1e-5, rtol=1e-5)
    assert opt_model.OPTConfig.from_hf(json.load(open(os.path.join(out, "config.json")))) == ours.config


def test_missing_and_unexpected_keys_are_listed(hf_opt, tmp_path):
    assert_bad_keys_listed(opt_convert.load, hf_opt[1], tmp_path / "bad", missing="model.decoder.layers.0.fc1.weight",
                           unexpected="model.decoder.layers.0.extra.weight")


def test_config_roundtrip_and_prefixed_rules():
    cfg = opt_model.OPTConfig.from_hf(transformers.OPTConfig(**CONFIGS["proj_preln_tied"]).to_dict())
    assert cfg.embed_dim == 16 and cfg.hidden_size == 32 and cfg.has_final_layer_norm
    assert opt_model.OPTConfig.from_hf(cfg.to_hf()) == cfg
    keys = {r.hf_key for r in opt_convert.rules(cfg, hf_prefix="language_model.")}
    assert "language_model.model.decoder.project_in.weight" in keys
    assert not any(k.endswith("lm_head.weight") for k in keys)
    with pytest.raises(ValueError, match="model_type"):
        opt_model.OPTConfig.from_hf({"model_type": "t5"})


def test_dropout_and_remat():
    """Dropout only when asked (rng 'dropout'); remat (static `deterministic`) gives the same logits."""
    cfg = opt_model.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                              max_position_embeddings=20, dropout=0.3, attention_dropout=0.2)
    model, remat = opt_model.OPTForCausalLM(cfg), opt_model.OPTForCausalLM(dataclasses.replace(cfg, remat=True))
    ids, mask = map(jnp.asarray, _inputs(cfg.vocab_size, length=6, seed=4))

    v = random_params(lambda: model.init(jax.random.key(1), input_ids=ids))

    @jax.jit
    def run(v, rng):
        drop = lambda: model.apply(v, input_ids=ids, attention_mask=mask, deterministic=False,  # noqa: E731
                                   rngs={"dropout": rng})[0]
        plain = lambda m: m.apply(v, input_ids=ids, attention_mask=mask)[0]  # noqa: E731
        return plain(model), drop(), drop(), plain(remat)

    assert_dropout_and_remat(run, v)
