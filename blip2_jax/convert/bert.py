"""The stage-1 Q-Former initialised from `bert-base-uncased`, as LAVIS's `Blip2Base.init_Qformer` does.

LAVIS builds its Q-Former with `BertLMHeadModel.from_pretrained("bert-base-uncased")`, grows the
vocabulary by `[DEC]` and copies the text FFN into the query FFN (blip2_qformer.py:75-79). From a
Hugging Face BERT directory (`BertForMaskedLM`, `BertLMHeadModel` or `BertForPreTraining` keys under
`bert.`, or `BertModel` keys without a prefix), `init_stage1_from_bert` takes:

- `embeddings.word_embeddings` -> `qformer/word_embeddings`, with one row appended for `[DEC]`
  (drawn N(0, 0.02) from the given rng, as `resize_token_embeddings` initialises new rows);
- `embeddings.position_embeddings` -> `qformer/position_embeddings`;
- `embeddings.LayerNorm` -> `qformer/layernorm` (the Q-Former's embedding LayerNorm);
- per layer: `attention.self.*` -> `attention`, `attention.output.*` -> `attention_output`,
  `intermediate`/`output` -> `text_ffn` **and** (a copy) `query_ffn`;
- `cls.predictions.transform.dense` / `.LayerNorm` -> `lm_transform` / `lm_transform_ln`, and
  `cls.predictions.bias` -> `lm_bias` with a 0 appended for `[DEC]` (torch pads the tied decoder's
  bias with zeros). The decoder weight is tied to the word embeddings: nothing to load (a stored
  `cls.predictions.decoder.weight` must equal them).

Dropped, as LAVIS has no place for them: `token_type_embeddings` (LAVIS's `BertEmbeddings` has none,
so LAVIS's text encoder does not add BERT's type-0 row), `pooler.*`, `cls.seq_relationship.*`,
`position_ids`. Everything else of the stage-1 model (cross-attention layers, query tokens, ITC
projections, ITM head, temperature, `ln_vision`, the vision tower) comes from the fresh init passed in;
one log line lists it.
"""
from __future__ import annotations

import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.convert import standalone
from blip2_jax.convert.hf_io import CheckpointError, CheckpointReader
from blip2_jax.convert.merge import merge_params
from blip2_jax.convert.rules import Rule, Transform, layer_norm, linear, prefixed, stack_rules
from blip2_jax.models.blip2 import Blip2Config
from blip2_jax.models.qformer import QFormerConfig, layer_stacks

log = logging.getLogger(__name__)

DEC_INIT_STD = 0.02  # BERT's initializer_range: how `resize_token_embeddings` draws new rows


def qformer_config_from_bert(d: dict, *, encoder_hidden_size: int, num_query_tokens: int = 32,
                             cross_attention_frequency: int = 2, **overrides) -> QFormerConfig:
    """The Q-Former LAVIS builds on a BERT config: same sizes, vocabulary + 1 (`[DEC]`)."""
    kwargs = dict(hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                  intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "gelu"),
                  layer_norm_eps=d.get("layer_norm_eps", 1e-12), hidden_dropout=d.get("hidden_dropout_prob", 0.1),
                  attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
                  max_position_embeddings=d.get("max_position_embeddings", 512), vocab_size=d["vocab_size"] + 1,
                  pad_token_id=d.get("pad_token_id", 0), cross_attention_frequency=cross_attention_frequency,
                  encoder_hidden_size=encoder_hidden_size, num_query_tokens=num_query_tokens, use_text_input=True)
    return QFormerConfig(**{**kwargs, **overrides})


def _append(row: np.ndarray) -> Transform:
    """BERT table -> ours with `row` appended along axis 0 (and back: the last entry dropped)."""
    return Transform(lambda x: np.concatenate([x, row[None].astype(x.dtype)]), lambda x: x[:-1])


