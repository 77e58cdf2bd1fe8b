"""LLaMA / Mistral / Qwen2 / Gemma parity against Hugging Face `...ForCausalLM` (torch, float32).

Each family is a tiny random HF model of odd sizes (hidden 40, 5 heads, grouped-query attention with 1
key/value head where the family has it, vocab 97), saved with `save_pretrained` and loaded by
`blip2_jax.convert.decoder`. HF runs with the position ids its `generate` derives from the attention
mask (`cumsum(mask) - 1`, padding at 0), which is what our model computes for a left-padded batch.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from blip2_jax.convert import decoder as decoder_convert
from blip2_jax.convert.hf_io import CheckpointReader
from blip2_jax.models import decoder as decoder_model
from blip2_jax.models.layers import take_batch_rows
from tests import hf_tiny
from tests.test_blip2_retrieval import assert_close
from tests.test_opt import _inputs  # ids and a left-padded mask: rows 1 and 2 start with 3 and 1 pads

COMMON = dict(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
              max_position_embeddings=64, rms_norm_eps=1e-5, attn_implementation="eager")
FAMILIES = {
    # LLaMA 3.1+: GQA (5 query heads on 1 K/V head), the "llama3" rope scaling, untied head.
    "llama3": (transformers.LlamaConfig, dict(
        num_key_value_heads=1, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    # LLaMA 2 style with every bias (attention_bias, mlp_bias), plain RoPE, no grouping, tied head.
    "llama2_bias": (transformers.LlamaConfig, dict(
        num_key_value_heads=5, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Mistral: a sliding window shorter than the sequence, so that it matters.
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=1, sliding_window=4,
                                                 tie_word_embeddings=False)),
    # Qwen2.5: q/k/v biases, theta 1e6, tied head (as the 0.5B-3B checkpoints).
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True,
                                             rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    # Gemma: head_dim 12 (not 40 / 5), scaled embeddings, (1 + w) norms, tanh-GELU, tied head.
    "gemma": (transformers.GemmaConfig, dict(num_key_value_heads=1, head_dim=12, hidden_act="gelu_pytorch_tanh",
                                             tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
                                             eos_token_id=1)),
}


def _hf_model(name: str):
    """The tiny random HF `...ForCausalLM` of `FAMILIES[name]`, its weights re-drawn so that every layer matters."""
    config_cls, fields = FAMILIES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **fields))
    return hf_tiny.redraw_(model, seed=len(name), std=0.2)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_lm(request, tmp_path_factory):
    model = _hf_model(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return model, path


def _hf_logits(model, ids, mask):
    """HF logits with `generate`'s position ids for a left-padded batch."""
    mask = torch.tensor(mask)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=mask, position_ids=positions).logits.numpy()


def _valid(x, mask):
    return np.asarray(x)[mask == 1]  # padded positions carry no meaning


def test_parity_float32_left_padding(hf_lm):
    model, path = hf_lm
    ours, params = decoder_convert.load(path)
    for field in ("tie_word_embeddings", "num_key_value_heads", "hidden_act"):
        assert getattr(ours.config, field) == getattr(model.config, field), field
    assert ours.config.head_dim == model.model.layers[0].self_attn.head_dim
    # The structure the module itself creates is exactly what the converter produced.
    shapes = jax.eval_shape(lambda: ours.init(jax.random.key(0), input_ids=jnp.zeros((1, 2), jnp.int32)))
    assert (jax.tree.map(lambda s: s.shape, nn.unbox(shapes["params"]))
            == jax.tree.map(lambda x: x.shape, params))

    ids, mask = _inputs(model.config.vocab_size)
    ref = _hf_logits(model, ids, mask)
    logits, cache = ours.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.float32 and logits.shape == ref.shape and cache is None
    err = assert_close(_valid(logits, mask), _valid(ref, mask))
    # The unpadded row is HF's plain forward (positions 0..T-1, no position ids given).
    with torch.no_grad():
        plain = model(input_ids=torch.tensor(ids[:1])).logits.numpy()
    assert_close(np.asarray(logits[:1]), plain)
    # inputs_embeds (what BLIP-2 passes) gives the same logits as input_ids.
    embeds = ours.apply({"params": params}, jnp.asarray(ids), method="embed")
    by_embeds, _ = ours.apply({"params": params}, embeds, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(by_embeds), np.asarray(logits))
    print(f"{model.config.model_type} f32 max err {err:.2e} (max|HF| {np.abs(ref).max():.2f})")


def _cached_logits(step, params, ids, mask, cuts, cache):
    """Logits of `ids` fed through one cache in the chunks `cuts` delimits: `[0:cuts[0]], [cuts[0]:cuts[1]], ...`."""
    bounds = [0, *cuts, ids.shape[1]]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        logits, cache = step(params, jnp.asarray(ids[:, a:b]), jnp.asarray(mask[:, a:b]), cache)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1), cache


