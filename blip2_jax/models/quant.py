"""int8 weight-only quantisation of the frozen towers (`frozen_dtype="int8"`).

A quantised weight is a `QuantizedArray`: int8 `values` and float32 per-channel `scale`s (symmetric:
`w ~= values * scale`, `scale = max|w| / 127` over the channel). It is a pytree, so it lives in a
parameter tree like any array: sharded, placed, scanned over (a stacked `[L, ...]` kernel keeps one
scale row per layer) and passed to `model.apply`. The layers that read weights (`layers.Dense`,
`layers.Embed`, the convolutions) cast them with `.astype(dtype)`, which for a `QuantizedArray`
dequantises: the int8 tensor is what stays in memory, each layer's bfloat16 copy exists only while
that layer runs. Compute is bfloat16 (weight-only quantisation: activations are not quantised).

What is quantised (`quantize_tree`): every matrix-like weight, i.e. leaves named `kernel` (Dense
`[in, out]`, stacked `[L, in, out]`: one scale per output channel; convolutions `[h, w, in, out]`: one
per output channel) and `embedding` tables (`[V, D]`: one scale per row, so a lookup reads its own
row's scale). Biases, norms, position and class embeddings stay as they are (they are small).

Two ways a quantised tree is made:
- from a float tree on the host (`quantize_tree`: `from_pretrained`; `place`: a checkpoint's float32
  tensor quantised and put on the shardings of its abstract `QuantizedArray`, `convert.merge`);
- inside an init function (`quantized_init`: the train loop's `model.frozen_dtype="int8"`), where the
  leaves are still boxed with their logical axis names: the values keep the kernel's names, the scale
  the same names with None on the reduced axes, so it is sharded like the output channels it scales.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedArray:
    """`values * scale` (int8 values, float32 scale broadcastable to them)."""

    values: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    def astype(self, dtype) -> jax.Array:
        """The dequantised weight in `dtype`."""
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.values.shape)) * 1 + int(np.prod(self.scale.shape)) * 4


def take_rows(table, ids: jax.Array, dtype) -> jax.Array:
    """`table[ids]` in `dtype`, for a plain or quantised (per-row scale) embedding table."""
    if isinstance(table, QuantizedArray):
        rows = jnp.take(table.values, ids, axis=0).astype(jnp.float32)
        return (rows * jnp.take(table.scale, ids, axis=0)).astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def _reduced_axes(name: str, ndim: int) -> tuple[int, ...] | None:
    """The axes one scale spans for a leaf called `name` (None: not quantised)."""
    if name == "embedding" and ndim == 2:
        return (1,)  # per row
    if name == "kernel" and ndim in (2, 3):
        return (ndim - 2,)  # per output channel ([in, out], stacked [L, in, out])
    if name == "kernel" and ndim == 4:
        return (0, 1, 2)  # convolution [h, w, in, out]: per output channel
    return None


def quantize(w, axes: tuple[int, ...], xp=np) -> QuantizedArray:
    """Symmetric int8 quantisation of `w` with one scale per slice along the axes not in `axes`
    (`xp=jnp` inside a traced function, numpy on the host)."""
    w = xp.asarray(w, xp.float32)
    amax = xp.abs(w).max(axis=axes, keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    values = xp.clip(xp.rint(w / scale), -127, 127).astype(xp.int8)
    return QuantizedArray(values, scale)


def scale_axes(q: QuantizedArray) -> tuple[int, ...]:
    """The axes one scale of `q` spans (those of size 1 in its scale; reducing over a kept axis of size 1
    too changes nothing)."""
    return tuple(i for i, d in enumerate(np.shape(q.scale)) if d == 1)


def quantize_tree(tree: dict) -> dict:
    """`tree` (numpy or jax leaves) with its matrix-like weights quantised (see the module docstring);
    the other leaves are returned as they are."""
    flat = traverse_util.flatten_dict(tree)
    out = {}
    for path, leaf in flat.items():
        axes = None if is_quantized(leaf) else _reduced_axes(path[-1], np.ndim(leaf))
        out[path] = leaf if axes is None else quantize(jax.device_get(leaf), axes)
    return traverse_util.unflatten_dict(out)


def quantized_init(init_fn: Callable[[jax.Array], dict]) -> Callable[[jax.Array], dict]:
    """`init_fn` (`rng -> params`, leaves possibly boxed in flax `LogicallyPartitioned`) with its output's
    matrix-like weights quantised as `quantize_tree` chooses them; pure and jittable, so the train loop
    runs it under `eval_shape` (the abstract int8 tree and its logical axes) and `jit(out_shardings=...)`.
    The scale's logical names are the kernel's with None on the reduced axes."""
    def init(rng):
        out = {}
        for path, leaf in traverse_util.flatten_dict(init_fn(rng)).items():
            boxed = isinstance(leaf, nn.Partitioned)
            value = leaf.value if boxed else leaf
            axes = _reduced_axes(path[-1], np.ndim(value))
            if axes is None:
                out[path] = leaf
                continue
            q = quantize(value, axes, xp=jnp)
            if boxed:
                scale_names = tuple(None if i in axes else n for i, n in enumerate(leaf.names))
                q = QuantizedArray(leaf.replace(value=q.values), leaf.replace(value=q.scale, names=scale_names))
            out[path] = q
        return traverse_util.unflatten_dict(out)

    return init


def place(value, leaf: QuantizedArray) -> QuantizedArray:
    """A float tensor (a checkpoint's, numpy) quantised on the host like `leaf` (an abstract or real
    `QuantizedArray`: the same scale axes) and put on `leaf`'s shardings where its parts carry them.
    Quantising from the checkpoint's float32 values, one tensor at a time, keeps the host's extra
    memory to one tensor and the device's to the int8 tree."""
    q = quantize(np.asarray(value, np.float32), scale_axes(leaf))
    put = lambda x, like: jax.device_put(x, like.sharding) if getattr(like, "sharding", None) else jnp.asarray(x)  # noqa: E731
    return QuantizedArray(put(q.values, leaf.values), put(q.scale, leaf.scale))


def dequantize_tree(tree, dtype=jnp.float32):
    """`tree` with every quantised leaf dequantised to `dtype` (e.g. to save it in a float format)."""
    return jax.tree.map(lambda x: x.astype(dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def quantized_nbytes(tree) -> int:
    """Bytes `quantize_tree(tree)` would hold, from shapes alone (`tree` may hold ShapeDtypeStructs):
    int8 values plus float32 scales for the quantised leaves, the others as they are."""
    total = 0
    for path, leaf in traverse_util.flatten_dict(tree).items():
        shape = tuple(np.shape(leaf))
        axes = _reduced_axes(path[-1], len(shape))
        if axes is None:
            total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
        else:
            total += int(np.prod(shape)) + 4 * int(np.prod([1 if i in axes else d for i, d in enumerate(shape)]))
    return total


def is_quantized(leaf) -> bool:
    return isinstance(leaf, QuantizedArray)


def as_dicts(tree):
    """`tree` with each quantised leaf shown as `{"values": ..., "scale": ...}` (for listings that expect
    arrays with a dtype, e.g. the train loop's parameter overview)."""
    return jax.tree.map(lambda x: {"values": x.values, "scale": x.scale} if is_quantized(x) else x, tree,
                        is_leaf=is_quantized)


def param_count(tree) -> int:
    """Parameters in `tree`, a quantised leaf counting as the weight it stands for (its scales not counted)."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def tree_nbytes(tree) -> int:
    """Bytes the tree holds (a quantised leaf: its int8 values plus its float32 scales)."""
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(x.nbytes if is_quantized(x) else int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
               for x in leaves)
