"""Q-Former from BERT: text pass == HF BERT, ITG head == HF MLM head, query FFN == text FFN.

HF BERT adds `token_type_embeddings[0]` to every token; LAVIS's Q-Former has no token type
embeddings, so the references below are the HF models with that row zeroed (after saving: the file
keeps it, and our loader drops it).
"""
import dataclasses
import logging

import flax.linen as nn
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from transformers import BertConfig, BertForMaskedLM, BertLMHeadModel, BertModel

from blip2_jax.convert import bert
from blip2_jax.convert.hf_io import CheckpointError
from blip2_jax.models import layers
from blip2_jax.models.blip2 import Blip2Config, Blip2Stage1
from blip2_jax.models.qformer import attention_mask
from blip2_jax.models.vit import VisionConfig
from tests import hf_tiny
from tests.helpers import assert_close

CASES = {
    # (HF class, BERT sizes, cross_attention_frequency, queries)
    "masked_lm": (BertForMaskedLM, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=68, vocab_size=50), 2, 4),
    "lm_head_freq1": (BertLMHeadModel, dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                            intermediate_size=100, vocab_size=61, is_decoder=True), 1, 6),
    "bert_model": (BertModel, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=68, vocab_size=50), 2, 4),
}


def stage1_config(bert_cfg: dict, freq: int, nq: int) -> Blip2Config:
    vision = VisionConfig(hidden_size=24, intermediate_size=40, num_layers=1, num_heads=2, image_size=28)
    qformer = bert.qformer_config_from_bert(bert_cfg, encoder_hidden_size=24, num_query_tokens=nq,
                                            cross_attention_frequency=freq)
    return Blip2Config(vision=vision, qformer=qformer, num_query_tokens=nq, image_text_hidden_size=8)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    cls, sizes, freq, nq = CASES[request.param]
    hf_cfg = BertConfig(max_position_embeddings=24, **sizes)
    torch.manual_seed(0)
    hf = hf_tiny.redraw_(cls(hf_cfg), seed=3, std=0.2)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    base = hf if cls is BertModel else hf.bert
    if hf_cfg.is_decoder:  # BertLMHeadModel is causal; the Q-Former's text encoder (ITC) is not
        base = BertModel(BertConfig(max_position_embeddings=24, **{**sizes, "is_decoder": False}),
                         add_pooling_layer=False).eval()
        base.load_state_dict(hf.bert.state_dict())
    with torch.no_grad():  # LAVIS has no token type embeddings
        for emb in (base.embeddings, getattr(hf, "bert", hf).embeddings):
            emb.token_type_embeddings.weight[0] = 0.0
    config = stage1_config(hf_cfg.to_dict(), freq, nq)
    model = Blip2Stage1(config)
    ids = jnp.ones((1, 3), jnp.int32)
    # Any tree of the model's shapes serves as the "fresh init" (running model.init would cost ~30 s here).
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(7), jnp.zeros((1, 28, 28, 3)), ids, ids)
    abstract = nn.unbox(abstract["params"])
    fill = np.random.default_rng(7)
    init = jax.tree.map(lambda a: jnp.asarray(0.1 * fill.normal(size=a.shape), a.dtype), abstract)
    params = bert.init_stage1_from_bert(path, init, config, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, sizes["vocab_size"], size=(3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return dict(name=request.param, hf=hf, base=base, model=model, init=init, params=params, ids=ids, mask=mask,
                path=path)


def _text_hidden(m, ids, mask, kind="unimodal"):
    return m.qformer(input_ids=ids, self_mask=attention_mask(kind, 0, mask))[0]


def _lm_logits(m, ids, mask, kind):
    """The ITG head (as `Blip2Stage1.itg_logits` applies it) over a text-only pass (no queries):
    bidirectional for BertForMaskedLM, causal for BertLMHeadModel (is_decoder)."""
    h = layers.activation(m.config.qformer.hidden_act)(m.lm_transform(_text_hidden(m, ids, mask, kind)))
    return m.qformer.attend_word_embeddings(m.lm_transform_ln(h)) + m.lm_bias


def test_text_pass_matches_hf_bert(case):
    base, model, params, ids, mask = (case[k] for k in ("base", "model", "params", "ids", "mask"))
    with torch.no_grad():
        ref = base(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), method=_text_hidden)
    assert_close(ours, ref)


def test_itg_head_matches_hf_mlm_head(case):
    name, hf, model, init, params, ids, mask = (case[k] for k in ("name", "hf", "model", "init", "params", "ids",
                                                                  "mask"))
    if name == "bert_model":  # no MLM head in the file: the head is the fresh init's
        for k in ("lm_transform", "lm_transform_ln", "lm_bias"):
            jax.tree.map(np.testing.assert_array_equal, params[k], init[k])
        return
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    kind = "causal" if hf.config.is_decoder else "unimodal"
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), kind, method=_lm_logits))
    vocab = ref.shape[-1]
    assert ours.shape[-1] == vocab + 1  # [DEC]
    assert_close(ours[..., :vocab], ref)
    assert params["lm_bias"][-1] == 0.0


def test_dec_row_query_ffn_copy_and_fresh_parts(case):
    base, init, params = case["base"], case["init"], case["params"]
    q = params["qformer"]
    table = base.embeddings.word_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(q["word_embeddings"]["embedding"][:-1], table)
    dec = np.asarray(q["word_embeddings"]["embedding"][-1])
    assert 0.0 < dec.std() < 0.06 and not np.any(np.all(np.isclose(table, dec), axis=1))
    for name, layer in q.items():
        if not name.startswith("layer_"):
            continue
        jax.tree.map(np.testing.assert_array_equal, layer["query_ffn"], layer["text_ffn"])
        if "crossattention" in layer:  # fresh, as LAVIS's cross-attention
            fresh = init["qformer"][name]["crossattention"]
            jax.tree.map(np.testing.assert_array_equal, layer["crossattention"], fresh)
    for k in ("query_tokens", "temp", "ln_vision", "vision_proj", "text_proj", "itm_head", "vision"):
        jax.tree.map(np.testing.assert_array_equal, params[k], init[k])
    assert jax.tree.structure(params) == jax.tree.structure(init)


def test_log_lists_fresh_parts_and_dec_row_follows_rng(case, caplog):
    name, init, params, src = case["name"], case["init"], case["params"], case["path"]
    cfg = case["model"].config
    with caplog.at_level(logging.INFO, logger="blip2_jax.convert.bert"):
        again = bert.init_stage1_from_bert(src, init, cfg, jax.random.PRNGKey(1))
    line = caplog.records[-1].getMessage()
    for part in ("qformer/layer_0/crossattention", "query_tokens", "temp", "ln_vision", "itm_head", "vision"):
        assert part in line
    assert ("lm_transform" in line) == (name == "bert_model")
    np.testing.assert_array_equal(again["qformer"]["word_embeddings"]["embedding"],
                                  params["qformer"]["word_embeddings"]["embedding"])
    other = bert.init_stage1_from_bert(src, init, cfg, jax.random.PRNGKey(2))
    assert not np.array_equal(other["qformer"]["word_embeddings"]["embedding"][-1],
                              params["qformer"]["word_embeddings"]["embedding"][-1])


def test_config_mismatch_is_named(case):
    cfg = case["model"].config
    wrong = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, vocab_size=cfg.qformer.vocab_size + 1))
    with pytest.raises(CheckpointError, match=r"vocab_size: BERT \d+ != Q-Former \d+ \(\+1 for \[DEC\]\)"):
        bert.init_stage1_from_bert(case["path"], case["init"], wrong, jax.random.PRNGKey(0))
