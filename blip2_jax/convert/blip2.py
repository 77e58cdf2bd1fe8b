"""Hugging Face BLIP-2 <-> blip2_jax: configs and key maps for the vision tower, the Q-Former and heads.

Checkpoints handled (`config.json` + safetensors, single or sharded):
- `Blip2ForImageTextRetrieval` -> `Blip2Stage1` (no `temp` / ITG head in the file: they start fresh);
- `Blip2ForConditionalGeneration` with an OPT, LLaMA, Mistral, Qwen2 or Gemma text config ->
  `Blip2DecoderOnly`, with a T5 one -> `Blip2T5`;
- `InstructBlipForConditionalGeneration` (FlanT5, Vicuna/LLaMA and the other decoder-only LLMs) ->
  the same classes with an instruction-aware Q-Former (`Blip2Config.instruction_aware`): the same key
  maps, with the Q-Former's own text embeddings under `qformer.embeddings.` (its LayerNorm there too).
The LLM key maps come from `convert/opt.py`, `convert/decoder.py` and `convert/t5.py`, under the
`language_model.` prefix.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.convert import decoder, opt, t5
from blip2_jax.convert.hf_io import CheckpointReader, write_hf_dir
from blip2_jax.convert.merge import merge_params
from blip2_jax.convert.rules import (CONV, IDENTITY, Rule, check_keys, embedding, layer_norm, linear, load_rules,
                                     prefixed, reshape, save_rules, stack_rules)
from blip2_jax.models import qformer as qformer_model, vit as vit_model
from blip2_jax.models.blip2 import Blip2Config, Blip2Stage1, abstract_params, build_model, is_decoder_only
from blip2_jax.models.decoder import FAMILIES
from blip2_jax.models.qformer import QFormerConfig
from blip2_jax.models.vit import VisionConfig

# What our stage-1 model has that HF retrieval checkpoints lack (they start as in a fresh stage 1).
STAGE1_ONLY = ("temp", "lm_transform", "lm_transform_ln", "lm_bias")
# Keys in HF files that carry no information for us.
IGNORED_HF_KEYS = (r".*position_ids",)


# -- configs ------------------------------------------------------------------------------------
def vision_config_from_hf(d: dict, **overrides) -> VisionConfig:
    return VisionConfig(
        style="eva", hidden_size=d.get("hidden_size", 1408), intermediate_size=d.get("intermediate_size", 6144),
        num_layers=d.get("num_hidden_layers", 39), num_heads=d.get("num_attention_heads", 16),
        image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 14),
        layer_norm_eps=d.get("layer_norm_eps", 1e-6), hidden_act=d.get("hidden_act", "gelu"),
        attention_dropout=d.get("attention_dropout", 0.0), **overrides)


def vision_config_to_hf(c: VisionConfig) -> dict:
    if c.style != "eva":
        raise ValueError("Hugging Face Blip2VisionConfig describes the EVA-style tower only (CLIP ViT-L has "
                         "biased k projections and ln_pre, which Blip2VisionModel cannot express)")
    return dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, image_size=c.image_size, patch_size=c.patch_size,
                layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act, attention_dropout=c.attention_dropout,
                qkv_bias=True, model_type="blip_2_vision_model")


def qformer_config_from_hf(d: dict, num_query_tokens: int, **overrides) -> QFormerConfig:
    return QFormerConfig(
        hidden_size=d.get("hidden_size", 768), num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12), intermediate_size=d.get("intermediate_size", 3072),
        hidden_act=d.get("hidden_act", "gelu"), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        hidden_dropout=d.get("hidden_dropout_prob", 0.1), attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=d.get("max_position_embeddings", 512), vocab_size=d.get("vocab_size", 30522),
        pad_token_id=d.get("pad_token_id", 0), cross_attention_frequency=d.get("cross_attention_frequency", 2),
        encoder_hidden_size=d.get("encoder_hidden_size", 1408), num_query_tokens=num_query_tokens,
        use_text_input=d.get("use_qformer_text_input", False), **overrides)


def qformer_config_to_hf(c: QFormerConfig) -> dict:
    return dict(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                intermediate_size=c.intermediate_size, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
                hidden_dropout_prob=c.hidden_dropout, attention_probs_dropout_prob=c.attention_dropout,
                max_position_embeddings=c.max_position_embeddings, vocab_size=c.vocab_size,
                pad_token_id=c.pad_token_id, cross_attention_frequency=c.cross_attention_frequency,
                encoder_hidden_size=c.encoder_hidden_size, use_qformer_text_input=c.use_text_input,
                model_type="blip_2_qformer")


# HF text `model_type` -> the converter of that LLM.
TEXT_CONVERTERS = {"opt": opt, "t5": t5, **{kind: decoder for kind in FAMILIES}}


def text_converter(text_config_dict_or_config):
    """`convert/opt.py`, `convert/decoder.py` or `convert/t5.py` for a text config (HF dict or ours)."""
    if isinstance(text_config_dict_or_config, dict):
        kind = text_config_dict_or_config.get("model_type", "opt")
    else:
        kind = {"OPTConfig": "opt", "T5Config": "t5"}.get(type(text_config_dict_or_config).__name__)
        kind = kind or getattr(text_config_dict_or_config, "model_type", None)
    if kind not in TEXT_CONVERTERS:
        raise ValueError(f"text_config.model_type {kind!r} is not supported ({', '.join(TEXT_CONVERTERS)})")
    return TEXT_CONVERTERS[kind]


def text_config_from_hf(d: dict, keys=(), dtype=jnp.float32, **overrides):
    """OPTConfig, DecoderConfig or T5Config for a Blip2 `text_config` dict and the keys present in the file
    (whether the file stores its own LM head decides tying)."""
    return text_converter(d).config_for_checkpoint(d, keys, hf_prefix="language_model.", dtype=dtype,
                                                   param_dtype=dtype, **overrides)


def is_instructblip(d: dict) -> bool:
    """Whether a config.json dict describes an InstructBLIP (`InstructBlipForConditionalGeneration`)."""
    return "InstructBlipForConditionalGeneration" in (d.get("architectures") or []) or \
        d.get("model_type") == "instructblip"


def architecture(d: dict) -> str:
    """"retrieval", "generation" (BLIP-2 with an LLM) or "instruct" (InstructBLIP) for a config.json dict."""
    archs = d.get("architectures") or []
    if "Blip2ForImageTextRetrieval" in archs:
        return "retrieval"
    if is_instructblip(d):
        return "instruct"
    if "Blip2ForConditionalGeneration" in archs or d.get("text_config"):
        return "generation"
    raise ValueError(f"config.json architectures {archs} is not a BLIP-2 model this project loads "
                     "(Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration or "
                     "Blip2ForImageTextRetrieval)")


def config_from_hf(d: dict, keys=(), *, dtype=jnp.float32, frozen_dtype=None, scan_layers: bool = False) -> Blip2Config:
    """Our `Blip2Config` from a Hugging Face `config.json` dict.

    `dtype` is the storage/compute dtype of the trainable part; `frozen_dtype` (default `dtype`) that
    of the frozen towers (ViT and LLM); `scan_layers` builds every tower with its layers scanned.
    """
    frozen_dtype = frozen_dtype or dtype
    nq = d.get("num_query_tokens", 32)
    vision = vision_config_from_hf(d.get("vision_config", {}), dtype=frozen_dtype, param_dtype=frozen_dtype,
                                   scan_layers=scan_layers)
    kind = architecture(d)
    # The Q-Former's text path: BLIP-2 with an LLM has none, InstructBLIP reads its instruction with it.
    qcfg = dict(d.get("qformer_config", {}))
    if kind != "retrieval":
        qcfg["use_qformer_text_input"] = kind == "instruct"
    qformer = qformer_config_from_hf(qcfg, nq, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    text = None
    if kind != "retrieval":
        text = text_config_from_hf(d["text_config"], keys, frozen_dtype, scan_layers=scan_layers)
    return Blip2Config(vision=vision, qformer=qformer, text=text, num_query_tokens=nq,
                       image_text_hidden_size=d.get("image_text_hidden_size", 256),
                       ln_vision_eps=vision.layer_norm_eps, with_lm_head=False,
                       image_token_index=d.get("image_token_index"))


# -- key maps -----------------------------------------------------------------------------------
def vision_rules(c: VisionConfig, hf_prefix: str = "vision_model.", ln_vision: bool = True) -> list[Rule]:
    """EVA tower as HF `Blip2VisionModel` stores it (fused qkv with a zero k bias)."""
    d = c.hidden_size
    rules = [
        Rule("embeddings.class_embedding", ("embeddings", "class_embedding"), reshape((d,), (1, 1, d))),
        Rule("embeddings.patch_embedding.weight", ("embeddings", "patch_kernel"), CONV),
        Rule("embeddings.patch_embedding.bias", ("embeddings", "patch_bias")),
        Rule("embeddings.position_embedding", ("embeddings", "position_embedding")),
    ]
    for i in range(c.num_layers):
        hf, ours = f"encoder.layers.{i}.", (f"layers_{i}",)
        attn = ours + ("attention",)
        for j, name in enumerate(("query", "key", "value")):
            rules.append(Rule(hf + "self_attn.qkv.weight", attn + (name, "kernel"), linear("", ())[0].transform, (j, 3)))
        rules.append(Rule(hf + "self_attn.qkv.bias", attn + ("query", "bias"), IDENTITY, (0, 3)))
        rules.append(Rule(hf + "self_attn.qkv.bias", attn + ("value", "bias"), IDENTITY, (2, 3)))
        rules += linear(hf + "self_attn.projection", attn + ("out",))
        rules += layer_norm(hf + "layer_norm1", ours + ("norm1",))
        rules += layer_norm(hf + "layer_norm2", ours + ("norm2",))
        rules += linear(hf + "mlp.fc1", ours + ("fc1",))
        rules += linear(hf + "mlp.fc2", ours + ("fc2",))
    rules = prefixed(stack_rules(rules, vit_model.layer_stacks(c)), hf_prefix, ("vision",))
    if ln_vision:
        rules += layer_norm(hf_prefix + "post_layernorm", ("ln_vision",))
    return rules


def qformer_rules(c: QFormerConfig, hf_prefix: str = "qformer.", embeddings_prefix: str = "embeddings.",
                  layernorm: str = "qformer.layernorm") -> list[Rule]:
    """HF `Blip2QFormerModel` (+ the retrieval model's `embeddings.*` text embeddings); InstructBLIP's
    Q-Former keeps its text embeddings and the LayerNorm under `qformer.embeddings.` (`instruct_qformer_rules`)."""
    rules = layer_norm(layernorm, ("qformer", "layernorm"))
    if c.use_text_input:
        rules += embedding(embeddings_prefix + "word_embeddings.weight", ("qformer", "word_embeddings"))
        rules += embedding(embeddings_prefix + "position_embeddings.weight", ("qformer", "position_embeddings"))
    for i in range(c.num_layers):
        hf, ours = f"{hf_prefix}encoder.layer.{i}.", ("qformer", f"layer_{i}")
        blocks = [("attention", "attention")]
        if c.has_cross_attention(i):
            blocks.append(("crossattention", "crossattention"))
        for hf_name, our_name in blocks:
            for proj in ("query", "key", "value"):
                rules += linear(f"{hf}{hf_name}.attention.{proj}", ours + (our_name, proj))
            rules += linear(f"{hf}{hf_name}.output.dense", ours + (f"{our_name}_output", "dense"))
            rules += layer_norm(f"{hf}{hf_name}.output.LayerNorm", ours + (f"{our_name}_output", "LayerNorm"))
        ffns = [("intermediate_query", "output_query", "query_ffn")]
        if c.use_text_input:
            ffns.append(("intermediate", "output", "text_ffn"))
        for hf_in, hf_out, our in ffns:
            rules += linear(f"{hf}{hf_in}.dense", ours + (our, "intermediate"))
            rules += linear(f"{hf}{hf_out}.dense", ours + (our, "output", "dense"))
            rules += layer_norm(f"{hf}{hf_out}.LayerNorm", ours + (our, "output", "LayerNorm"))
    return stack_rules(rules, qformer_model.layer_stacks(c, ("qformer",)))


def instruct_qformer_rules(c: QFormerConfig) -> list[Rule]:
    """HF `InstructBlipQFormerModel`: the BLIP-2 Q-Former's keys with its embeddings inside it."""
    return qformer_rules(c, embeddings_prefix="qformer.embeddings.", layernorm="qformer.embeddings.layernorm")


def text_rules(text_config: Any, hf_prefix: str = "language_model.") -> list[Rule]:
    return prefixed(text_converter(text_config).rules(text_config, hf_prefix=hf_prefix), "", ("language_model",))


def rules(config: Blip2Config) -> list[Rule]:
    """Every HF key of the checkpoint `config` describes, with its place in our tree."""
    out = vision_rules(config.vision)
    out.append(Rule("query_tokens", ("query_tokens",)))
    out += instruct_qformer_rules(config.qformer) if config.instruction_aware else qformer_rules(config.qformer)
    if config.text is None:
        out += linear("vision_projection", ("vision_proj",))
        out += linear("text_projection", ("text_proj",))
        out += linear("itm_head", ("itm_head",))
    else:
        out += linear("language_projection", ("language_projection",))
        out += text_rules(config.text)
    return out


def config_to_hf(config: Blip2Config) -> dict:
    """A `config.json` dict that transformers 5.x loads into the matching Blip2 / InstructBlip class."""
    d = dict(
        model_type="blip-2", num_query_tokens=config.num_query_tokens,
        vision_config=vision_config_to_hf(config.vision), qformer_config=qformer_config_to_hf(config.qformer),
        initializer_factor=1.0, initializer_range=0.02,
    )
    if config.instruction_aware:
        d["model_type"] = "instructblip"
        d["vision_config"]["model_type"] = "instructblip_vision_model"
        d["qformer_config"]["model_type"] = "instructblip_qformer"
    if config.text is None:
        d["architectures"] = ["Blip2ForImageTextRetrieval"]
        d["image_text_hidden_size"] = config.image_text_hidden_size
        d["qformer_config"]["use_qformer_text_input"] = True
    else:
        d["architectures"] = ["InstructBlipForConditionalGeneration" if config.instruction_aware
                              else "Blip2ForConditionalGeneration"]
        d["text_config"] = config.text.to_hf()
        d["use_decoder_only_language_model"] = is_decoder_only(config.text)
        # transformers 5.x scatters the queries into image-token positions: it needs the id.
        index = config.image_token_index
        if index is None:
            # HF looks the placeholder up in the embedding table before scattering the queries in, so
            # it must be a valid row; the last one is the usual unused padding row of hub vocabularies.
            index = d["text_config"]["vocab_size"] - 1
        d["image_token_index"] = index
    return d


# -- whole directories ----------------------------------------------------------------------------
def load(path: str, *, dtype: Any = jnp.float32, frozen_dtype: Any = None,
         scan_layers: bool = False) -> tuple[nn.Module, dict]:
    """`(model, params)` of a Hugging Face BLIP-2 directory, read tensor by tensor from safetensors.

    `dtype`: parameters/compute of the trainable part; `frozen_dtype` (default `dtype`): the frozen
    ViT and LLM; `scan_layers`: every tower's layers scanned (stacked parameters, the same rules).
    A retrieval checkpoint carries no ITC temperature: it starts at its init value.
    """
    with CheckpointReader(path) as reader:
        config = config_from_hf(reader.config, reader.keys(), dtype=dtype, frozen_dtype=frozen_dtype,
                                scan_layers=scan_layers)
        model = build_model(config)
        rs = rules(config)
        check_keys(rs, reader.keys(), ignore=IGNORED_HF_KEYS, source=path)
        tree = load_rules(reader.get, rs, source=path)
    if isinstance(model, Blip2Stage1):
        tree["temp"] = np.float32(config.temperature_init)
    return model, merge_params(abstract_params(model), tree, source=path)


def save(model: nn.Module, params: dict, path: str, *, dtype: Any = np.float32) -> None:
    """Write `path/config.json` + `path/model.safetensors` that transformers 5.x loads into the
    matching Blip2 / InstructBlip class and runs with the same outputs."""
    config: Blip2Config = model.config
    if config.text is None and not config.qformer.use_text_input:
        raise ValueError("a retrieval checkpoint needs the Q-Former's text path (use_text_input=True)")
    params = {k: v for k, v in params.items() if k not in STAGE1_ONLY}
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), dtype=np.float32), params)
    tensors = save_rules(host, rules(config), dtype=dtype)
    hf_config = config_to_hf(config)
    hf_config["torch_dtype"] = np.dtype(dtype).name
    write_hf_dir(path, hf_config, tensors)
