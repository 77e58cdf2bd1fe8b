"""Hugging Face `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` / `GemmaForCausalLM`
<-> our `DecoderForCausalLM` parameters.

HF keys (relative to `hf_prefix`, which is `language_model.` inside a BLIP-2 checkpoint), the same for
the four families: `model.embed_tokens.weight`, `model.norm.weight`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` (+ `.bias` where the family or config has them),
`model.layers.{i}.mlp.{gate,up,down}_proj.weight` (+ `.bias` with `mlp_bias`),
`model.layers.{i}.{input,post_attention}_layernorm.weight`, and `lm_head.weight` when the head is untied.
Gemma's norm weights are stored as HF stores them (the `1 +` is applied in the model).

Tied head: as for OPT, a file that carries `lm_head.weight` gets an untied model, one without it a
tied one, whatever `tie_word_embeddings` says (transformers writes no head when it is tied).
Older LLaMA files may hold the rotary `inv_freq` buffers: they are ignored (we compute them).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from blip2_jax.convert import standalone
from blip2_jax.convert.rules import Rule, embedding, layer_norm, linear, stack_rules
from blip2_jax.models.decoder import DecoderConfig, DecoderForCausalLM, layer_stacks


def ignore_patterns(hf_prefix: str = "") -> list[str]:
    """Regexes of HF keys a file may hold that we do not need: the rotary buffers of older files."""
    return [r".*rotary_emb\.inv_freq"]


def rules(config: DecoderConfig, hf_prefix: str = "") -> list[Rule]:
    """Every parameter of `DecoderForCausalLM(config)` with its HF key (`hf_prefix` + key)."""
    m = f"{hf_prefix}model."
    out = embedding(m + "embed_tokens.weight", ("embed_tokens",))
    out += layer_norm(m + "norm", ("norm",), bias=False)
    for i in range(config.num_hidden_layers):
        hf, ours = f"{m}layers.{i}.", (f"layers_{i}",)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bias = config.attention_bias if proj == "o_proj" else config.qkv_bias
            out += linear(hf + f"self_attn.{proj}", ours + ("self_attn", proj), bias=bias)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out += linear(hf + f"mlp.{proj}", ours + ("mlp", proj), bias=config.mlp_bias)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out += layer_norm(hf + norm, ours + (norm,), bias=False)
    if not config.tie_word_embeddings:
        out += linear(f"{hf_prefix}lm_head", ("lm_head",), bias=False)
    return stack_rules(out, layer_stacks(config))


def config_for_checkpoint(hf_config: dict, keys, hf_prefix: str = "", **overrides) -> DecoderConfig:
    """Our config for an HF config plus the keys actually in the file (an `lm_head.weight` unties the
    head, its absence ties it)."""
    cfg = DecoderConfig.from_hf(hf_config, **overrides)
    keys = set(keys)
    if keys and "tie_word_embeddings" not in overrides:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=f"{hf_prefix}lm_head.weight" not in keys)
    return cfg


def load(path: str, dtype=jnp.float32, *, remat: bool = False, scan_layers: bool = False
         ) -> tuple[DecoderForCausalLM, dict]:
    """A LLaMA / Mistral / Qwen2 / Gemma `...ForCausalLM` directory (config.json + safetensors, single or
    sharded) -> `(model, params)`; `dtype` is both the storage and the compute dtype; `remat`,
    `scan_layers` as in `TowerConfig`. Missing or unexpected keys raise `CheckpointError` listing both."""
    return standalone.load(path, DecoderForCausalLM, config_for_checkpoint, rules, ignore=ignore_patterns(),
                           dtype=dtype, remat=remat, scan_layers=scan_layers)


def save(params: dict, config: DecoderConfig, path: str, dtype=np.float32) -> None:
    """Write a `...ForCausalLM` directory (config.json + model.safetensors) that transformers loads (no
    `lm_head.weight` when the head is tied, as transformers writes it)."""
    standalone.save(path, config.to_hf(), params, rules(config), dtype)
