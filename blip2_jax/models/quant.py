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
"""
from __future__ import annotations

import dataclasses
from typing import Any

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


def quantize(w, axes: tuple[int, ...]) -> QuantizedArray:
    """Symmetric int8 quantisation of `w` with one scale per slice along the axes not in `axes`."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return QuantizedArray(values, scale)


def quantize_tree(tree: dict) -> dict:
    """`tree` (numpy or jax leaves) with its matrix-like weights quantised (see the module docstring);
    the other leaves are returned as they are."""
    flat = traverse_util.flatten_dict(tree)
    out = {}
    for path, leaf in flat.items():
        axes = _reduced_axes(path[-1], np.ndim(leaf))
        out[path] = leaf if axes is None else quantize(jax.device_get(leaf), axes)
    return traverse_util.unflatten_dict(out)


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


def tree_nbytes(tree) -> int:
    """Bytes the tree holds (a quantised leaf: its int8 values plus its float32 scales)."""
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(x.nbytes if is_quantized(x) else int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
               for x in leaves)
