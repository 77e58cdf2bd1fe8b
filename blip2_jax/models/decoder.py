"""Modern decoder-only LLMs (LLaMA 2/3.x and Vicuna, Mistral, Qwen2/2.5, Gemma) as one Flax module family.

One pre-norm block serves them all: RMSNorm -> self-attention with rotary positions and grouped-query
attention -> residual, RMSNorm -> gated MLP `down(act(gate(x)) * up(x))` -> residual; a final RMSNorm
and a tied or untied LM head. What differs between the families is read from the Hugging Face config
(`DecoderConfig.from_hf`) and kept in `FAMILIES`:
- LLaMA: optional `attention_bias` (q, k, v, o) and `mlp_bias`; RoPE "default", "linear" or "llama3"
  (LLaMA 3.1+ frequency smoothing);
- Mistral: a sliding attention window on every layer (`sliding_window`);
- Qwen2/2.5: biases on q, k, v (not o); a sliding window on the layers `layer_types` names;
- Gemma: token embeddings times `sqrt(hidden_size)`, RMSNorm as `(1 + weight)`, `head_dim` free of
  `hidden_size / heads`, the tanh-GELU gated MLP, the head tied to the embeddings.

Semantics follow the transformers 5.x `...ForCausalLM` classes. Positions come from the attention mask
as HF `generate` makes them (`cumsum(mask) - 1`, padding at 0), so a left-padded batch gets each row's
own positions; a right-padded or unpadded batch gets HF's forward positions `0..T-1`.

Precision: parameters in `param_dtype`, matmuls in `dtype`; RMSNorm, rotary tables, softmax and
logits in float32. Cache: `init_cache(config, batch, max_len)`, the shared fixed-size cache of
`models/layers.py` (K/V stored with the `num_key_value_heads` heads, after the rotation).
Blocks are uniform (same parameters and signature), so the stack can be scanned.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.models.layers import (Dense, DecoderMask, Embed, KVCache, RMSNorm, TowerConfig, activation,
                                     advance_kv_cache, decoder_mask, dot_product_attention, init_kv_cache, keep_last,
                                     mask_positions, mask_to_bias, merge_heads, remat_block, scan_blocks,
                                     split_heads, write_kv)
from blip2_jax.models.stacking import LayerStack

Dtype = Any
ROPE_TYPES = ("default", "linear", "llama3")
FULL, SLIDING = "full_attention", "sliding_attention"


class Family(NamedTuple):
    """What one HF model type fixes beyond the config's numbers."""

    architecture: str  # the `...ForCausalLM` class `to_hf` names
    qkv_bias: bool  # q, k and v always carry biases (Qwen2)
    embed_scale: bool  # token embeddings times sqrt(hidden_size) (Gemma)
    norm_offset: float  # RMSNorm multiplies by `offset + weight` (Gemma: 1)
    hf_fields: tuple[str, ...]  # config fields of this family beyond the common ones
    defaults: dict  # HF's class defaults where they differ from `DecoderConfig`'s (LLaMA's)