def test_kv_cache_prefill_then_one_token_steps(hf_lm):
    """A left-padded prompt prefilled into a fixed-size cache, then one-token steps and a two-token step:
    the full pass, and HF."""
    model, path = hf_lm
    ours, params = decoder_convert.load(path)
    ids, mask = _inputs(model.config.vocab_size, seed=2)
    full, _ = ours.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    step = jax.jit(lambda p, x, m, c: ours.apply({"params": p}, input_ids=x, attention_mask=m, cache=c))
    prompt = 5
    cache = decoder_model.init_cache(ours.config, ids.shape[0], max_len=12)
    assert cache["layers"][0]["k"].shape == (3, 12, ours.config.num_key_value_heads, ours.config.head_dim)
    inc, cache = _cached_logits(step, params, ids, mask, (prompt, prompt + 1, prompt + 2), cache)
    assert int(cache["index"]) == ids.shape[1]
    assert_close(_valid(inc, mask), _valid(full, mask), tol=1e-5)
    assert_close(_valid(inc, mask), _valid(_hf_logits(model, ids, mask), mask))

    # Beam reordering (generate's take_batch_rows): the cache rows follow `order`.
    order = np.array([2, 0, 2])
    _, cache = step(params, jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]),
                    decoder_model.init_cache(ours.config, 3, 12))
    nxt, _ = step(params, jnp.asarray(ids[order, prompt:prompt + 1]), jnp.asarray(mask[order, prompt:prompt + 1]),
                  take_batch_rows(cache, jnp.asarray(order)))
    assert_close(np.asarray(nxt[:, 0]), np.asarray(full)[order, prompt], tol=1e-5)


def test_save_roundtrip_loads_in_transformers(hf_lm, tmp_path):
    """Ours saved -> transformers loads the same class with HF's outputs; config.json reads back to ours."""
    model, path = hf_lm
    ours, params = decoder_convert.load(path)
    decoder_convert.save(params, ours.config, str(tmp_path))
    with CheckpointReader(str(tmp_path)) as r, open(tmp_path / "config.json") as f:
        assert ("lm_head.weight" in r) != ours.config.tie_word_embeddings
        assert decoder_model.DecoderConfig.from_hf(json.load(f)) == ours.config
    assert decoder_model.DecoderConfig.from_hf(ours.config.to_hf()) == ours.config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    ids, mask = _inputs(model.config.vocab_size, seed=3)
    assert_close(*(_valid(_hf_logits(m, ids, mask), mask) for m in (reloaded, model)), tol=1e-6)


def test_bfloat16_and_sharded_checkpoint(tmp_path):
    """LLaMA 3: a sharded index loads the same tensors as one file; bfloat16 storage and compute stay close
    (logits in float32)."""
    model, path = _hf_model("llama3"), str(tmp_path / "single")
    model.save_pretrained(path)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    _, params = decoder_convert.load(str(tmp_path / "sharded"))
    _, single = decoder_convert.load(path)
    jax.tree.map(np.testing.assert_array_equal, params, single)
    ids, mask = _inputs(model.config.vocab_size, seed=1)
    bf16, half = decoder_convert.load(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    logits, _ = bf16.apply({"params": half}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.float32
    assert_close(_valid(logits, mask), _valid(_hf_logits(model, ids, mask), mask), tol=5e-2)


def test_config_from_older_files_and_family_rules():
    """Pre-5.x files (`rope_theta` + `rope_scaling`), Gemma's legacy "gelu", Qwen2's sliding layers, and
    the family defaults of a file that leaves fields out."""
    old = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    cfg = decoder_model.DecoderConfig.from_hf(old)
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor, cfg.head_dim) == ("llama3", 500000.0, 32.0, 16)
    hf = transformers.LlamaConfig(**{k: v for k, v in old.items() if k != "model_type"})
    want = ROPE_INIT_FUNCTIONS["llama3"](hf)[0].numpy()
    np.testing.assert_allclose(decoder_model.rope_inv_freq(cfg), want, rtol=1e-6)

    gemma = decoder_model.DecoderConfig.from_hf({"model_type": "gemma", "hidden_act": "gelu"})
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.tie_word_embeddings and gemma.head_dim == 256

    qwen = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    ours = decoder_model.DecoderConfig.from_hf(qwen.to_dict())
    assert [ours.window(i) for i in range(4)] == [None, None, 8, 8] and ours.qkv_bias
    assert decoder_model.DecoderConfig.from_hf(ours.to_hf()) == ours
    with pytest.raises(ValueError, match="model_type"):
        decoder_model.DecoderConfig.from_hf({"model_type": "opt"})
    with pytest.raises(ValueError, match="not a multiple"):
        decoder_model.DecoderConfig(hidden_size=40, num_attention_heads=5, num_key_value_heads=2)
