"""Hugging Face `T5ForConditionalGeneration` <-> our `T5ForConditionalGeneration` parameters.

HF keys (relative to `hf_prefix`, `language_model.` inside a BLIP-2 checkpoint): `shared.weight`;
`{encoder,decoder}.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight` and `.layer.0.layer_norm.weight`;
`block.0.layer.0.SelfAttention.relative_attention_bias.weight` (one table per stack);
decoder `.layer.1.EncDecAttention.{q,k,v,o}.weight`, `.layer.1.layer_norm.weight`; the FFN at
`.layer.1` (encoder) / `.layer.2` (decoder): `DenseReluDense.{wi | wi_0, wi_1}.weight`, `.wo.weight`,
`.layer_norm.weight`; `{encoder,decoder}.final_layer_norm.weight`; `lm_head.weight` when untied.

Tied weights (transformers 5.x): files keep only `shared.weight`; `encoder.embed_tokens.weight`,
`decoder.embed_tokens.weight` are copies of it when present and are ignored (documented pattern).
`lm_head.weight` present (real FlanT5) -> a separate head; absent -> the head is `shared`.
`decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight` (some old files) is ignored,
as transformers does. `wo` is always loaded in float32 (HF `_keep_in_fp32_modules`).
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blip2_jax.convert import standalone
from blip2_jax.convert.rules import Rule, embedding, linear, stack_rules
from blip2_jax.models.t5 import T5Config, T5ForConditionalGeneration, layer_stacks

_IGNORE = (
    r"encoder\.embed_tokens\.weight",
    r"decoder\.embed_tokens\.weight",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)


def ignore_patterns(hf_prefix: str = "") -> list[str]:
    """Regexes (full match) of HF keys that a T5 file may hold and that we do not need."""
    return [re.escape(hf_prefix) + p for p in _IGNORE]


def _rms(hf_key: str, path: tuple[str, ...]) -> list[Rule]:
    return [Rule(hf_key, path + ("scale",))]


def _attention(hf: str, ours: tuple[str, ...]) -> list[Rule]:
    return [r for p in ("q", "k", "v", "o") for r in linear(f"{hf}.{p}", ours + (p,), bias=False)]


def _mlp(config: T5Config, hf: str, ours: tuple[str, ...]) -> list[Rule]:
    names = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
    return [r for n in names for r in linear(f"{hf}.DenseReluDense.{n}", ours + ("mlp", n), bias=False)]


def rules(config: T5Config, hf_prefix: str = "") -> list[Rule]:
    """Every parameter of `T5ForConditionalGeneration(config)` with its HF key (`hf_prefix` + key)."""
    out = embedding(f"{hf_prefix}shared.weight", ("shared",))
    for stack, n in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        hs = f"{hf_prefix}{stack}"
        out += embedding(f"{hs}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                         (stack, "relative_attention_bias"))
        for i in range(n):
            hf, ours = f"{hs}.block.{i}.layer", (stack, f"blocks_{i}")
            out += _attention(f"{hf}.0.SelfAttention", ours + ("self_attn",))
            out += _rms(f"{hf}.0.layer_norm.weight", ours + ("self_attn_norm",))
            ff = 1
            if stack == "decoder":
                out += _attention(f"{hf}.1.EncDecAttention", ours + ("cross_attn",))
                out += _rms(f"{hf}.1.layer_norm.weight", ours + ("cross_attn_norm",))
                ff = 2
            out += _mlp(config, f"{hf}.{ff}", ours)
            out += _rms(f"{hf}.{ff}.layer_norm.weight", ours + ("mlp_norm",))
        out += _rms(f"{hs}.final_layer_norm.weight", (stack, "final_layer_norm"))
    if not config.tie_word_embeddings:
        out += linear(f"{hf_prefix}lm_head", ("lm_head",), bias=False)
    return stack_rules(out, layer_stacks(config))


def config_for_checkpoint(hf_config: dict, keys, hf_prefix: str = "", **overrides) -> T5Config:
    """Our config for an HF config plus the keys in the file (an `lm_head.weight` unties the head)."""
    overrides.setdefault("tie_word_embeddings", f"{hf_prefix}lm_head.weight" not in set(keys))
    return T5Config.from_hf(hf_config, **overrides)


def keep_wo_float32(params: dict) -> dict:
    """Cast every FFN `wo` kernel to float32, the rest untouched (HF `_keep_in_fp32_modules = ["wo"]`)."""
    return traverse_util.path_aware_map(lambda path, x: x.astype(np.float32) if "wo" in path else x, params)


def load(path: str, dtype=jnp.float32, *, remat: bool = False, scan_layers: bool = False
         ) -> tuple[T5ForConditionalGeneration, dict]:
    """A `T5ForConditionalGeneration` directory (config.json + safetensors) -> `(model, params)`.

    `dtype` is the storage and compute dtype of the tower, except `wo` (float32); `remat`,
    `scan_layers` as in `TowerConfig`. Missing or unexpected keys raise `CheckpointError` listing both.
    """
    model, params = standalone.load(path, T5ForConditionalGeneration, config_for_checkpoint, rules,
                                    ignore=ignore_patterns(), dtype=dtype, remat=remat, scan_layers=scan_layers)
    return model, keep_wo_float32(params)


def save(params: dict, config: T5Config, path: str, dtype=np.float32) -> None:
    """Write a `T5ForConditionalGeneration` directory (config.json + model.safetensors) for transformers:
    `shared.weight` only for the embeddings, `lm_head.weight` only when the head is untied."""
    standalone.save(path, config.to_hf(), params, rules(config), dtype)


__all__ = ["rules", "ignore_patterns", "config_for_checkpoint", "keep_wo_float32", "load", "save"]
