"""The BLIP-2 compositions.

The frozen image encoder is pluggable: anything that maps `pixel_values [B, H, W, 3]` to a grid of
feature vectors `[B, N, D]`. `image_encoder` picks it by the type of `Blip2Config.vision`: the EVA /
CLIP ViT (`VisionConfig`, the paper's) or the ImageNet-trained EfficientNet-Lite0
(`EfficientNetConfig`, the demo's). "ViT" below means whichever it is.

- `Blip2Stage1`: ViT + `ln_vision` + Q-Former + the stage-1 heads (ITC projections, ITM head, the
  ITG LM head with its decoder tied to the word embeddings, the ITC temperature). It is also the
  model behind Hugging Face's `Blip2ForImageTextRetrieval` checkpoints (which lack `temp` and the
  ITG head; those start as in a fresh stage 1).
- `Blip2DecoderOnly` / `Blip2T5`: ViT + `ln_vision` + the Q-Former's query path + `language_projection`
  + the frozen LLM (Hugging Face `Blip2ForConditionalGeneration`). `Blip2DecoderOnly` holds any
  decoder-only LLM: OPT (`OPTForCausalLM`) or LLaMA / Mistral / Qwen2 / Gemma (`DecoderForCausalLM`),
  chosen by the type of its text config; with OPT it is the subclass `Blip2OPT` (the name it had).
- InstructBLIP (Hugging Face `InstructBlipForConditionalGeneration`) is the same two compositions with
  an instruction-aware Q-Former (`Blip2Config.instruction_aware`: a text config and a Q-Former with its
  text path): the instruction's tokens (`qformer_input_ids`, the Q-Former's BERT vocabulary) run
  through the Q-Former's self-attention beside the queries, and only the query outputs are projected.

Top-level parameter names are the frozen/trainable boundary: `vision` (and `language_model` in
stage 2) are frozen, everything else trains (`ln_vision` included, as in LAVIS).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.models import decoder, layers, opt, qformer as qformer_lib, t5, vit as vit_lib
from blip2_jax.models.efficientnet import EfficientNetConfig, EfficientNetLite
from blip2_jax.models.layers import Dense, LayerNorm
from blip2_jax.models.qformer import QFormer, QFormerConfig, attention_mask
from blip2_jax.models.stacking import LayerStack, stack_layers
from blip2_jax.models.t5 import T5ForConditionalGeneration
from blip2_jax.models.vit import VisionConfig, VisionTransformer

FROZEN_KEYS = ("vision", "language_model")
_LLM_STACKS = {"OPTConfig": opt.layer_stacks, "T5Config": t5.layer_stacks, "DecoderConfig": decoder.layer_stacks}


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    vision: Union[VisionConfig, EfficientNetConfig] = VisionConfig()  # the frozen image encoder
    qformer: QFormerConfig = QFormerConfig()
    text: Any = None  # OPTConfig / DecoderConfig / T5Config for stage 2, None for stage 1
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    ln_vision_eps: float = 1e-5  # LAVIS ln_vision uses torch's default; HF checkpoints say 1e-6
    temperature_init: float = 0.07
    with_lm_head: bool = True  # the ITG head (stage 1)
    image_token_index: Optional[int] = None  # kept so save_pretrained can write it

    @property
    def instruction_aware(self) -> bool:
        """InstructBLIP: a stage-2 model whose Q-Former reads the instruction beside the queries. A BLIP-2
        stage-2 Q-Former has no text path (`use_text_input=False`, as HF's and LAVIS's)."""
        return self.text is not None and self.qformer.use_text_input

    def __post_init__(self):
        if self.qformer.num_query_tokens != self.num_query_tokens:
            raise ValueError(f"Blip2Config: num_query_tokens {self.num_query_tokens} != qformer.num_query_tokens "
                             f"{self.qformer.num_query_tokens}")
        if self.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ValueError(f"Blip2Config: qformer.encoder_hidden_size {self.qformer.encoder_hidden_size} != "
                             f"vision.hidden_size {self.vision.hidden_size}")


def llm_width(text_config) -> int:
    """The LLM's embedding width (OPT `word_embed_proj_dim`-aware `embed_dim`, T5 `d_model`, the
    others' `hidden_size`)."""
    for name in ("embed_dim", "d_model", "hidden_size"):
        if hasattr(text_config, name):
            return getattr(text_config, name)
    raise ValueError(f"{type(text_config).__name__} has no embedding width field")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`torch.nn.functional.normalize`: x / max(||x||, eps), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def image_encoder(config: Union[VisionConfig, EfficientNetConfig], name: str = "vision") -> nn.Module:
    """The frozen image encoder `config` describes: `pixel_values -> [B, N, hidden_size]`."""
    if isinstance(config, VisionConfig):
        return VisionTransformer(config, name=name)
    if isinstance(config, EfficientNetConfig):
        return EfficientNetLite(config, name=name)
    raise ValueError(f"Blip2Config.vision must be a VisionConfig or EfficientNetConfig, got {type(config).__name__}")


