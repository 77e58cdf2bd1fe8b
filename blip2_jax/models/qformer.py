"""The Q-Former: a BERT whose first `num_queries` positions are learned queries.

One forward pass runs over `[queries; text]` (either part may be absent):
- embeddings: text gets word + absolute position embeddings (positions start at 0 for the text);
  the queries (no position embedding) are prepended and one LayerNorm covers the concatenation;
- every layer: self-attention over all positions with an additive mask (see `attention_mask`),
  optionally in front of cached query keys/values; cross-attention to the image features for the
  query positions only, every `cross_attention_frequency` layers (layers 0, f, 2f, ...); then the
  query positions go through the query FFN, the text positions through the text FFN. With
  `scan_layers` the layers run as one `nn.scan` over groups of f layers (`QFormerGroup`).
Post-LN blocks as BERT: `LN(x + dropout(dense(sublayer(x))))`.

The three BLIP-2 masks are all expressed by `attention_mask(kind, ...)`:
- "bidirectional" (ITM): every position sees every (non-padding) position;
- "causal" (ITG, multimodal causal): queries see queries; text sees all queries and earlier text;
- "unimodal" (ITC): queries see only queries, text only text (ITC runs the two halves as separate
  passes, which is the same computation without the wasted half).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.models import layers
from blip2_jax.models.layers import Dense, Embed, LayerNorm, TowerConfig
from blip2_jax.models.stacking import LayerStack

MASK_FILL = -10000.0  # BERT/LAVIS additive mask value (not finfo.min)
KV = tuple[jax.Array, jax.Array]  # (keys, values), each [B, T, H, Dh]


@dataclasses.dataclass(frozen=True)
class QFormerConfig(TowerConfig):
    """The Q-Former's BERT sizes, its queries and cross-attention, plus the precision knobs (`TowerConfig`)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    num_query_tokens: int = 32
    use_text_input: bool = True  # word/position embeddings and the text FFNs (stage 1, retrieval)

    def __post_init__(self):
        super().__post_init__()
        self._check_heads(self.hidden_size, self.num_heads)
        if self.cross_attention_frequency < 1:
            raise ValueError(f"QFormerConfig.cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        if self.scan_layers and self.num_layers % self.cross_attention_frequency:
            raise ValueError(f"QFormerConfig: scan_layers scans groups of cross_attention_frequency="
                             f"{self.cross_attention_frequency} layers; num_layers={self.num_layers} is not a multiple")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


def attention_mask(kind: str, num_queries: int, text_mask: Optional[jax.Array], *, batch: int = 1) -> jax.Array:
    """Boolean `[B, L, L]` (L = queries + text) self-attention mask; True = may attend.

    `text_mask` `[B, T]` marks real (1) and padding (0) text tokens; None means no text.
    """
    if text_mask is None:
        return jnp.ones((batch, num_queries, num_queries), bool)
    b, t = text_mask.shape
    key_valid = jnp.concatenate([jnp.ones((b, num_queries), bool), text_mask.astype(bool)], axis=1)
    is_query = jnp.arange(num_queries + t) < num_queries
    if kind == "bidirectional":
        allowed = jnp.ones((num_queries + t, num_queries + t), bool)
    elif kind == "causal":
        text_rows = jnp.concatenate([jnp.ones((t, num_queries), bool), layers.causal_mask(t)], axis=1)
        query_rows = jnp.concatenate([jnp.ones((num_queries, num_queries), bool),
                                      jnp.zeros((num_queries, t), bool)], axis=1)
        allowed = jnp.concatenate([query_rows, text_rows], axis=0)
    elif kind == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    else:
        raise ValueError(f"unknown Q-Former mask kind {kind!r}: bidirectional, causal or unimodal")
    return allowed[None] & key_valid[:, None, :]


class MultiHeadAttention(nn.Module):
    config: QFormerConfig
    kv_features: Optional[int] = None  # cross-attention reads the image width

    @nn.compact
    def __call__(self, x, kv_input, bias, past: Optional[KV] = None, deterministic: bool = True):
        cfg = self.config
        dense = lambda name: Dense(cfg.hidden_size, ("embed", "heads"), dtype=cfg.dtype,  # noqa: E731
                                   param_dtype=cfg.param_dtype, name=name)
        q = layers.split_heads(dense("query")(x), cfg.num_heads)
        k = layers.split_heads(dense("key")(kv_input), cfg.num_heads)
        v = layers.split_heads(dense("value")(kv_input), cfg.num_heads)
        new_kv = (k, v)
        if past is not None:
            k = jnp.concatenate([past[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([past[1].astype(v.dtype), v], axis=1)
        rng = None if deterministic or cfg.attention_dropout == 0 else self.make_rng("dropout")
        out = layers.dot_product_attention(q, k, v, bias, dropout_rate=cfg.attention_dropout,
                                           deterministic=deterministic, dropout_rng=rng, dtype=cfg.dtype,
                                           impl=cfg.attention_impl)
        return layers.merge_heads(out), new_kv


class AddNorm(nn.Module):
    """BERT's `LN(residual + dropout(dense(x)))`."""

    config: QFormerConfig
    in_axis: str = "heads"

    @nn.compact
    def __call__(self, x, residual, deterministic: bool = True):
        cfg = self.config
        h = Dense(cfg.hidden_size, (self.in_axis, "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name="dense")(x)
        h = layers.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="LayerNorm")(h + residual)


class FeedForward(nn.Module):
    config: QFormerConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name="intermediate")(x)
        h = layers.activation(cfg.hidden_act)(h)
        return AddNorm(cfg, in_axis="mlp", name="output")(h, x, deterministic)


class QFormerLayer(nn.Module):
    config: QFormerConfig
    has_cross_attention: bool

    @nn.compact
    def __call__(self, x, num_queries: int, self_bias, image_embeds, past: Optional[KV], deterministic: bool):
        cfg = self.config
        attn, kv = MultiHeadAttention(cfg, name="attention")(x, x, self_bias, past, deterministic)
        h = AddNorm(cfg, name="attention_output")(attn, x, deterministic)
        parts = []
        if num_queries > 0:
            hq = h[:, :num_queries]
            if self.has_cross_attention:
                if image_embeds is None:
                    raise ValueError("Q-Former: a cross-attention layer needs image_embeds for the query positions")
                cross, _ = MultiHeadAttention(cfg, name="crossattention")(hq, image_embeds, None, None, deterministic)
                hq = AddNorm(cfg, name="crossattention_output")(cross, hq, deterministic)
            parts.append(FeedForward(cfg, name="query_ffn")(hq, deterministic))
        if h.shape[1] > num_queries:
            if not cfg.use_text_input:
                raise ValueError("Q-Former built with use_text_input=False has no text path")
            parts.append(FeedForward(cfg, name="text_ffn")(h[:, num_queries:], deterministic))
        out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return layers.logically_constrain(out, ("batch", "length", "embed")), kv


class QFormerGroup(nn.Module):
    """`cross_attention_frequency` consecutive layers, the first with cross-attention: one step of the
    scanned Q-Former. Returns `(hidden, per-layer (k, v) of the group)`."""

    config: QFormerConfig

    @nn.compact
    def __call__(self, x, num_queries: int, self_bias, image_embeds, past: Optional[Sequence[KV]], deterministic: bool):
        kvs = []
        for j in range(self.config.cross_attention_frequency):
            x, kv = QFormerLayer(self.config, j == 0, name=f"layer_{j}")(
                x, num_queries, self_bias, image_embeds, None if past is None else past[j], deterministic)
            kvs.append(kv)
        return x, tuple(kvs)


def layer_stacks(config: QFormerConfig, at: tuple[str, ...] = ()) -> list[LayerStack]:
    """The Q-Former's layers: `layer_{i}` unrolled; scanned, `layers/layer_{j}` in groups of
    `cross_attention_frequency` (layer i = group i // k, member i % k)."""
    return [LayerStack(at, "layer_", config.num_layers, config.scan_layers, period=config.cross_attention_frequency)]


def _kvs_by_group(kvs: Sequence[KV], period: int) -> tuple[KV, ...]:
    """Per-layer (k, v) -> per group member j, (k, v) stacked over the groups (the scan's layout)."""
    return tuple(tuple(jnp.stack([kv[part] for kv in kvs[j::period]]) for part in (0, 1)) for j in range(period))


def _kvs_by_layer(grouped: Sequence[KV], num_layers: int) -> list[KV]:
    """The inverse of `_kvs_by_group`."""
    period = len(grouped)
    return [(grouped[i % period][0][i // period], grouped[i % period][1][i // period]) for i in range(num_layers)]


class QFormer(nn.Module):
    """The Q-Former encoder with its embeddings (no heads; those live in `blip2.py`).

    Call with any of: `query_embeds [B, Q, D]` (learned queries), `input_ids [B, T]`, both, or text
    only with `past` (per-layer cached query K/V of an earlier query pass, for ITG). Returns
    `(hidden [B, Q+T, D], per-layer (k, v) of this pass)`.
    """

    config: QFormerConfig

    def setup(self):
        cfg = self.config
        if cfg.use_text_input:
            self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                         param_dtype=cfg.param_dtype, name="word_embeddings")
            self.position_embeddings = Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"),
                                             dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="position_embeddings")
        self.layernorm = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="layernorm")
        self.embedding_dropout = layers.Dropout(cfg.hidden_dropout)
        if cfg.scan_layers:
            b = nn.broadcast
            self.layers = layers.scan_blocks(QFormerGroup, cfg, cfg.num_layers // cfg.cross_attention_frequency,
                                             in_axes=(b, b, b, 0, b), static_argnums=(2, 6))(cfg)
        else:
            layer_cls = layers.remat_block(QFormerLayer, cfg, static_argnums=(2, 6))
            self.layers = [layer_cls(cfg, cfg.has_cross_attention(i), name=f"layer_{i}") for i in range(cfg.num_layers)]

    def embed(self, query_embeds: Optional[jax.Array], input_ids: Optional[jax.Array],
              deterministic: bool = True) -> jax.Array:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds.astype(self.config.dtype))
        if input_ids is not None:
            positions = jnp.arange(input_ids.shape[1])
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return self.embedding_dropout(self.layernorm(x), deterministic=deterministic)

    def __call__(self, query_embeds: Optional[jax.Array] = None, input_ids: Optional[jax.Array] = None,
                 self_mask: Optional[jax.Array] = None, image_embeds: Optional[jax.Array] = None,
                 past: Optional[Sequence[KV]] = None, deterministic: bool = True):
        """`self_mask` `[B, L, L_past + L]` boolean (True = may attend); None = all visible."""
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        x = self.embed(query_embeds, input_ids, deterministic)
        bias = None if self_mask is None else layers.mask_to_bias(self_mask, MASK_FILL)[:, None]
        if image_embeds is not None:
            image_embeds = image_embeds.astype(self.config.dtype)
        return self._layers(x, num_queries, bias, image_embeds, past, deterministic)

    def _layers(self, x, num_queries, bias, image_embeds, past, deterministic):
        """Every layer, unrolled or scanned; `(hidden, per-layer (k, v))` either way."""
        cfg = self.config
        if cfg.scan_layers:
            grouped = None if past is None else _kvs_by_group(past, cfg.cross_attention_frequency)
            x, kvs = self.layers(x, num_queries, bias, image_embeds, grouped, deterministic)
            return x, _kvs_by_layer(kvs, cfg.num_layers)
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, num_queries, bias, image_embeds, None if past is None else past[i], deterministic)
            kvs.append(kv)
        return x, kvs

    def attend_word_embeddings(self, x: jax.Array) -> jax.Array:
        """Logits against the word embedding table (the ITG head's tied decoder)."""
        return self.word_embeddings.attend(x)
