"""T5 / FlanT5 encoder-decoder as a Flax linen module, with a fixed-size decoder key/value cache.

Semantics follow Hugging Face `T5ForConditionalGeneration` (transformers 5.x):
- relative position buckets (bidirectional in the encoder, unidirectional in the decoder); the bias
  table lives in the first block of each stack and is shared by all blocks of that stack; the
  cross-attention has no position bias; attention scores are not scaled (scale 1.0);
- RMSNorm (T5's LayerNorm) before each sublayer and after each stack; no biases anywhere;
- feed-forward `"relu"` (`wi`, `wo`) or gated (`"gated-gelu"`: `act(wi_0 x) * wi_1 x`, then `wo`),
  with `dense_act_fn` as the config says (BLIP-2 sets exact `"gelu"`; FlanT5's own is `"gelu_new"`);
- precision: the FFN output projection `wo` is kept in float32 (parameter and matmul) whatever the
  tower's dtype, as HF's `_keep_in_fp32_modules = ["wo"]`; the result is cast back to `dtype`;
- the head: `lm_head` when the checkpoint has its own (FlanT5 does), else the `shared` table; the
  decoder output is multiplied by `d_model**-0.5` only when `scale_decoder_outputs` (original T5).

Cache (`init_cache`): the decoders' fixed-size cache of `layers.init_kv_cache` for the decoder's
self-attention (`{"index": int32[], "mask": int32[B, max_len], "layers": ({"k", "v"}: [B, max_len, H,
d_kv], ...)}`) plus `"cross": None, "encoder_mask": None`. The first `decode` with a cache whose
`"cross"` is None computes every layer's cross-attention K/V from the encoder output once and stores
them (with the encoder mask); later steps reuse them and need no encoder arguments. With a cache,
`decoder_attention_mask` covers only the new tokens. With `scan_layers` the per-layer entries are
stacked instead (`"layers"` and `"cross"`: `{"k", "v"}: [L, B, ...]`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.models.layers import (Dense, Dropout, Embed, KVCache, RMSNorm, TowerConfig, activation,
                                     advance_kv_cache, decoder_mask, dot_product_attention, init_kv_cache, mask_to_bias,
                                     merge_heads, remat_block, scan_blocks, split_heads, write_kv)
from blip2_jax.models.stacking import LayerStack

Dtype = Any
Cache = KVCache


def _split_ff_proj(feed_forward_proj: str) -> tuple[str, bool]:
    """`"gated-gelu"` -> ("gelu_new", True) as HF's T5Config does; `"relu"` -> ("relu", False)."""
    parts = feed_forward_proj.split("-")
    if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
        raise ValueError(f"T5Config: feed_forward_proj {feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    return act, parts[0] == "gated"


@dataclasses.dataclass(frozen=True)
class T5Config(TowerConfig):
    """The fields of Hugging Face's T5Config that change the computation, plus our precision knobs
    (`TowerConfig`).

    `tie_word_embeddings` here means what the module does: True = the head is the `shared` table,
    False = a separate `lm_head` (the converter decides from the checkpoint's keys).
    `scale_decoder_outputs` is transformers 5.x's flag (see `from_hf`).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None  # None: num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: Optional[str] = None  # None: derived from feed_forward_proj
    is_gated_act: Optional[bool] = None  # None: derived from feed_forward_proj
    pad_token_id: Optional[int] = 0
    eos_token_id: Any = 1
    decoder_start_token_id: Optional[int] = 0
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True

    def __post_init__(self):
        super().__post_init__()
        act, gated = _split_ff_proj(self.feed_forward_proj)
        if self.dense_act_fn is None:
            object.__setattr__(self, "dense_act_fn", act)
        if self.is_gated_act is None:
            object.__setattr__(self, "is_gated_act", gated)
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        activation(self.dense_act_fn)  # fails early, naming the activation

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def hidden_size(self) -> int:
        """`d_model` (HF's T5Config alias; `Blip2T5`'s language projection reads `text.hidden_size`)."""
        return self.d_model

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "T5Config":
        """From a Hugging Face `config.json` dict (T5's own, or BLIP-2's `text_config`).

        transformers 5.x semantics: `scale_decoder_outputs` is taken when the dict has it; otherwise
        (configs written before 5.x) it is `tie_word_embeddings is not False`, which is what T5 v1.1 /
        FlanT5 configs (`tie_word_embeddings: false`) relied on. An explicit `dense_act_fn` wins over the
        one derived from `feed_forward_proj` (BLIP-2 sets `"gelu"` with `"gated-gelu"`).
        The head defaults to tied (5.x forces `tie_word_embeddings=True`); `convert.t5` unties it
        when the checkpoint holds `lm_head.weight`.
        """
        kw = cls._hf_fields(d, "t5", exclude=("tie_word_embeddings", "scale_decoder_outputs"))
        if "scale_decoder_outputs" in d:
            kw["scale_decoder_outputs"] = bool(d["scale_decoder_outputs"])
        else:
            kw["scale_decoder_outputs"] = d.get("tie_word_embeddings", None) is not False
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """A `config.json` dict for transformers' `T5ForConditionalGeneration`.

        `tie_word_embeddings` is written equal to `scale_decoder_outputs` so that readers of either
        convention scale alike; whether the head is tied is carried by the weights (`lm_head.weight`
        present or not), which is how transformers 5.x decides too.
        """
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True,
            "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.d_kv, "d_ff": self.d_ff,
            "num_layers": self.num_layers, "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads, "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "dropout_rate": self.dropout_rate, "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": self.feed_forward_proj, "dense_act_fn": self.dense_act_fn,
            "is_gated_act": self.is_gated_act, "pad_token_id": self.pad_token_id, "eos_token_id": eos,
            "decoder_start_token_id": self.decoder_start_token_id,
            "tie_word_embeddings": self.scale_decoder_outputs,
            "scale_decoder_outputs": self.scale_decoder_outputs,
        }


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """Mesh-TensorFlow / HF T5 bucketing of `memory_position - query_position` into `[0, num_buckets)`."""
    rel = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(rel)
    else:
        n = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 as HF computes it; log(0) only occurs where `is_small` picks the exact bucket.
    safe_n = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(safe_n / max_exact) / np.float32(math.log(max_distance / max_exact))
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


def init_cache(config: T5Config, batch: int, max_len: int, dtype: Dtype = None) -> Cache:
    """An empty decoder cache for `max_len` decoder positions; cross-attention K/V are filled by `decode`."""
    self_attention = init_kv_cache(batch, max_len, config.num_decoder_layers, config.num_heads, config.d_kv,
                                   dtype or config.dtype, stacked=config.scan_layers)
    return {**self_attention, "cross": None, "encoder_mask": None}


def layer_stacks(config: T5Config, at: tuple[str, ...] = ()) -> list[LayerStack]:
    """The encoder's and the decoder's blocks: `blocks_{i}` unrolled, `blocks` scanned."""
    return [LayerStack(at + (stack,), "blocks_", n, config.scan_layers, stacked="blocks")
            for stack, n in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers))]


def _cross_kvs(cross) -> Any:
    """The cache's cross-attention entry as the blocks take it: per layer (k, v), or (k, v) stacked."""
    if isinstance(cross, dict):
        return cross["k"], cross["v"]
    return tuple((layer["k"], layer["v"]) for layer in cross)


def _cross_entry(kvs, stacked: bool) -> Any:
    """The inverse of `_cross_kvs`."""
    return {"k": kvs[0], "v": kvs[1]} if stacked else tuple({"k": k, "v": v} for k, v in kvs)


class T5Attention(nn.Module):
    """Multi-head attention without biases or score scaling; K/V computed apart so they can be cached."""

    config: T5Config

    def setup(self):
        c = self.config
        dense = lambda f, axes: Dense(f, axes=axes, use_bias=False, dtype=c.dtype,  # noqa: E731
                                      param_dtype=c.param_dtype)
        self.q = dense(c.inner_dim, ("embed", "heads"))
        self.k = dense(c.inner_dim, ("embed", "heads"))
        self.v = dense(c.inner_dim, ("embed", "heads"))
        self.o = dense(c.d_model, ("heads", "embed"))

    def kv(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
        return split_heads(self.k(source), self.config.num_heads), split_heads(self.v(source), self.config.num_heads)

    def __call__(self, x, k, v, bias, deterministic: bool):
        c = self.config
        q = split_heads(self.q(x), c.num_heads)
        rng = self.make_rng("dropout") if (not deterministic and c.dropout_rate > 0) else None
        out = dot_product_attention(q, k, v, bias, scale=1.0, dropout_rate=c.dropout_rate,
                                    deterministic=deterministic, dropout_rng=rng, dtype=c.dtype, impl=c.attention_impl)
        return self.o(merge_heads(out))


class T5MLP(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        act = activation(c.dense_act_fn)
        dense = lambda name: Dense(c.d_ff, axes=("embed", "mlp"), use_bias=False, dtype=c.dtype,  # noqa: E731
                                   param_dtype=c.param_dtype, name=name)
        h = act(dense("wi_0")(x)) * dense("wi_1")(x) if c.is_gated_act else act(dense("wi")(x))
        h = Dropout(c.dropout_rate)(h, deterministic=deterministic)
        # `wo` in float32 (HF `_keep_in_fp32_modules = ["wo"]`): FlanT5 overflows here in low precision.
        y = Dense(c.d_model, axes=("mlp", "embed"), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                  name="wo")(h.astype(jnp.float32))
        return y.astype(c.dtype)


class T5Block(nn.Module):
    """Self-attention, cross-attention (decoder only), feed-forward; each pre-RMSNorm with a residual."""

    config: T5Config
    is_decoder: bool = False

    def setup(self):
        c = self.config
        norm = lambda: RMSNorm(epsilon=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype)  # noqa: E731
        self.self_attn_norm = norm()
        self.self_attn = T5Attention(c)
        if self.is_decoder:
            self.cross_attn_norm = norm()
            self.cross_attn = T5Attention(c)
        self.mlp_norm = norm()
        self.mlp = T5MLP(c)
        self.dropout = Dropout(c.dropout_rate)

    def __call__(self, x, self_bias, layer_cache, index, cross_bias, encoder_hidden_states, cross_kv,
                 deterministic: bool):
        h = self.self_attn_norm(x)
        k, v, new_cache = write_kv(layer_cache, *self.self_attn.kv(h), index)
        x = x + self.dropout(self.self_attn(h, k, v, self_bias, deterministic), deterministic=deterministic)
        if self.is_decoder:
            h = self.cross_attn_norm(x)
            if cross_kv is None:
                cross_kv = self.cross_attn.kv(encoder_hidden_states)
            x = x + self.dropout(self.cross_attn(h, *cross_kv, cross_bias, deterministic),
                                 deterministic=deterministic)
        x = x + self.dropout(self.mlp(self.mlp_norm(x), deterministic), deterministic=deterministic)
        return x, (new_cache, cross_kv)


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks, the shared relative-position table, the final RMSNorm."""

    config: T5Config
    is_decoder: bool = False

    def setup(self):
        c = self.config
        n = c.num_decoder_layers if self.is_decoder else c.num_layers
        if c.scan_layers:
            b = nn.broadcast
            self.blocks = scan_blocks(T5Block, c, n, in_axes=(b, 0, b, b, b, 0, b), static_argnums=(8,))(
                c, self.is_decoder)
        else:
            block_cls = remat_block(T5Block, c, static_argnums=(8,))
            self.blocks = [block_cls(c, self.is_decoder, name=f"blocks_{i}") for i in range(n)]
        # HF keeps this table in block 0's self-attention; every block of the stack uses its bias.
        self.relative_attention_bias = Embed(c.relative_attention_num_buckets, c.num_heads, axes=(None, "heads"),
                                             dtype=jnp.float32, param_dtype=c.param_dtype)
        self.final_layer_norm = RMSNorm(epsilon=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype)
        self.dropout = Dropout(c.dropout_rate)

    def position_bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        """`[1, H, Tq, Tk]` float32 bias for absolute query and key positions."""
        c = self.config
        buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], not self.is_decoder,
                                           c.relative_attention_num_buckets, c.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x, allowed, q_pos, k_pos, *, caches=None, index=0, cross_bias=None,
                 encoder_hidden_states=None, cross_kvs=None, deterministic=True):
        """`allowed` `[B, Tq, Tk]` boolean self-attention mask; returns (hidden, new caches, cross K/V)."""
        self_bias = self.position_bias(q_pos, k_pos) + mask_to_bias(allowed)[:, None]
        x = self.dropout(x, deterministic=deterministic)
        args = (self_bias, index, cross_bias, encoder_hidden_states)
        x, new_caches, new_cross = self._blocks(x, caches, cross_kvs, args, deterministic)
        x = self.dropout(self.final_layer_norm(x), deterministic=deterministic)
        return x, new_caches, new_cross

    def _blocks(self, x, caches, cross_kvs, args, deterministic):
        """Every block, unrolled or scanned: `(hidden, new self-attention caches, cross K/V)`; per-layer
        tuples unrolled, arrays stacked on the layer axis scanned."""
        self_bias, index, cross_bias, encoder_hidden_states = args
        if self.config.scan_layers:
            x, (new_caches, new_cross) = self.blocks(x, self_bias, caches, index, cross_bias, encoder_hidden_states,
                                                     cross_kvs, deterministic)
            return x, new_caches, new_cross
        new_caches, new_cross = [], []
        for i, block in enumerate(self.blocks):
            x, (layer_cache, kv) = block(x, self_bias, None if caches is None else caches[i], index, cross_bias,
                                         encoder_hidden_states, None if cross_kvs is None else cross_kvs[i],
                                         deterministic)
            new_caches.append(layer_cache)
            new_cross.append(kv)
        return x, tuple(new_caches), tuple(new_cross)


class T5ForConditionalGeneration(nn.Module):
    """T5 encoder-decoder with LM head; methods `embed`, `encode`, `decode`, and `__call__` (both)."""

    config: T5Config

    def setup(self):
        c = self.config
        self.shared = Embed(c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype)
        self.encoder = T5Stack(c, is_decoder=False)
        self.decoder = T5Stack(c, is_decoder=True)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=jnp.float32,
                                 param_dtype=c.param_dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        """`shared` embeddings `[B, T, d_model]` in `dtype`."""
        return self.shared(ids)

    def encode(self, inputs_embeds: jax.Array, attention_mask: Optional[jax.Array] = None, *,
               deterministic: bool = True) -> jax.Array:
        """Encoder output `[B, S, d_model]` in `dtype`; `attention_mask` `[B, S]` (1 = token)."""
        b, s = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        allowed = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (b, s, s))
        pos = jnp.arange(s)
        out, _, _ = self.encoder(inputs_embeds.astype(self.config.dtype), allowed, pos, pos,
                                 deterministic=deterministic)
        return out

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden_states: Optional[jax.Array],
               encoder_attention_mask: Optional[jax.Array], decoder_attention_mask: Optional[jax.Array] = None,
               *, cache: Optional[Cache] = None, deterministic: bool = True) -> tuple[jax.Array, Optional[Cache]]:
        """Decoder logits `[B, T, vocab]` (float32) and the updated cache (None without one).

        Without a cache, `decoder_attention_mask` `[B, T]` (default all ones) masks decoder keys on top
        of the causal mask. With a cache it covers the T new tokens only; once the cache holds the
        cross-attention K/V, `encoder_hidden_states` and `encoder_attention_mask` are not needed.
        """
        c = self.config
        b, t = decoder_input_ids.shape
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones((b, t), jnp.int32)
        decoder_attention_mask = decoder_attention_mask.astype(jnp.int32)
        cross_kvs = None
        if cache is not None and cache["cross"] is not None:
            cross_kvs = _cross_kvs(cache["cross"])
            encoder_attention_mask = cache["encoder_mask"]
        elif encoder_hidden_states is None:
            raise ValueError("T5 decode: encoder_hidden_states is required until the cache holds cross K/V")
        elif encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
        encoder_attention_mask = encoder_attention_mask.astype(jnp.int32)
        cross_bias = mask_to_bias(encoder_attention_mask)[:, None, None, :]

        mask = decoder_mask(decoder_attention_mask, cache)

        x, new_self, new_cross = self.decoder(
            self.embed(decoder_input_ids), mask.allowed, mask.q_pos, mask.k_pos,
            caches=None if cache is None else cache["layers"], index=mask.index, cross_bias=cross_bias,
            encoder_hidden_states=encoder_hidden_states, cross_kvs=cross_kvs, deterministic=deterministic)
        x = x.astype(jnp.float32)
        if c.scale_decoder_outputs:
            x = x * (c.d_model ** -0.5)
        logits = self.shared.attend(x) if c.tie_word_embeddings else self.lm_head(x)

        new_cache = None
        if cache is not None:
            new_cache = {**advance_kv_cache(cache, mask, new_self),
                         "cross": _cross_entry(new_cross, c.scan_layers),
                         "encoder_mask": encoder_attention_mask}
        return logits.astype(jnp.float32), new_cache

    def __call__(self, inputs_embeds: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None,
                 decoder_input_ids: Optional[jax.Array] = None, decoder_attention_mask: Optional[jax.Array] = None,
                 *, input_ids: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        """Encode then decode (teacher forcing): decoder logits `[B, T_dec, vocab]` in float32."""
        if (inputs_embeds is None) == (input_ids is None):
            raise ValueError("T5ForConditionalGeneration: pass exactly one of inputs_embeds and input_ids")
        if decoder_input_ids is None:
            raise ValueError("T5ForConditionalGeneration: decoder_input_ids is required")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        enc = self.encode(inputs_embeds, attention_mask, deterministic=deterministic)
        logits, _ = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask,
                                deterministic=deterministic)
        return logits
