"""Hugging Face `OPTForCausalLM` <-> our `OPTForCausalLM` parameters.

HF keys (relative to `hf_prefix`, which is `language_model.` inside a BLIP-2 checkpoint):
`model.decoder.embed_tokens.weight`, `model.decoder.embed_positions.weight`,
`model.decoder.project_{in,out}.weight` (only when `word_embed_proj_dim != hidden_size`),
`model.decoder.final_layer_norm.*` (pre-LN models), `model.decoder.layers.{i}.self_attn.{q,k,v,out}_proj.*`,
`...self_attn_layer_norm.*`, `...fc1.*`, `...fc2.*`, `...final_layer_norm.*`, and `lm_head.weight`.

Tied head: transformers writes no `lm_head.weight` when it is tied to `embed_tokens`. When a file
does carry `lm_head.weight`, transformers 5.x keeps it as a separate head (unless it is identical),
so `load` then builds an untied model (`tie_word_embeddings=False`); otherwise the head is tied.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from blip2_jax.convert import standalone
from blip2_jax.convert.rules import Rule, embedding, layer_norm, linear, stack_rules
from blip2_jax.models.opt import OPTConfig, OPTForCausalLM, layer_stacks


def ignore_patterns(hf_prefix: str = "") -> list[str]:
    """Regexes of HF keys an OPT file may hold that we do not need: none (every key must match)."""
    return []


def rules(config: OPTConfig, hf_prefix: str = "") -> list[Rule]:
    """Every parameter of `OPTForCausalLM(config)` with its HF key (`hf_prefix` + key)."""
    d = f"{hf_prefix}model.decoder."
    bias = config.enable_bias
    affine = config.layer_norm_elementwise_affine
    out = embedding(d + "embed_tokens.weight", ("embed_tokens",))
    out += embedding(d + "embed_positions.weight", ("embed_positions",))
    if config.embed_dim != config.hidden_size:
        out += linear(d + "project_in", ("project_in",), bias=False)
        out += linear(d + "project_out", ("project_out",), bias=False)
    if config.has_final_layer_norm and affine:
        out += layer_norm(d + "final_layer_norm", ("final_layer_norm",))
    for i in range(config.num_hidden_layers):
        hf, ours = f"{d}layers.{i}.", (f"layers_{i}",)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += linear(hf + f"self_attn.{proj}", ours + ("self_attn", proj), bias=bias)
        if affine:
            out += layer_norm(hf + "self_attn_layer_norm", ours + ("self_attn_layer_norm",))
            out += layer_norm(hf + "final_layer_norm", ours + ("final_layer_norm",))
        out += linear(hf + "fc1", ours + ("fc1",), bias=bias)
        out += linear(hf + "fc2", ours + ("fc2",), bias=bias)
    if not config.tie_word_embeddings:
        out += linear(f"{hf_prefix}lm_head", ("lm_head",), bias=False)
    return stack_rules(out, layer_stacks(config))


def config_for_checkpoint(hf_config: dict, keys, hf_prefix: str = "", **overrides) -> OPTConfig:
    """Our config for an HF config plus the keys actually in the file (an `lm_head.weight` unties the head)."""
    cfg = OPTConfig.from_hf(hf_config, **overrides)
    if f"{hf_prefix}lm_head.weight" in set(keys) and "tie_word_embeddings" not in overrides:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    return cfg


def load(path: str, dtype=jnp.float32, *, remat: bool = False, scan_layers: bool = False
         ) -> tuple[OPTForCausalLM, dict]:
    """An `OPTForCausalLM` directory (config.json + safetensors) -> `(model, params)`.

    `dtype` is both the storage and the compute dtype of the tower; `remat`, `scan_layers` as in
    `TowerConfig`. Missing or unexpected keys raise `CheckpointError` listing both.
    """
    return standalone.load(path, OPTForCausalLM, config_for_checkpoint, rules, ignore=ignore_patterns(),
                           dtype=dtype, remat=remat, scan_layers=scan_layers)


def save(params: dict, config: OPTConfig, path: str, dtype=np.float32) -> None:
    """Write an `OPTForCausalLM` directory (config.json + model.safetensors) that transformers loads
    (no `lm_head.weight` when the head is tied, as transformers writes it)."""
    standalone.save(path, config.to_hf(), params, rules(config), dtype)