def rules(config: QFormerConfig, *, dec_row: np.ndarray, hf_prefix: str = "bert.", lm_head: bool = True) -> list[Rule]:
    """BERT keys -> stage-1 paths. A text-FFN key appears twice (text and query FFN: LAVIS's copy).

    `dec_row` `[D]` is the `[DEC]` word embedding appended to BERT's table; `lm_head` adds the
    `cls.predictions.*` rules (no prefix: they sit beside `bert.`).
    """
    q = ("qformer",)
    rs = [Rule("embeddings.word_embeddings.weight", q + ("word_embeddings", "embedding"), _append(dec_row)),
          Rule("embeddings.position_embeddings.weight", q + ("position_embeddings", "embedding"))]
    rs += layer_norm("embeddings.LayerNorm", q + ("layernorm",))
    for i in range(config.num_layers):
        hf, ours = f"encoder.layer.{i}.", q + (f"layer_{i}",)
        for proj in ("query", "key", "value"):
            rs += linear(f"{hf}attention.self.{proj}", ours + ("attention", proj))
        rs += linear(hf + "attention.output.dense", ours + ("attention_output", "dense"))
        rs += layer_norm(hf + "attention.output.LayerNorm", ours + ("attention_output", "LayerNorm"))
        for ffn in ("text_ffn", "query_ffn"):
            rs += linear(hf + "intermediate.dense", ours + (ffn, "intermediate"))
            rs += linear(hf + "output.dense", ours + (ffn, "output", "dense"))
            rs += layer_norm(hf + "output.LayerNorm", ours + (ffn, "output", "LayerNorm"))
    rs = prefixed(stack_rules(rs, layer_stacks(config, q)), hf_prefix)
    if lm_head:
        rs += linear("cls.predictions.transform.dense", ("lm_transform",))
        rs += layer_norm("cls.predictions.transform.LayerNorm", ("lm_transform_ln",))
        rs.append(Rule("cls.predictions.bias", ("lm_bias",), _append(np.zeros((), np.float32))))
    return rs


def ignore_patterns(hf_prefix: str) -> tuple[str, ...]:
    p = re.escape(hf_prefix)
    return (rf"{p}embeddings\.token_type_embeddings\.weight", r".*position_ids", rf"{p}pooler\..*",
            r"cls\.seq_relationship\..*", r"cls\.predictions\.decoder\.(weight|bias)")


def detect_prefix(keys) -> str:
    """`"bert."` (the LM-head classes) or `""` (`BertModel`), whichever the word embeddings sit under."""
    return standalone.detect_prefix(keys, "embeddings.word_embeddings.weight", ("bert.", ""), "BERT embeddings")


def _check_config(bert: dict, config: QFormerConfig, source: str) -> None:
    want = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
                max_position_embeddings=config.max_position_embeddings, vocab_size=config.vocab_size - 1,
                hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps)
    diff = [f"{k}: BERT {bert.get(k)!r} != Q-Former {v!r}" + (" (+1 for [DEC])" if k == "vocab_size" else "")
            for k, v in want.items() if bert.get(k) != v]
    if diff:
        raise CheckpointError(f"{source}: BERT config does not match the Q-Former config: " + "; ".join(diff))


def init_stage1_from_bert(path: str, params: dict, config: Blip2Config, rng: jax.Array) -> dict:
    """A full stage-1 tree: `params` (a fresh init of `Blip2Stage1(config)`) with BERT's weights in.

    `path` is a Hugging Face BERT directory (config.json + safetensors) whose sizes match
    `config.qformer` (vocabulary one smaller: `[DEC]` is appended, drawn from `rng`). Returns a
    tree with exactly the paths, shapes and dtypes of `params`; the query FFNs are copies of the text
    FFNs. Missing/unexpected BERT keys or mismatched shapes raise `CheckpointError`.
    """
    params = nn.unbox(params)
    qcfg = config.qformer
    with CheckpointReader(path) as reader:
        _check_config(reader.config, qcfg, path)
        prefix = detect_prefix(reader.keys())
        has_head = "cls.predictions.bias" in reader
        dec_row = np.asarray(jax.random.normal(rng, (qcfg.hidden_size,), jnp.float32)) * DEC_INIT_STD
        rs = rules(qcfg, dec_row=dec_row, hf_prefix=prefix, lm_head=has_head and config.with_lm_head)
        ignore = ignore_patterns(prefix) + ((r"cls\..*",) if not config.with_lm_head else ())
        loaded = standalone.read_params(reader, rs, ignore=ignore)
        if has_head and "cls.predictions.decoder.weight" in reader:
            decoder = reader.get("cls.predictions.decoder.weight")
            if not np.array_equal(decoder, reader.get(prefix + "embeddings.word_embeddings.weight")):
                raise CheckpointError(f"{path}: cls.predictions.decoder.weight differs from the word embeddings; "
                                      "the Q-Former's LM head is tied to them")
    # What BERT lacks (the query embeddings, cross-attention, query FFNs, ITC/ITM heads) stays fresh.
    return merge_params(params, loaded, source=path, missing="keep")


__all__ = ["qformer_config_from_bert", "rules", "ignore_patterns", "detect_prefix", "init_stage1_from_bert"]
