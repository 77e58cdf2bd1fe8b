"""OPT (decoder-only causal LM) as a Flax linen module, with a fixed-size key/value cache.

Semantics follow Hugging Face `OPTForCausalLM` (transformers 5.x):
- learned positions with an offset of 2, computed from the attention mask as
  `cumsum(mask) * mask - 1` (so left padding shifts positions, as HF does);
- `project_in` / `project_out` when `word_embed_proj_dim != hidden_size` (opt-350m);
- pre-LN (`do_layer_norm_before=True`) or post-LN blocks; the decoder's final LayerNorm only for
  pre-LN models without `_remove_final_layer_norm`;
- the LM head tied to `embed_tokens` unless `tie_word_embeddings=False` (the converter sets that
  when a checkpoint carries its own `lm_head.weight`).

Precision: parameters in `param_dtype`, matmuls in `dtype`; LayerNorm, softmax and logits in float32.

Cache: `init_cache(config, batch, max_len, dtype)` returns a pytree
`{"index": int32[], "mask": int32[B, max_len], "layers": ({"k", "v"}: [B, max_len, H, D], ...)}`
(with `scan_layers`, `"layers": {"k", "v"}: [L, B, max_len, H, D]`, scanned with the layers).
With a cache, `attention_mask` covers only the new tokens; the cache remembers the mask of the
earlier ones, so positions and padding stay exact across prefill and one-token steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.models.layers import (Dense, Dropout, Embed, KVCache, LayerNorm, TowerConfig, activation,
                                     advance_kv_cache, decoder_mask, dot_product_attention, init_kv_cache, keep_last,
                                     mask_to_bias, merge_heads, remat_block, scan_blocks, split_heads, write_kv)
from blip2_jax.models.stacking import LayerStack

Dtype = Any
Cache = KVCache
POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (a fairseq padding_idx relic)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which HF OPT uses


@dataclasses.dataclass(frozen=True)
class OPTConfig(TowerConfig):
    """The fields of Hugging Face's OPTConfig that change the computation, plus our precision knobs
    (`TowerConfig`)."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    word_embed_proj_dim: Optional[int] = None  # None: equal to hidden_size
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False  # HF `_remove_final_layer_norm`
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 2
    eos_token_id: Any = 2
    tie_word_embeddings: bool = True

    def __post_init__(self):
        super().__post_init__()
        self._check_heads(self.hidden_size, self.num_attention_heads)

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings and the LM head (`word_embed_proj_dim`)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "OPTConfig":
        """From a Hugging Face `config.json` dict (OPT's own, or BLIP-2's `text_config`)."""
        kw = cls._hf_fields(d, "opt")
        if "_remove_final_layer_norm" in d:
            kw["remove_final_layer_norm"] = d["_remove_final_layer_norm"]
        return cls(**{**kw, **overrides})

    def to_hf(self) -> dict:
        """A `config.json` dict that transformers' `OPTConfig` / `OPTForCausalLM` load."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "model_type": "opt", "architectures": ["OPTForCausalLM"],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "ffn_dim": self.ffn_dim,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "word_embed_proj_dim": self.embed_dim, "do_layer_norm_before": self.do_layer_norm_before,
            "_remove_final_layer_norm": self.remove_final_layer_norm, "enable_bias": self.enable_bias,
            "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
            "activation_function": self.activation_function, "dropout": self.dropout,
            "attention_dropout": self.attention_dropout, "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id, "eos_token_id": eos,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def init_cache(config: OPTConfig, batch: int, max_len: int, dtype: Dtype = None) -> Cache:
    """An empty cache for `max_len` positions (prompt + generated); fixed shapes, so one jit serves all steps."""
    return init_kv_cache(batch, max_len, config.num_hidden_layers, config.num_attention_heads, config.head_dim,
                         dtype or config.dtype, stacked=config.scan_layers)


def layer_stacks(config: OPTConfig, at: tuple[str, ...] = ()) -> list[LayerStack]:
    """The decoder layers: `layers_{i}` unrolled, `layers` scanned."""
    return [LayerStack(at, "layers_", config.num_hidden_layers, config.scan_layers)]


def _norm(cfg: OPTConfig, name: str):
    """HF OPT LayerNorm (eps 1e-5); without parameters when `layer_norm_elementwise_affine` is False."""
    if cfg.layer_norm_elementwise_affine:
        return LayerNorm(epsilon=LAYER_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)

    def normalize(x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)).astype(cfg.dtype)
    return normalize


class OPTAttention(nn.Module):
    config: OPTConfig

    @nn.compact
    def __call__(self, x, bias, layer_cache, index, deterministic: bool):
        cfg = self.config
        dense = lambda name, axes: Dense(cfg.hidden_size, axes=axes, use_bias=cfg.enable_bias,  # noqa: E731
                                         dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        h = cfg.num_attention_heads
        q = split_heads(dense("q_proj", ("embed", "heads"))(x), h)
        k = split_heads(dense("k_proj", ("embed", "heads"))(x), h)
        v = split_heads(dense("v_proj", ("embed", "heads"))(x), h)
        k, v, new_cache = write_kv(layer_cache, k, v, index)
        dropout_rng = None
        if not deterministic and cfg.attention_dropout > 0:
            dropout_rng = self.make_rng("dropout")
        out = dot_product_attention(q, k, v, bias, dropout_rate=cfg.attention_dropout,
                                    deterministic=deterministic, dropout_rng=dropout_rng, dtype=cfg.dtype,
                                    impl=cfg.attention_impl)
        out = dense("out_proj", ("heads", "embed"))(merge_heads(out))
        return out, new_cache


class OPTDecoderLayer(nn.Module):
    config: OPTConfig

    @nn.compact
    def __call__(self, x, bias, layer_cache, index, deterministic: bool):
        cfg = self.config
        drop = Dropout(cfg.dropout)
        attn_norm = _norm(cfg, "self_attn_layer_norm")
        ffn_norm = _norm(cfg, "final_layer_norm")

        residual = x
        if cfg.do_layer_norm_before:
            x = attn_norm(x)
        x, new_cache = OPTAttention(cfg, name="self_attn")(x, bias, layer_cache, index, deterministic)
        x = residual + drop(x, deterministic=deterministic)
        if not cfg.do_layer_norm_before:
            x = attn_norm(x)

        residual = x
        if cfg.do_layer_norm_before:
            x = ffn_norm(x)
        x = Dense(cfg.ffn_dim, axes=("embed", "mlp"), use_bias=cfg.enable_bias, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, name="fc1")(x)
        x = activation(cfg.activation_function)(x)
        x = Dense(cfg.hidden_size, axes=("mlp", "embed"), use_bias=cfg.enable_bias, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, name="fc2")(x)
        x = residual + drop(x, deterministic=deterministic)
        if not cfg.do_layer_norm_before:
            x = ffn_norm(x)
        return x, new_cache


def _positions(mask: jax.Array) -> jax.Array:
    """HF OPT positions: `cumsum(mask) * mask - 1` (padding gets -1, i.e. table row 1)."""
    mask = mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1


class OPTForCausalLM(nn.Module):
    """OPT decoder plus LM head. `__call__(inputs_embeds, attention_mask, *, cache, deterministic)`."""

    config: OPTConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.embed_positions = Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                     axes=(None, "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        if cfg.embed_dim != cfg.hidden_size:
            self.project_in = Dense(cfg.hidden_size, axes=(None, "embed"), use_bias=False,
                                    dtype=cfg.dtype, param_dtype=cfg.param_dtype)
            self.project_out = Dense(cfg.embed_dim, axes=("embed", None), use_bias=False,
                                     dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        if cfg.scan_layers:
            b = nn.broadcast
            self.layers = scan_blocks(OPTDecoderLayer, cfg, cfg.num_hidden_layers, in_axes=(b, 0, b, b),
                                      static_argnums=(5,))(cfg)
        else:
            layer_cls = remat_block(OPTDecoderLayer, cfg, static_argnums=(5,))
            self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        if cfg.has_final_layer_norm:
            self.final_layer_norm = _norm(cfg, "final_layer_norm")
        if not cfg.tie_word_embeddings:
            # Logits in float32: the head computes in float32 whatever the tower's dtype.
            self.lm_head = Dense(cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                                 dtype=jnp.float32, param_dtype=cfg.param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings `[B, T, word_embed_proj_dim]` in `dtype` (what BLIP-2 concatenates after its queries)."""
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None,
                 *, input_ids: Optional[jax.Array] = None, cache: Optional[Cache] = None,
                 deterministic: bool = True, logits_to_keep: int = 0) -> tuple[jax.Array, Optional[Cache]]:
        """Logits `[B, T, vocab]` in float32 and the updated cache (None without a cache).

        `attention_mask` `[B, T]` (1 = token, 0 = padding; default all ones) covers the T new positions;
        with a `cache` the earlier positions' mask is taken from the cache. `logits_to_keep=N > 0`:
        logits of the last N positions only (HF's argument of that name), `[B, N, vocab]`.
        """
        if (inputs_embeds is None) == (input_ids is None):
            raise ValueError("OPTForCausalLM: pass exactly one of inputs_embeds and input_ids")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        b, t = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)

        mask = decoder_mask(attention_mask, cache)
        if cache is None:
            positions = _positions(attention_mask)
        else:  # positions count the earlier tokens too
            positions = jax.lax.dynamic_slice_in_dim(_positions(mask.key_mask), mask.index, t, 1)
        bias = mask_to_bias(mask.allowed)[:, None]  # [B, 1, T, K]

        x = inputs_embeds.astype(self.config.dtype)
        if self.config.embed_dim != self.config.hidden_size:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        # (HF OPT applies no dropout to the embeddings.)

        x, new_layers = self._layers(x, bias, None if cache is None else cache["layers"], mask.index, deterministic)
        x = keep_last(x, logits_to_keep)
        if self.config.has_final_layer_norm:
            x = self.final_layer_norm(x)
        if self.config.embed_dim != self.config.hidden_size:
            x = self.project_out(x)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x.astype(jnp.float32))

        new_cache = None if cache is None else advance_kv_cache(cache, mask, new_layers)
        return logits.astype(jnp.float32), new_cache

    def _layers(self, x, bias, layer_caches, index, deterministic):
        """Every decoder layer, unrolled or scanned: `(hidden, the layers' new caches)` (None without a
        cache; stacked arrays when scanned)."""
        if self.config.scan_layers:
            return self.layers(x, bias, layer_caches, index, deterministic)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, new_layer_cache = layer(x, bias, None if layer_caches is None else layer_caches[i], index,
                                       deterministic)
            new_layers.append(new_layer_cache)
        return x, new_layers