class _ImageQueries(nn.Module):
    """Shared front: frozen ViT -> ln_vision -> learned queries through the Q-Former."""

    config: Blip2Config

    def setup(self):
        cfg = self.config
        self.vision = image_encoder(cfg.vision)
        self.ln_vision = LayerNorm(cfg.ln_vision_eps, name="ln_vision")
        self.query_tokens = self.param(
            "query_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "queries", "embed")),
            (1, cfg.num_query_tokens, cfg.qformer.hidden_size), cfg.qformer.param_dtype)
        self.qformer = QFormer(cfg.qformer, name="qformer")

    def vit_features(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
        """The frozen part: ViT hidden states `[B, N, Dv]` (before ln_vision)."""
        return self.vision(pixel_values, deterministic)

    def image_embeds(self, vit_features: jax.Array) -> jax.Array:
        """`ln_vision` over the ViT features, in float32: what the Q-Former cross-attends to."""
        return self.ln_vision(vit_features.astype(jnp.float32))

    def query_outputs(self, image_embeds: jax.Array, deterministic: bool = True, instruction=None):
        """Learned queries through the Q-Former: `(hidden [B, Q, D], per-layer (k, v))`.

        `instruction`: `(ids [B, T_q], mask [B, T_q])` that share the self-attention with the queries
        (InstructBLIP: every position sees every non-padding position); `hidden` is then the query
        positions' only and the K/V cover queries and instruction."""
        queries = jnp.broadcast_to(self.query_tokens, (image_embeds.shape[0],) + self.query_tokens.shape[1:])
        if instruction is None:
            return self.qformer(query_embeds=queries, image_embeds=image_embeds, deterministic=deterministic)
        ids, mask = instruction
        nq = self.config.num_query_tokens
        hidden, kvs = self.qformer(query_embeds=queries, input_ids=ids, image_embeds=image_embeds,
                                   self_mask=attention_mask("bidirectional", nq, mask), deterministic=deterministic)
        return hidden[:, :nq], kvs


class Blip2Stage1(_ImageQueries):
    """Stage-1 / retrieval model. Public methods: `itc`, `itm` (and `__call__`, which runs all heads)."""

    def setup(self):
        super().setup()
        cfg, qcfg = self.config, self.config.qformer
        if not qcfg.use_text_input:
            raise ValueError("Blip2Stage1 needs qformer.use_text_input=True")
        proj = lambda name: Dense(cfg.image_text_hidden_size, ("embed", None), name=name)  # noqa: E731
        self.vision_proj = proj("vision_proj")
        self.text_proj = proj("text_proj")
        self.itm_head = Dense(2, ("embed", None), name="itm_head")
        if cfg.with_lm_head:
            self.lm_transform = Dense(qcfg.hidden_size, ("embed", "embed2"), name="lm_transform")
            self.lm_transform_ln = LayerNorm(qcfg.layer_norm_eps, name="lm_transform_ln")
            self.lm_bias = self.param("lm_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                                      (qcfg.vocab_size,), jnp.float32)
        self.temp = self.param("temp", lambda _, s: jnp.full(s, cfg.temperature_init, jnp.float32), ())

    # -- features -------------------------------------------------------------------------------
    def image_features(self, image_embeds: jax.Array, deterministic: bool = True):
        """`(normalised per-query ITC features [B, Q, E], query hidden, query K/V cache)`."""
        hidden, kvs = self.query_outputs(image_embeds, deterministic)
        return l2_normalize(self.vision_proj(hidden)), hidden, kvs

    def text_features(self, input_ids: jax.Array, text_mask: jax.Array, deterministic: bool = True):
        """Unimodal text pass: normalised `[CLS]` ITC feature `[B, E]`."""
        mask = attention_mask("unimodal", 0, text_mask)
        hidden, _ = self.qformer(input_ids=input_ids, self_mask=mask, deterministic=deterministic)
        return l2_normalize(self.text_proj(hidden[:, 0]))

    def itm_logits(self, image_embeds: jax.Array, input_ids: jax.Array, text_mask: jax.Array,
                   deterministic: bool = True) -> jax.Array:
        """Bidirectional pass over [queries; text]: ITM head averaged over the query positions `[B, 2]`."""
        nq = self.config.num_query_tokens
        queries = jnp.broadcast_to(self.query_tokens, (input_ids.shape[0],) + self.query_tokens.shape[1:])
        mask = attention_mask("bidirectional", nq, text_mask)
        hidden, _ = self.qformer(query_embeds=queries, input_ids=input_ids, self_mask=mask,
                                 image_embeds=image_embeds, deterministic=deterministic)
        return self.itm_head(hidden[:, :nq]).astype(jnp.float32).mean(axis=1)

    def itg_logits(self, input_ids: jax.Array, text_mask: jax.Array, query_kvs, deterministic: bool = True):
        """Text attending causally to itself and fully to the cached query K/V: LM logits `[B, T, V]`."""
        nq = self.config.num_query_tokens
        full = attention_mask("causal", nq, text_mask)
        hidden, _ = self.qformer(input_ids=input_ids, self_mask=full[:, nq:], past=query_kvs,
                                 deterministic=deterministic)
        h = layers.activation(self.config.qformer.hidden_act)(self.lm_transform(hidden))
        h = self.lm_transform_ln(h)
        return self.qformer.attend_word_embeddings(h) + self.lm_bias

    # -- public API ---------------------------------------------------------------------------------
    def itc(self, pixel_values, input_ids, attention_mask):
        """`[B_img, B_txt]` similarities: max over queries of the cosine (no temperature)."""
        image_embeds = self.image_embeds(self.vit_features(pixel_values))
        image_feats, _, _ = self.image_features(image_embeds)
        text_feats = self.text_features(input_ids, attention_mask)
        return jnp.einsum("iqe,te->itq", image_feats, text_feats).max(axis=-1)

    def itm(self, pixel_values, input_ids, attention_mask):
        """ITM logits `[B, 2]` for the pairs (pixel_values[i], input_ids[i])."""
        return self.itm_logits(self.image_embeds(self.vit_features(pixel_values)), input_ids, attention_mask)

    def __call__(self, pixel_values, input_ids, attention_mask, deterministic: bool = True):
        """All heads at once (used for init): ITC similarities, ITM logits and ITG logits."""
        image_embeds = self.image_embeds(self.vit_features(pixel_values, deterministic))
        image_feats, _, kvs = self.image_features(image_embeds, deterministic)
        text_feats = self.text_features(input_ids, attention_mask, deterministic)
        out = {"itc": jnp.einsum("iqe,te->itq", image_feats, text_feats).max(axis=-1),
               "itm": self.itm_logits(image_embeds, input_ids, attention_mask, deterministic)}
        if self.config.with_lm_head:
            out["itg"] = self.itg_logits(input_ids, attention_mask, kvs, deterministic)
        return out


class _Stage2(_ImageQueries):
    """Common part of the stage-2 models: image -> soft visual prompt in the LLM's width."""

    def setup(self):
        super().setup()
        self.language_projection = Dense(llm_width(self.config.text), ("embed", "llm_embed"),
                                         name="language_projection")

    def visual_prompt(self, pixel_values: jax.Array, deterministic: bool = True, qformer_input_ids=None,
                      qformer_attention_mask=None) -> jax.Array:
        """Projected query outputs `[B, Q, D_llm]`, in the LLM's compute dtype (InstructBLIP: the queries
        read the instruction `qformer_input_ids` too)."""
        instruction = self.instruction(qformer_input_ids, qformer_attention_mask, pixel_values.shape[0])
        image_embeds = self.image_embeds(self.vit_features(pixel_values, deterministic))
        hidden, _ = self.query_outputs(image_embeds, deterministic, instruction)
        return self.language_projection(hidden).astype(self.config.text.dtype)

    def instruction(self, qformer_input_ids, qformer_attention_mask, batch: int):
        """`(ids, mask)` of the Q-Former's instruction, checked against the model (None for BLIP-2); the
        mask defaults to all ones, as in HF."""
        cfg = self.config
        if not cfg.instruction_aware:
            if qformer_input_ids is not None or qformer_attention_mask is not None:
                raise ValueError("qformer_input_ids / qformer_attention_mask given, but this BLIP-2 model's Q-Former "
                                 "takes no instruction (only InstructBLIP checkpoints have one)")
            return None
        if qformer_input_ids is None:
            raise ValueError("an InstructBLIP model needs qformer_input_ids [B, T_q] (the instruction in the "
                             "Q-Former's BERT vocabulary; processor.tokenize_instruction gives it)")
        ids = jnp.asarray(qformer_input_ids, jnp.int32)
        mask = jnp.ones_like(ids) if qformer_attention_mask is None else jnp.asarray(qformer_attention_mask, jnp.int32)
        if ids.ndim != 2 or ids.shape[0] != batch or mask.shape != ids.shape:
            raise ValueError(f"qformer_input_ids {ids.shape} and qformer_attention_mask {mask.shape} must both be "
                             f"[B={batch}, T_q]")
        if ids.shape[1] > cfg.qformer.max_position_embeddings:
            raise ValueError(f"qformer_input_ids has {ids.shape[1]} tokens, more than the Q-Former's "
                             f"max_position_embeddings {cfg.qformer.max_position_embeddings}")
        return ids, mask

    def prompt_inputs(self, prompt: jax.Array, input_ids: jax.Array, text_mask: jax.Array):
        """`[visual prompt; text embeddings]` and the matching mask (all ones over the queries)."""
        embeds = jnp.concatenate([prompt, self.language_model.embed(input_ids).astype(prompt.dtype)], axis=1)
        ones = jnp.ones(prompt.shape[:2], jnp.int32)
        return embeds, jnp.concatenate([ones, text_mask.astype(jnp.int32)], axis=1)


# The decoder-only LLMs: text config type -> (causal LM module, its `init_cache(config, batch, max_len)`).
CAUSAL_LMS = {
    opt.OPTConfig: (opt.OPTForCausalLM, opt.init_cache),
    decoder.DecoderConfig: (decoder.DecoderForCausalLM, decoder.init_cache),
}


def is_decoder_only(text_config) -> bool:
    """Whether a text config describes a decoder-only LLM (OPT, LLaMA & co.), not an encoder-decoder (T5)."""
    return type(text_config) in CAUSAL_LMS


class Blip2DecoderOnly(_Stage2):
    """BLIP-2 with a decoder-only LLM (`CAUSAL_LMS`): `__call__(pixel_values, input_ids, attention_mask)`
    -> text logits `[B, T, V]` (float32), the visual prompt in front of the text. InstructBLIP adds the
    keyword arguments `qformer_input_ids`, `qformer_attention_mask` (`[B, T_q]`)."""

    def setup(self):
        super().setup()
        module, _ = CAUSAL_LMS[type(self.config.text)]
        self.language_model = module(self.config.text, name="language_model")

    def init_cache(self, batch: int, max_len: int):
        """An empty KV cache of the LLM for `max_len` positions (queries + prompt + new tokens)."""
        return CAUSAL_LMS[type(self.config.text)][1](self.config.text, batch, max_len)

    def __call__(self, pixel_values, input_ids, attention_mask, deterministic: bool = True, *,
                 qformer_input_ids=None, qformer_attention_mask=None):
        prompt = self.visual_prompt(pixel_values, deterministic, qformer_input_ids, qformer_attention_mask)
        logits, _ = self.language_model(*self.prompt_inputs(prompt, input_ids, attention_mask),
                                        deterministic=deterministic, logits_to_keep=input_ids.shape[1])
        return logits


class Blip2T5(_Stage2):
    """`__call__(pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)`
    -> decoder logits `[B, T_dec, V]` (float32); InstructBLIP adds `qformer_input_ids`,
    `qformer_attention_mask` as keyword arguments."""

    def setup(self):
        super().setup()
        self.language_model = T5ForConditionalGeneration(self.config.text, name="language_model")

    def encode(self, pixel_values, input_ids, attention_mask, deterministic: bool = True, *,
               qformer_input_ids=None, qformer_attention_mask=None):
        """T5 encoder over `[visual prompt; text]`: `(encoder hidden, encoder mask)`."""
        prompt = self.visual_prompt(pixel_values, deterministic, qformer_input_ids, qformer_attention_mask)
        embeds, mask = self.prompt_inputs(prompt, input_ids, attention_mask)
        return self.language_model.encode(embeds, mask, deterministic=deterministic), mask

    def __call__(self, pixel_values, input_ids, attention_mask, decoder_input_ids,
                 decoder_attention_mask=None, deterministic: bool = True, *, qformer_input_ids=None,
                 qformer_attention_mask=None):
        encoded, mask = self.encode(pixel_values, input_ids, attention_mask, deterministic,
                                    qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask)
        logits, _ = self.language_model.decode(decoder_input_ids, encoded, mask, decoder_attention_mask,
                                               deterministic=deterministic)
        return logits


class Blip2OPT(Blip2DecoderOnly):
    """`Blip2DecoderOnly` with OPT: what `build_model` gives for an `OPTConfig`, under its name from before the
    other decoder-only LLMs. Code that means "any decoder-only LLM" checks `Blip2DecoderOnly` (or "not
    `Blip2T5`"), never `Blip2OPT`."""


def build_model(config: Blip2Config) -> nn.Module:
    """The composition a config describes (stage 2 when it has a text config)."""
    if config.text is None:
        return Blip2Stage1(config)
    if is_decoder_only(config.text):
        return Blip2OPT(config) if isinstance(config.text, opt.OPTConfig) else Blip2DecoderOnly(config)
    kind = type(config.text).__name__
    if kind == "T5Config":
        return Blip2T5(config)
    raise ValueError(f"Blip2Config.text must be an OPTConfig, DecoderConfig or T5Config, got {kind}")


def layer_stacks(config: Blip2Config) -> list[LayerStack]:
    """Every layer stack of the composition `config` describes, where its tree keeps it (`vision`,
    `qformer`, `language_model`), each in the layout its tower config says (`models.stacking`)."""
    stacks = qformer_lib.layer_stacks(config.qformer, ("qformer",))
    if isinstance(config.vision, VisionConfig):  # EfficientNet's blocks differ in shape: never stacked
        stacks = vit_lib.layer_stacks(config.vision, ("vision",)) + stacks
    if config.text is not None:
        stacks += _LLM_STACKS[type(config.text).__name__](config.text, ("language_model",))
    return stacks


def dummy_inputs(model: nn.Module, batch: int = 1, text_len: int = 4, *, abstract: bool = False) -> dict:
    """Keyword inputs of the right kinds for `model.init` (pixels, ids, mask[, decoder ids and mask][, the
    InstructBLIP Q-Former's instruction ids and mask])."""
    size = model.config.vision.image_size
    if abstract:
        pixels = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
        ids = mask = jax.ShapeDtypeStruct((batch, text_len), jnp.int32)
    else:
        pixels = jnp.zeros((batch, size, size, 3), jnp.float32)
        ids, mask = jnp.zeros((batch, text_len), jnp.int32), jnp.ones((batch, text_len), jnp.int32)
    inputs = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
    if isinstance(model, Blip2T5):
        inputs.update(decoder_input_ids=ids, decoder_attention_mask=mask)
    if model.config.instruction_aware:
        inputs.update(qformer_input_ids=ids, qformer_attention_mask=mask)
    return inputs


def abstract_params(model: nn.Module) -> dict:
    """Shapes and dtypes of the model's parameters (nothing is allocated), unboxed."""
    params = jax.eval_shape(lambda inputs: init_params(model, jax.random.PRNGKey(0), inputs),
                            dummy_inputs(model, abstract=True))
    return nn.unbox(params)


def with_scan_layers(config: Blip2Config, scan_layers: bool) -> Blip2Config:
    """`config` with every tower's layers scanned (True) or unrolled (False)."""
    def tower(c):
        return None if c is None else dataclasses.replace(c, scan_layers=scan_layers)

    return dataclasses.replace(config, vision=tower(config.vision), qformer=tower(config.qformer),
                               text=tower(config.text))


def init_params(model: nn.Module, rng: jax.Array, inputs: dict) -> dict:
    """`model.init`'s (boxed) parameters, drawn as the unrolled model draws them whatever the layout: a
    scanned stack gets the unrolled layers' values stacked, so a seed gives the same weights in both
    layouts (a scanned `init` would split its RNG per layer instead), random frozen towers included."""
    twin = type(model)(with_scan_layers(model.config, False))
    params = twin.init({"params": rng, "dropout": rng}, **inputs)["params"]
    return stack_layers(params, [s for s in layer_stacks(model.config) if s.scanned])


def init_fns(model: nn.Module, inputs: dict, frozen_keys: tuple[str, ...] = FROZEN_KEYS):
    """`(init_trainable, init_frozen)`: the two halves of `init_params(model, rng, inputs)` (see
    `split_frozen`), each a pure `rng -> params` that the train loop runs under `eval_shape` and `jit`."""
    def init_all(rng):
        return init_params(model, rng, inputs)

    return (lambda rng: split_frozen(init_all(rng), frozen_keys)[0]), \
        (lambda rng: split_frozen(init_all(rng), frozen_keys)[1])


def split_frozen(params: dict, frozen_keys: tuple[str, ...] = FROZEN_KEYS) -> tuple[dict, dict]:
    """`(trainable, frozen)` by top-level key (`vision`, `language_model` are frozen; a task that trains
    a tower, e.g. with `model.train_vision`, passes the keys it keeps frozen)."""
    frozen = {k: v for k, v in params.items() if k in frozen_keys}
    trainable = {k: v for k, v in params.items() if k not in frozen_keys}
    return trainable, frozen
