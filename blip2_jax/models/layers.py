"""Building blocks shared by the towers: the config base, dense, embedding, LayerNorm, attention, the
layer stacks (unrolled or `nn.scan`ned, remat policies), the decoders' KV cache.

Conventions (see docs/architecture.md):
- Every parameter is created through `nn.with_logical_partitioning` with logical axis names
  (`embed`, `mlp`, `heads`, `vocab`, ...); `blip2_jax.sharding` maps them onto the mesh.
- `param_dtype` is the storage dtype, `dtype` the compute dtype. LayerNorm, softmax and logits are
  computed in float32 whatever `dtype` says; results are cast back to `dtype`.
- Dense kernels are `[in, out]` (HF Linear weights are `[out, in]`; the converters transpose).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.models import pallas_attention, quant

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.normal(stddev=0.02)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a rematerialised block keeps from its forward pass (`jax.checkpoint` policies): "full" keeps
# nothing but its inputs (the least memory), "save_dots" keeps the outputs of the weight matmuls
# (dots without batch dimensions) and recomputes attention, activations and norms.
REMAT_POLICIES = {"none": None, "full": None, "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """What every tower's config (ViT, Q-Former, OPT, T5) carries besides its architecture.

    `dtype` computes, `param_dtype` stores. `remat` recomputes each block in the backward pass: False
    (or "none"), True (or "full"), or "save_dots" (`REMAT_POLICIES`). `scan_layers` runs the blocks as
    one `nn.scan`: their parameters stacked along a leading "layers" axis (`stacking.LayerStack` names
    both layouts), one compiled block instead of one per layer.
    Keyword-only, so a subclass's own fields keep their positions; dtype names ("bfloat16", as
    in a JSON config) become jnp dtypes.
    """

    _: dataclasses.KW_ONLY
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Union[bool, str] = False
    scan_layers: bool = False
    attention_impl: str = "xla"  # or "fused" / "pallas" (`ATTENTION_IMPLS`, `dot_product_attention`)

    def __post_init__(self):
        for k in ("dtype", "param_dtype"):
            if isinstance(getattr(self, k), str):
                object.__setattr__(self, k, DTYPES[getattr(self, k)])
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"{type(self).__name__}: remat={self.remat!r}; expected a bool or one of "
                             f"{tuple(REMAT_POLICIES)}")

    @property
    def remat_policy(self) -> str:
        """`remat` as a policy name: "none", "full" or "save_dots"."""
        if isinstance(self.remat, str):
            return self.remat
        return "full" if self.remat else "none"

    def _check_heads(self, hidden_size: int, num_heads: int) -> None:
        if hidden_size % num_heads:
            raise ValueError(f"{type(self).__name__}: hidden_size {hidden_size} is not divisible by "
                             f"the number of heads {num_heads}")

    @classmethod
    def _hf_fields(cls, d: dict, model_type: str, exclude: Sequence[str] = ()) -> dict:
        """The entries of a Hugging Face config dict that are fields of `cls` (not the precision
        and layer-stack knobs, not `exclude`), lists made tuples so the config stays hashable (several EOS ids)."""
        if d.get("model_type", model_type) != model_type:
            raise ValueError(f"{cls.__name__}.from_hf: model_type is {d.get('model_type')!r}, "
                             f"expected {model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "remat", "scan_layers",
                                                             "attention_impl", *exclude}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a Hugging Face config names (`hidden_act`, `dense_act_fn`, `activation_function`)."""
    table = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(table)}")
    return table[name]