FAMILIES = {
    "llama": Family("LlamaForCausalLM", False, False, 0.0, ("attention_bias", "mlp_bias"), {}),
    "mistral": Family("MistralForCausalLM", False, False, 0.0, ("sliding_window",),
                      dict(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
                           sliding_window=4096)),
    "qwen2": Family("Qwen2ForCausalLM", True, False, 0.0,
                    ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
                    dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                         bos_token_id=None, eos_token_id=None)),
    "gemma": Family("GemmaForCausalLM", False, True, 1.0, ("attention_bias",),
                    dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                         num_attention_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
                         max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         tie_word_embeddings=True)),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig(TowerConfig):
    """The fields of the HF LLaMA / Mistral / Qwen2 / Gemma configs that change the computation (HF
    names; RoPE flattened to `rope_*` so the config stays hashable), plus `TowerConfig`'s precision knobs.
    Defaults are LLaMA-2-7B's; `from_hf` fills what a file leaves out with its family's defaults."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: num_attention_heads (no grouping)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_type: str = "default"  # "default", "linear" or "llama3"
    rope_theta: float = 10000.0
    rope_factor: float = 1.0  # linear / llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position_embeddings: Optional[int] = None  # llama3 (None: max_position_embeddings)
    attention_bias: bool = False  # biases on q, k, v and o (LLaMA, Gemma)
    mlp_bias: bool = False  # biases on gate, up and down (LLaMA)
    sliding_window: Optional[int] = None  # keys within this many positions, on the sliding layers
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; () = every layer FULL
    attention_dropout: float = 0.0
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    tie_word_embeddings: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in FAMILIES:
            raise ValueError(f"DecoderConfig: model_type {self.model_type!r} is not one of {sorted(FAMILIES)}")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            self._check_heads(self.hidden_size, self.num_attention_heads)
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"DecoderConfig: {self.num_attention_heads} attention heads are not a multiple of "
                             f"{self.num_key_value_heads} key/value heads")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"DecoderConfig: rope_type {self.rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
        if self.layer_types and (len(self.layer_types) != self.num_hidden_layers
                                 or set(self.layer_types) - {FULL, SLIDING}):
            raise ValueError(f"DecoderConfig: layer_types must name {FULL!r} or {SLIDING!r} for each of the "
                             f"{self.num_hidden_layers} layers, got {self.layer_types}")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ValueError("DecoderConfig: sliding layers need sliding_window")

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.family.qkv_bias

    def window(self, layer: int) -> Optional[int]:
        """The attention window of layer `layer` (None: every earlier position)."""
        sliding = self.layer_types[layer] == SLIDING if self.layer_types else False
        return self.sliding_window if sliding else None

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "DecoderConfig":
        """From a Hugging Face `config.json` dict of one of `FAMILIES` (its own, or BLIP-2's `text_config`).

        RoPE from `rope_parameters` (transformers 5.x) or `rope_scaling` + `rope_theta` (older files)."""
        kind = d.get("model_type", "llama")
        if kind not in FAMILIES:
            raise ValueError(f"DecoderConfig.from_hf: model_type {kind!r} is not one of {sorted(FAMILIES)}")
        family = FAMILIES[kind]
        kw = {**family.defaults,
              **cls._hf_fields(d, kind, exclude=("sliding_window", "layer_types", "model_type", "rope_theta"))}
        kw.update(_rope_fields(d), **_window_fields(kind, {**family.defaults, **d}, kw))
        if kind == "gemma" and kw.get("hidden_act") == "gelu":  # HF's own conversion (the tanh form is meant)
            kw["hidden_act"] = "gelu_pytorch_tanh"
        return cls(model_type=kind, **{**kw, **overrides})

    def to_hf(self) -> dict:
        """A `config.json` dict that transformers' config and `...ForCausalLM` of this family load."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d = {
            "model_type": self.model_type, "architectures": [self.family.architecture],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope_parameters(), "attention_dropout": self.attention_dropout,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id, "eos_token_id": eos,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        family_values = {"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
                         "sliding_window": self.sliding_window, "use_sliding_window": self.sliding_window is not None,
                         "max_window_layers": self.num_hidden_layers,
                         "layer_types": list(self.layer_types) or [FULL] * self.num_hidden_layers}
        d.update({k: family_values[k] for k in self.family.hf_fields})
        return d

    def rope_parameters(self) -> dict:
        """HF 5.x's `rope_parameters` dict."""
        d = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            d["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            d.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                     original_max_position_embeddings=self.rope_original_max_position_embeddings
                     or self.max_position_embeddings)
        return d


def _rope_fields(d: dict) -> dict:
    """Our `rope_*` fields from an HF dict's `rope_parameters`, or its older `rope_scaling` + `rope_theta`."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    out = {"rope_type": rope.get("rope_type", rope.get("type", "default")),
           "rope_theta": float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))}
    names = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
             "high_freq_factor": "rope_high_freq_factor",
             "original_max_position_embeddings": "rope_original_max_position_embeddings"}
    out.update({ours: rope[hf] for hf, ours in names.items() if rope.get(hf) is not None})
    return out


def _window_fields(kind: str, d: dict, kw: dict) -> dict:
    """`sliding_window` and `layer_types` as HF's Mistral (every layer) and Qwen2 (`use_sliding_window`,
    then `layer_types` or the layers from `max_window_layers` on) configs decide them."""
    n = kw.get("num_hidden_layers", DecoderConfig.num_hidden_layers)
    if kind == "mistral":
        window = d.get("sliding_window")
        return {"sliding_window": window, "layer_types": (SLIDING,) * n if window is not None else ()}
    if kind == "qwen2" and d.get("use_sliding_window") and d.get("sliding_window") is not None:
        types = d.get("layer_types") or [SLIDING if i >= d.get("max_window_layers", 28) else FULL for i in range(n)]
        return {"sliding_window": d["sliding_window"], "layer_types": tuple(types) if SLIDING in types else ()}
    return {}


def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype: Dtype = None) -> KVCache:
    """An empty cache for `max_len` positions (prompt + generated), `num_key_value_heads` per layer
    (stacked `[L, ...]` when the layers are scanned)."""
    return init_kv_cache(batch, max_len, config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                         dtype or config.dtype, stacked=config.scan_layers)


def layer_stacks(config: DecoderConfig, at: tuple[str, ...] = ()) -> list[LayerStack]:
    """The decoder blocks: `layers_{i}` unrolled, `layers` scanned."""
    return [LayerStack(at, "layers_", config.num_hidden_layers, config.scan_layers)]


def check_scannable(config: DecoderConfig) -> None:
    """A scanned stack runs one block program for every layer, so every layer must attend alike: the
    same window (a Qwen2 with sliding windows on some layers only is refused, naming them)."""
    windows = {config.window(i) for i in range(config.num_hidden_layers)}
    if config.scan_layers and len(windows) > 1:
        raise ValueError(f"DecoderConfig: scan_layers needs one attention window for every layer, got "
                         f"{sorted(windows, key=str)} (layer_types={config.layer_types}); unroll this model")


# -- rotary positions ---------------------------------------------------------------------------------
def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
    """`[head_dim // 2]` float32 inverse frequencies, computed as HF's `ROPE_INIT_FUNCTIONS` do (float32)."""
    dim = config.head_dim
    inv = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    if config.rope_type == "linear":
        return (inv / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        return _llama3_inv_freq(config, inv)
    return inv


def _llama3_inv_freq(config: DecoderConfig, inv: np.ndarray) -> np.ndarray:
    """LLaMA 3.1's smoothing: long wavelengths divided by `factor`, short ones kept, a blend between."""
    factor, low, high = (np.float32(x) for x in (config.rope_factor, config.rope_low_freq_factor,
                                                 config.rope_high_freq_factor))
    old = np.float32(config.rope_original_max_position_embeddings or config.max_position_embeddings)
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(cos, sin)` `[B, T, head_dim]` float32 for integer `positions` `[B, T]` (HF's `cat(freqs, freqs)`)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x * cos + rotate_half(x) * sin` over `x` `[B, T, H, D]`, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


# -- the block ------------------------------------------------------------------------------------------
def _norm(cfg: DecoderConfig, name: Optional[str] = None) -> RMSNorm:
    return RMSNorm(epsilon=cfg.rms_norm_eps, scale_offset=cfg.family.norm_offset, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, name=name)


def _dense(cfg: DecoderConfig, name: str, features: int, axes: tuple[str, str], bias: bool) -> Dense:
    return Dense(features, axes=axes, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class DecoderAttention(nn.Module):
    """Rotary grouped-query self-attention: `num_attention_heads` query heads over `num_key_value_heads`
    key/value heads (K/V projected, rotated and cached at that width)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, rope, bias, layer_cache, index, deterministic: bool):
        cfg = self.config
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = split_heads(_dense(cfg, "q_proj", h * d, ("embed", "heads"), cfg.qkv_bias)(x), h)
        k = split_heads(_dense(cfg, "k_proj", kv * d, ("embed", "kv"), cfg.qkv_bias)(x), kv)
        v = split_heads(_dense(cfg, "v_proj", kv * d, ("embed", "kv"), cfg.qkv_bias)(x), kv)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v, new_cache = write_kv(layer_cache, k, v, index)
        dropout_rng = None
        if not deterministic and cfg.attention_dropout > 0:
            dropout_rng = self.make_rng("dropout")
        out = dot_product_attention(q, k, v, bias, dropout_rate=cfg.attention_dropout, deterministic=deterministic,
                                    dropout_rng=dropout_rng, dtype=cfg.dtype, impl=cfg.attention_impl)
        return _dense(cfg, "o_proj", cfg.hidden_size, ("heads", "embed"), cfg.attention_bias)(merge_heads(out)), \
            new_cache


class GatedMLP(nn.Module):
    """`down_proj(act(gate_proj(x)) * up_proj(x))`."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg, "gate_proj", cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias)(x)
        up = _dense(cfg, "up_proj", cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias)(x)
        return _dense(cfg, "down_proj", cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias)(
            activation(cfg.hidden_act)(gate) * up)


class DecoderBlock(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))` (HF `...DecoderLayer`)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, rope, bias, layer_cache, index, deterministic: bool):
        cfg = self.config
        h, new_cache = DecoderAttention(cfg, name="self_attn")(
            _norm(cfg, "input_layernorm")(x), rope, bias, layer_cache, index, deterministic)
        x = x + h
        x = x + GatedMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x))
        return x, new_cache


def window_bias(mask: DecoderMask, window: Optional[int]) -> jax.Array:
    """`[B, 1, T, K]` additive bias: causal and padding (`mask.allowed`), and with a `window` only the keys
    less than `window` positions back (HF's `kv_idx > q_idx - sliding_window`, on cache positions)."""
    allowed = mask.allowed
    if window is not None:
        allowed = allowed & (mask.k_pos[None, :] > mask.q_pos[:, None] - window)[None]
    return mask_to_bias(allowed)[:, None]


class DecoderForCausalLM(nn.Module):
    """The decoder plus its LM head. `__call__(inputs_embeds, attention_mask, *, input_ids, cache,
    deterministic)`, as `OPTForCausalLM`."""

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        check_scannable(cfg)
        if cfg.scan_layers:
            b = nn.broadcast
            self.layers = scan_blocks(DecoderBlock, cfg, cfg.num_hidden_layers, in_axes=(b, b, 0, b, b),
                                      static_argnums=(6,))(cfg)
        else:
            block = remat_block(DecoderBlock, cfg, static_argnums=(6,))
            self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        self.norm = _norm(cfg)
        if not cfg.tie_word_embeddings:
            # Logits in float32: the head computes in float32 whatever the tower's dtype.
            self.lm_head = Dense(cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=jnp.float32,
                                 param_dtype=cfg.param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings `[B, T, hidden]` in `dtype` (Gemma's times sqrt(hidden) in that dtype, as HF):
        what BLIP-2 concatenates after its queries."""
        x = self.embed_tokens(input_ids)
        if self.config.family.embed_scale:
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, self.config.param_dtype).astype(x.dtype)
        return x

    def __call__(self, inputs_embeds: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None,
                 *, input_ids: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 deterministic: bool = True, logits_to_keep: int = 0) -> tuple[jax.Array, Optional[KVCache]]:
        """Logits `[B, T, vocab]` in float32 and the updated cache (None without a cache).

        `attention_mask` `[B, T]` (1 = token, 0 = padding; default all ones) covers the T new positions;
        with a `cache` the earlier positions' mask and K/V come from the cache. `logits_to_keep=N > 0`:
        logits of the last N positions only (HF's argument of that name), `[B, N, vocab]`.
        """
        if (inputs_embeds is None) == (input_ids is None):
            raise ValueError("DecoderForCausalLM: pass exactly one of inputs_embeds and input_ids")
        x = (self.embed(input_ids) if inputs_embeds is None else inputs_embeds).astype(self.config.dtype)
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], jnp.int32)
        mask = decoder_mask(attention_mask.astype(jnp.int32), cache)
        rope = rope_tables(self.config, mask_positions(mask, padding=0))
        windows = [self.config.window(i) for i in range(self.config.num_hidden_layers)]
        biases = {w: window_bias(mask, w) for w in set(windows)}

        layer_caches = None if cache is None else cache["layers"]
        if self.config.scan_layers:  # one window for all (check_scannable)
            x, new_layers = self.layers(x, rope, biases[windows[0]], layer_caches, mask.index, deterministic)
        else:
            new_layers = []
            for i, layer in enumerate(self.layers):
                x, new_layer_cache = layer(x, rope, biases[windows[i]], None if layer_caches is None
                                           else layer_caches[i], mask.index, deterministic)
                new_layers.append(new_layer_cache)
        logits = self.logits(self.norm(keep_last(x, logits_to_keep)))
        return logits, None if cache is None else advance_kv_cache(cache, mask, new_layers)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head over final hidden states, in float32 (tied: against the unscaled embedding table)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden.astype(jnp.float32)).astype(jnp.float32)
