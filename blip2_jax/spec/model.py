"""Config -> model: the one place that builds a model, its tokenizer and its dtypes from a config.

Everything that needs "the model this config describes" comes here: the training stages
(`blip2_jax.train`), a workdir's reload (`blip2_jax.workdir`), the processor and evaluation.

- `build(config) -> Built(model, tokenizer)` for `config.task` "stage1" (`Blip2Stage1`), "stage2"
  (`Blip2DecoderOnly` for OPT, LLaMA, Mistral, Qwen2, Gemma / `Blip2T5`; InstructBLIP with
  `model.instruction_aware`) or "text_lm" (the demo's
  `OPTForCausalLM` / `DecoderForCausalLM` (LLaMA) / `T5ForConditionalGeneration`);
  `model_of(config[, tokenizer])` when the tokenizer is not needed (stage 2 at paper scale);
- `frozen_keys(config)`: the top-level parameter names the run keeps frozen;
- `init_fns(config, model)`: the two halves of `model.init` (trainable, frozen);
- `run_keys(seed)`: the run's init / frozen / train keys (a random frozen tower is re-drawn from the
  frozen key by whoever needs it again: the train loop, a workdir reload);
- `DTYPES` / `dtype(name)`: the dtype names configs may use; `FROZEN_DTYPES` / `frozen_compute_dtype`
  / `is_int8`: those of `model.frozen_dtype`, which may also be "int8" (the frozen towers' matrices
  stored as int8 with per-channel scales and run in bfloat16, `blip2_jax.models.quant`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.convert import blip2 as hf_blip2
from blip2_jax.convert.hf_io import CheckpointReader
from blip2_jax.data import text as data_text
from blip2_jax.models.blip2 import Blip2Config, build_model, dummy_inputs
from blip2_jax.models.blip2 import init_fns as split_init_fns
from blip2_jax.models.decoder import FAMILIES, DecoderConfig, DecoderForCausalLM
from blip2_jax.models.efficientnet import EfficientNetConfig
from blip2_jax.models import layers, quant
from blip2_jax.models.layers import ATTENTION_IMPLS, REMAT_POLICIES
from blip2_jax.models.opt import OPTConfig, OPTForCausalLM
from blip2_jax.models.qformer import QFormerConfig
from blip2_jax.models.t5 import T5Config, T5ForConditionalGeneration
from blip2_jax.models.vit import VisionConfig

# The dtype names a config may give a tower: `layers.DTYPES` (the one table) without float16, which
# FlanT5 and the frozen towers do not tolerate.
DTYPES = {name: layers.DTYPES[name] for name in ("float32", "bfloat16")}
# `model.frozen_dtype` may also be "int8": weight-only int8 storage, bfloat16 compute (`models.quant`).
INT8 = "int8"
FROZEN_DTYPES = (*DTYPES, INT8)
TASKS = ("stage1", "stage2", "text_lm")
LLMS = ("opt", "t5", *FAMILIES)  # `model.llm`: the LLM's HF model_type (stage 2)
TEXT_LM_LLMS = ("opt", "llama", "t5")  # the demo's text LM


def dtype(name: str, field: str = "model.frozen_dtype"):
    """The jnp dtype a config names; the error names the field and the choices."""
    if name not in DTYPES:
        raise ValueError(f"config.{field}={name!r}: expected one of {tuple(DTYPES)}")
    return DTYPES[name]


def check_frozen_dtype(name: str, field: str = "model.frozen_dtype") -> str:
    """`name` if it is a frozen-tower dtype name (`FROZEN_DTYPES`); the error names the field and the choices."""
    if name not in FROZEN_DTYPES:
        raise ValueError(f"config.{field}={name!r}: expected one of {FROZEN_DTYPES}")
    return name


def frozen_compute_dtype(name: str, field: str = "model.frozen_dtype"):
    """The jnp dtype the frozen towers run (and keep their unquantised leaves) in: bfloat16 for "int8"."""
    return DTYPES["bfloat16"] if check_frozen_dtype(name, field) == INT8 else DTYPES[name]


def is_int8(config) -> bool:
    """Whether `config`'s frozen towers are int8 weight-only quantised (`model.frozen_dtype="int8"`)."""
    return config.model.get("frozen_dtype", "") == INT8


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(init_key, frozen_key, train_key)` of a run with this seed: the fresh trainable init, the random
    frozen towers (whoever re-draws them must use this key) and the step RNG."""
    root = jax.random.PRNGKey(int(seed))
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)


@dataclasses.dataclass(frozen=True)
class Built:
    model: nn.Module
    tokenizer: Any  # stage 1: BERT + [DEC]; stage 2 / text LM: the LLM's


def _task(config) -> str:
    task = config.get("task", "")
    if task not in TASKS:
        raise ValueError(f"config.task={task!r}: expected one of {TASKS}")
    return task


def tokenizer(config, path: str = ""):
    """The tokenizer of `config.data.tokenizer_path` (or `path`): BERT + [DEC] for stage 1, the LLM's
    otherwise."""
    path = path or config.data.tokenizer_path
    return data_text.load_bert_tokenizer(path) if _task(config) == "stage1" else data_text.load_tokenizer(path)


def build(config, tokenizer_path: str = "") -> Built:
    """The model `config` describes and its tokenizer (see the module docstring)."""
    tok = tokenizer(config, tokenizer_path)
    return Built(model_of(config, tok), tok)


def model_of(config, tok=None) -> nn.Module:
    """The model `config` describes. `tok` is needed where the config defers to the tokenizer (a stage-1
    `qformer.vocab_size` of 0, the text LM's vocabulary and EOS); stage 2 builds without one."""
    task = _task(config)
    if task == "stage1":
        return build_model(stage1_config(config, vocab_size=None if tok is None else len(tok)))
    if task == "stage2":
        return build_model(stage2_config(config))
    if tok is None:
        raise ValueError("the text LM's config takes its vocabulary from the tokenizer: pass it")
    cfg = text_lm_config(config, tok)
    if isinstance(cfg, DecoderConfig):
        return DecoderForCausalLM(cfg)
    return OPTForCausalLM(cfg) if isinstance(cfg, OPTConfig) else T5ForConditionalGeneration(cfg)


def frozen_keys(config) -> tuple[str, ...]:
    """The top-level parameter names this run keeps frozen (`model.train_vision` trains the ViT)."""
    task = _task(config)
    if task == "text_lm":
        return ()
    towers = ("vision",) if task == "stage1" else ("vision", "language_model")
    return tuple(k for k in towers if not (k == "vision" and config.model.train_vision))


def init_fns(config, model: nn.Module):
    """`(init_trainable, init_frozen)`: pure `rng -> params` halves of `model.init` for this config. With
    `model.frozen_dtype="int8"`, `init_frozen` gives the frozen towers' matrices int8-quantised (drawn
    in bfloat16, then quantised: `quant.quantized_init`), the shape every frozen tree of the run has."""
    init_trainable, init_frozen = split_init_fns(model, dummy_inputs(model), frozen_keys=frozen_keys(config))
    if is_int8(config) and frozen_keys(config):
        init_frozen = quant.quantized_init(init_frozen)
    return init_trainable, init_frozen


# -- model configs ------------------------------------------------------------------------------
def layer_knobs(config, remat: bool) -> dict:
    """A tower's layer-stack fields from `config.model`: `scan_layers`, and `remat` as the policy
    `model.remat_policy` when the tower's own switch `remat` is on (False otherwise). Configs recorded
    before these fields existed read as unrolled, "full"."""
    m = config.model
    policy = m.get("remat_policy", "full")
    if policy not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat_policy={policy!r}: expected one of {tuple(REMAT_POLICIES)}")
    impl = m.get("attention_impl", "xla")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"config.model.attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}")
    return dict(scan_layers=bool(m.get("scan_layers", False)), remat=policy if remat else False,
                attention_impl=impl)


def _vision(config) -> VisionConfig | EfficientNetConfig:
    """The frozen image encoder's config: a ViT (`model.vision.style` "eva" / "clip") or EfficientNet-Lite0
    (`style="efficientnet_lite0"`, with only `image_size` and `with_head` to choose)."""
    m = config.model
    vision_dtype = jnp.float32 if m.train_vision else frozen_compute_dtype(m.frozen_dtype)  # a trained ViT: float32
    fields = dict(m.vision.items())
    if fields.get("style") == EfficientNetConfig.style:
        if m.train_vision:  # its BatchNorm statistics are fixed: fine-tuning it needs a train mode
            raise ValueError("config.model.train_vision=True: EfficientNet-Lite0 is a frozen-only encoder here")
        fields.pop("remat", None)  # a frozen, forward-only tower: nothing to rematerialise
        return EfficientNetConfig(**fields, dtype=vision_dtype, param_dtype=vision_dtype)
    fields.update(layer_knobs(config, fields.pop("remat", False)))
    return VisionConfig(**fields, dtype=vision_dtype, param_dtype=vision_dtype)


def stage1_config(config, vocab_size: int | None = None) -> Blip2Config:
    """Our `Blip2Config` from `config.model` (`qformer.vocab_size = 0` means: the tokenizer's size)."""
    m = config.model
    vision = _vision(config)
    q = dict(m.qformer.items())
    if not q["vocab_size"]:
        if vocab_size is None:
            raise ValueError("config.model.qformer.vocab_size = 0 needs the tokenizer (config.data.tokenizer_path)")
        q["vocab_size"] = vocab_size
    qformer = QFormerConfig(**q, num_query_tokens=m.num_query_tokens, encoder_hidden_size=vision.hidden_size,
                            **layer_knobs(config, m.remat))
    return Blip2Config(vision=vision, qformer=qformer, num_query_tokens=m.num_query_tokens,
                       image_text_hidden_size=m.embed_dim, ln_vision_eps=m.ln_vision_eps,
                       temperature_init=m.temperature_init, with_lm_head=True)


def read_hf_config(path: str) -> dict:
    """`config.json` of a Hugging Face directory, with an error naming the file when it is missing."""
    name = os.path.join(path, "config.json")
    if not os.path.exists(name):
        raise FileNotFoundError(f"{name} does not exist (expected a Hugging Face model directory)")
    with open(name) as f:
        return json.load(f)


def text_config(config):
    """The frozen LLM's `OPTConfig` / `DecoderConfig` / `T5Config`: from `init.llm_checkpoint`'s
    config.json (and which weights the file holds: an `lm_head.weight` unties the head), else from
    `model.text` (HF names)."""
    m = config.model
    frozen = frozen_compute_dtype(m.frozen_dtype)
    path = config.init.llm_checkpoint
    if path:
        hf = read_hf_config(path)
        with CheckpointReader(path) as reader:
            keys = reader.keys()
    else:
        hf, keys = dict(m.text), ()
        if not hf:
            raise ValueError("config.init.llm_checkpoint is empty and config.model.text gives no LLM config")
    kind = hf.get("model_type")
    if kind != m.llm:
        raise ValueError(f"config.model.llm is {m.llm!r} but the LLM config ({path or 'config.model.text'}) "
                         f"has model_type {kind!r}")
    overrides = dict(dtype=frozen, param_dtype=frozen, **layer_knobs(config, m.llm_remat))
    if not path and hf.get("tie_word_embeddings") is False:
        overrides["tie_word_embeddings"] = False  # a checkpoint says so by holding lm_head.weight
    if kind == "t5" and m.t5_dense_act_fn:
        overrides["dense_act_fn"] = m.t5_dense_act_fn
    return hf_blip2.text_converter(hf).config_for_checkpoint(hf, keys, **overrides)


def stage2_config(config) -> Blip2Config:
    """Our `Blip2Config` (vision, query-path Q-Former, LLM) from `config.model` and `config.init`."""
    m = config.model
    if m.llm not in LLMS:
        raise ValueError(f"config.model.llm must be one of {LLMS}, got {m.llm!r}")
    vision = _vision(config)
    instruct = bool(m.get("instruction_aware", False))  # configs recorded before it existed: BLIP-2
    qformer = QFormerConfig(**dict(m.qformer.items()), **(_qformer_text(config) if instruct else {}),
                            num_query_tokens=m.num_query_tokens, encoder_hidden_size=vision.hidden_size,
                            use_text_input=instruct, **layer_knobs(config, m.remat))
    return Blip2Config(vision=vision, qformer=qformer, text=text_config(config),
                       num_query_tokens=m.num_query_tokens, ln_vision_eps=m.ln_vision_eps, with_lm_head=False)


def _qformer_text(config) -> dict:
    """InstructBLIP's Q-Former text-path sizes (`model.qformer_text`); vocab_size 0 = the Q-Former tokenizer's."""
    fields = dict(config.model.qformer_text)
    if not fields["vocab_size"]:
        path = config.data.get("qformer_tokenizer_path", "")
        if not path:
            raise ValueError("config.model.qformer_text.vocab_size = 0 takes the vocabulary of "
                             "config.data.qformer_tokenizer_path, which is empty")
        fields["vocab_size"] = len(data_text.load_bert_tokenizer(path))
    return fields


def text_lm_config(config, tok):
    """The demo LM's `OPTConfig` / `DecoderConfig` (LLaMA) / `T5Config` from `config.model.text` (HF field
    names; vocab_size 0 = the tokenizer's). A decoder-only LM's EOS becomes the id of "\\n", as in BLIP-2's
    OPT configs: the demo's captions and answers end with it, and `generate` stops there."""
    m = config.model
    fields = dict(m.text)
    if not fields.get("vocab_size"):
        fields["vocab_size"] = len(tok)
    dt = dtype(m.dtype, "model.dtype")
    knobs = dict(dtype=dt, param_dtype=dt, **layer_knobs(config, False))
    if m.llm in ("opt", "llama"):
        newline = tok.encode("\n", add_special_tokens=False)
        if len(newline) != 1:
            raise ValueError(f"{config.data.tokenizer_path}: '\\n' must be one token, got {newline}")
        fields["eos_token_id"] = newline[0]
        if m.llm == "llama":
            fields.update(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
            return DecoderConfig.from_hf(fields, **knobs)
        return OPTConfig.from_hf(fields, **knobs)
    if m.llm == "t5":  # an untied head (as FlanT5) unless the fields say tied
        return T5Config.from_hf(fields, **knobs, tie_word_embeddings=fields.get("tie_word_embeddings", True) is not False)
    raise ValueError(f"config.model.llm must be one of {TEXT_LM_LLMS} for the text LM, got {m.llm!r}")