class Dense(nn.Module):
    """`y = x @ kernel + bias` with logical axis names `(in_axis, out_axis)` on the kernel."""

    features: int
    axes: tuple[str, str] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    """A `[num_embeddings, features]` table with logical axes `axes` (default `("vocab", "embed")`)."""

    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Initializer = default_kernel_init

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return quant.take_rows(self.embedding, ids, self.dtype)  # a plain or int8 table (`models.quant`)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (a tied output head), computed and returned in float32."""
        return jnp.dot(x.astype(jnp.float32), self.embedding.astype(jnp.float32).T)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (as LAVIS's fp16-safe subclass does), cast back to `dtype`."""

    epsilon: float = 1e-6
    axis_name: str = "embed"
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)),
                (features,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """T5's and LLaMA's LayerNorm: no mean subtraction, no bias, computed in float32.

    `scale_offset` 1.0 is Gemma's `(1 + weight)` form: the stored scale starts at 0 and the norm
    multiplies by `1 + scale`.
    """

    epsilon: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale_offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.constant(1.0 - self.scale_offset),
                                                  (self.axis_name,)),
            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.epsilon)
        return (y * (self.scale_offset + scale.astype(jnp.float32))).astype(self.dtype)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """`[B, T, H*D] -> [B, T, H, D]`."""
    return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def merge_heads(x: jax.Array) -> jax.Array:
    """`[B, T, H, D] -> [B, T, H*D]`."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def mask_to_bias(mask: jax.Array, fill: float = -1e9) -> jax.Array:
    """Boolean (or 0/1) mask, True = may attend, to an additive float32 bias (0 or `fill`)."""
    return jnp.where(mask.astype(bool), 0.0, fill).astype(jnp.float32)


# -- Dropout ---------------------------------------------------------------------------------------
def dropout_mask(rng: jax.Array, rate: float, shape: Sequence[int]) -> jax.Array:
    """The keep mask of dropout at `rate`: `jax.random.bernoulli(rng, 1 - rate, shape)`, bit for bit,
    behind an optimization barrier so that XLA computes it once, on its own, and its consumers read it.

    Without the barrier XLA fuses the mask's threefry hash (about 200 integer ops an element) into every
    consumer: the forward's select, the rematerialised forward, the backward's select, and the matmul
    that reads the dropped-out activation (T5's `wo`). On TPU that code is emitted per fusion and per
    vector-memory window, so the paper-scale stage-2 step's compile spent most of its time generating
    the same hash many times over (docs/pod_planning.md, "Compile time"). The barrier changes no value.
    """
    return jax.lax.optimization_barrier(jax.random.bernoulli(rng, 1.0 - rate, tuple(shape)))


class Dropout(nn.Dropout):
    """flax's `nn.Dropout` (the same class name, hence the same automatic module names and RNG stream, and
    the same mask and scaling), its mask made by `dropout_mask`."""

    @nn.compact
    def __call__(self, inputs, deterministic: Optional[bool] = None, rng: Optional[jax.Array] = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        shape = list(inputs.shape)
        for dim in self.broadcast_dims:
            shape[dim] = 1
        mask = jnp.broadcast_to(dropout_mask(rng, self.rate, shape), inputs.shape)
        return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


ATTENTION_IMPLS = ("xla", "fused", "pallas")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    dropout_rng: Optional[jax.Array] = None,
    dtype: Dtype = jnp.float32,
    impl: str = "xla",
) -> jax.Array:
    """Softmax attention with float32 scores.

    `impl="xla"` is the einsum form below; `impl="fused"` hands the same computation to
    `jax.nn.dot_product_attention`, which picks a fused kernel where the backend has one (cuDNN flash
    attention on NVIDIA GPUs for bfloat16 / float16) and XLA's form elsewhere. Attention dropout (a
    training-only option no frozen tower uses) always takes the einsum form. `impl="pallas"` runs the
    Pallas TPU flash-attention kernel (`pallas_attention`: padded to its block sizes, never the
    `[B, H, Tq, Tk]` probabilities in HBM); it lowers for TPU only (on CPU inside Pallas's
    `force_tpu_interpret_mode()`, which the tests use).

    q: `[B, Tq, H, D]`, k and v: `[B, Tk, H, D]`, or `[B, Tk, KV, D]` with H a multiple of KV (grouped-query
    attention: query head h reads K/V head h // (H / KV), as HF's `repeat_kv`); `bias` broadcasts to
    `[B, H, Tq, Tk]` and is added to the scaled scores. `scale` defaults to `D**-0.5` (T5 passes 1.0).
    Returns `[B, Tq, H, D]` in `dtype`.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    no_dropout = deterministic or dropout_rate == 0.0
    if impl == "pallas" and no_dropout:
        return pallas_attention.flash_attention(q, k, v, bias, scale=float(scale), dtype=dtype)
    if impl == "fused" and no_dropout:
        if bias is not None:  # [B, H, Tq, Tk] as jax.nn wants it (it broadcasts only size-1 axes itself)
            bias = jnp.broadcast_to(bias, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])).astype(dtype)
        out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), bias=bias,
                                           scale=float(scale))
        return out.astype(dtype)
    if k.shape[-2] != q.shape[-2]:
        groups = q.shape[-2] // k.shape[-2]
        k, v = jnp.repeat(k, groups, axis=-2), jnp.repeat(v, groups, axis=-2)
    # Heads-first layout for both products: XLA:CPU runs them about 2x faster than the einsums over the
    # [B, T, H, D] layout (ViT attention at 257 tokens: 29 -> 15 ms); the results differ by rounding.
    q, k, v = (x.astype(dtype).transpose(0, 2, 1, 3) for x in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        keep = dropout_mask(dropout_rng, dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v).transpose(0, 2, 1, 3)


def keep_last(hidden: jax.Array, n: int) -> jax.Array:
    """`hidden[:, -n:]` for `n > 0`, all of `hidden` for `n == 0`: the positions whose logits a caller
    needs (HF's `logits_to_keep`). The LM head is the largest matmul of a small LLM step (vocab x width
    per position), so a loss over the text alone should not pay it for the visual prompt's positions."""
    if n < 0:
        raise ValueError(f"logits_to_keep must be >= 0, got {n}")
    return hidden[:, hidden.shape[1] - n:] if n else hidden


def causal_mask(length: int) -> jax.Array:
    """`[length, length]` boolean lower-triangular mask (position i sees positions <= i)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))


# -- Layer stacks: a block repeated, unrolled or scanned --------------------------------------------
def remat_block(block: type[nn.Module], config: TowerConfig, static_argnums: tuple[int, ...] = ()):
    """`block` recomputed in the backward pass under `config.remat_policy`; `block` itself for "none".

    `static_argnums` index `__call__`'s arguments with `self` as 0 (the Python bools and ints).
    """
    policy = config.remat_policy
    if policy == "none":
        return block
    # Inside a scan CSE cannot merge the recomputation with the forward pass: no barrier needed.
    return nn.remat(block, static_argnums=static_argnums, policy=REMAT_POLICIES[policy],
                    prevent_cse=not config.scan_layers)


def scan_blocks(block: type[nn.Module], config: TowerConfig, length: int, *, in_axes: tuple,
                static_argnums: tuple[int, ...] = ()):
    """`block` applied `length` times as one `nn.scan` (remat per step, as `remat_block`).

    `block.__call__(carry, *args) -> (carry, out)`; `in_axes` gives per argument `nn.broadcast` (the
    same for every step) or 0 (sliced per step: a per-layer cache). Parameters are stacked on a
    leading axis named "layers" (replicated by `sharding.DEFAULT_AXIS_RULES`); the init and dropout
    RNGs are split per step; the outputs come back stacked.
    """
    return nn.scan(remat_block(block, config, static_argnums), variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=in_axes, length=length,
                   metadata_params={nn.PARTITION_NAME: "layers"})


# -- The fixed-size key/value cache of the decoders (OPT, LLaMA & co., the T5 decoder) ---------------
# `{"index": int32[], "mask": int32[B, max_len], "layers": ({"k", "v"}: [B, max_len, H, D], ...)}`:
# fixed shapes, so one jit serves the prefill and every one-token step. `mask` remembers the
# attention mask of the positions written so far (1 = token, 0 = padding or not yet written).
# A scanned decoder keeps its layers stacked instead: `"layers": {"k", "v"}: [L, B, max_len, H, D]`
# (the batch on axis 1: `map_batch` knows).
KVCache = dict
STACKED_ENTRIES = ("layers", "cross")  # cache entries that hold one {"k", "v"} per layer


def init_kv_cache(batch: int, max_len: int, num_layers: int, num_heads: int, head_dim: int,
                  dtype: Dtype, *, stacked: bool = False) -> KVCache:
    """An empty cache for `max_len` positions of `num_layers` attention layers (`stacked`: for a
    scanned decoder, one `[L, B, max_len, H, D]` array each for K and V)."""
    shape = (batch, max_len, num_heads, head_dim)
    if stacked:
        layers = {"k": jnp.zeros((num_layers,) + shape, dtype), "v": jnp.zeros((num_layers,) + shape, dtype)}
    else:
        layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers))
    return {
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch, max_len), jnp.int32),
        "layers": layers,
    }


def write_kv(layer_cache: Optional[dict], k: jax.Array, v: jax.Array,
             index) -> tuple[jax.Array, jax.Array, Optional[dict]]:
    """The new tokens' `k`, `v` `[B, T, H, D]` written at `index` of one layer's cache.

    Returns the keys and values to attend to (the whole cache) and the layer's new cache; without
    a cache (None), `(k, v, None)`.
    """
    if layer_cache is None:
        return k, v, None
    k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), index, 1)
    v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), index, 1)
    return k, v, {"k": k, "v": v}


class DecoderMask(NamedTuple):
    """Where T new tokens stand and what they may attend to (`decoder_mask`)."""

    index: Any  # position of the first new token: the cache's index, 0 without a cache
    key_mask: jax.Array  # [B, K] int32 mask of every key (K = T without a cache, max_len with one)
    q_pos: jax.Array  # [T] absolute positions of the new tokens
    k_pos: jax.Array  # [K] absolute positions of the keys
    allowed: jax.Array  # [B, T, K] bool: causal and not padding


def decoder_mask(attention_mask: jax.Array, cache: Optional[KVCache]) -> DecoderMask:
    """Causal and padding mask of T new tokens (`attention_mask` int32 `[B, T]`, 1 = token).

    With a cache, the new tokens' mask is written at the cache's index into the mask of the
    earlier positions; query i (absolute index + i) sees the keys j <= index + i that are tokens.
    """
    if cache is None:
        index, key_mask = 0, attention_mask
    else:
        index = cache["index"]
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], attention_mask, index, 1)
    q_pos = index + jnp.arange(attention_mask.shape[1])
    k_pos = jnp.arange(key_mask.shape[1])
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_mask[:, None, :].astype(bool)
    return DecoderMask(index, key_mask, q_pos, k_pos, allowed)


def mask_positions(mask: DecoderMask, padding: int = -1) -> jax.Array:
    """`[B, T]` positions of the new tokens of `mask`, counted over the tokens before them:
    `cumsum(mask) - 1` over every key so far, so left padding shifts positions as HF does; padding gets
    `padding` (OPT: -1, HF `generate`'s `masked_fill(mask == 0, 0)`: 0)."""
    key_mask = mask.key_mask
    positions = jnp.where(key_mask == 1, jnp.cumsum(key_mask, axis=1) - 1, padding)
    return jax.lax.dynamic_slice_in_dim(positions, mask.index, mask.q_pos.shape[0], 1)


def advance_kv_cache(cache: KVCache, mask: DecoderMask, layers: Sequence[dict]) -> KVCache:
    """`cache` after the new tokens of `mask`: index moved past them, their mask and K/V stored."""
    return {**cache, "index": cache["index"] + mask.q_pos.shape[0], "mask": mask.key_mask,
            "layers": layers if isinstance(layers, dict) else tuple(layers)}


def map_batch(fn: Callable[[jax.Array, int], jax.Array], cache):
    """`fn(x, axis)` on every array of a decoder cache that has a batch axis, `axis` being where it is:
    1 under a stacked per-layer entry (`[L, B, ...]`), else 0; scalars (the index) stay."""
    def one(path, x):
        if x.ndim == 0:
            return x
        top = getattr(path[0], "key", None) if path else None
        stacked = isinstance(cache, dict) and top in STACKED_ENTRIES and isinstance(cache[top], dict)
        return fn(x, 1 if stacked else 0)

    return jax.tree_util.tree_map_with_path(one, cache)


def take_batch_rows(cache, indices: jax.Array):
    """Rows `indices` of every array with a batch axis; scalars stay (beam-search cache reorder)."""
    return map_batch(lambda x, axis: jnp.take(x, indices, axis=axis), cache)


def logically_constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
    """Activation sharding hint by logical names; a no-op outside a mesh/rules context."""
    return nn.with_logical_constraint(x, tuple(axes))
