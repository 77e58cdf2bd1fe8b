"""Attention through the Pallas TPU flash-attention kernel (`model.attention_impl="pallas"`).

`jax.experimental.pallas.ops.tpu.flash_attention` never materialises the `[B, H, Tq, Tk]` probabilities:
the forward pass keeps one query block's running max and sum in VMEM, the backward pass recomputes the
scores block by block (its own `custom_vjp`: gradients for q, k, v and the additive bias). What it
asks of its inputs, and how this module meets it with the semantics of `layers.dot_product_attention`:

- Heads-first `[B, H, T, D]`, as many K/V heads as query heads: grouped-query K/V heads are repeated.
- The kernel adds its bias *before* multiplying by `sm_scale`; ours is added to the scaled scores
  (T5's relative bias, unscaled scores, is the case where that differs), so q is scaled here and the
  kernel runs with `sm_scale=1`.
- Key blocks are multiples of 128 (the lane width) and must divide the key length; query blocks must
  divide the query length. Lengths are padded (keys to a multiple of 128; queries to one of 16 up to
  128, of 128 beyond) and the output sliced back; padded keys are masked through the kernel's segment
  ids (padding id 0, real keys 1), so no `[B, H, Tq, Tk]` mask is built for them. Padded queries see
  the real keys and their rows are discarded.
- The bias is an input of shape `[B, H, Tq, Tk]`: ours (a mask, T5's relative bias) is broadcast to it
  in float32 (the scores' precision), so a masked call still reads one float per score from HBM.
- Head dims up to 128, or multiples of 128; anything else is refused with a ValueError.
- A Mosaic kernel is not partitioned by XLA's SPMD pass: under a mesh (`jax.set_mesh`, as the train
  step, the planner and the evaluation traces run) the call is a `shard_map` whose blocks split the
  batch and the heads as the logical axis rules in force split "batch" and "heads" (replicated where
  the mesh size does not divide them, e.g. a one-image decode on a 4-chip slice).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
from jax.sharding import PartitionSpec as P

LANES = 128  # the kernel's key blocks (and its m / l statistics) are multiples of the lane width
SUBLANES = 16  # short query lengths are padded to this (bfloat16's sublane tile) instead of 128
BLOCKS = (512, 256, 128)  # the block sizes tried, largest first, for padded lengths beyond 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def padded_lengths(q_len: int, kv_len: int) -> tuple[int, int]:
    """The query and key lengths the kernel runs at: keys to a multiple of 128; queries to a multiple of
    16 up to 128 (a decoding step's one query should not pay for 128), of 128 beyond."""
    q_pad = _round_up(q_len, SUBLANES) if q_len <= LANES else _round_up(q_len, LANES)
    return q_pad, _round_up(kv_len, LANES)


def _block(n: int) -> int:
    """The largest of `BLOCKS` that divides `n`, or `n` itself below 128 (a block as long as the axis)."""
    return next((b for b in BLOCKS if n % b == 0), n)


def block_sizes(q_len: int, kv_len: int) -> tpu_flash.BlockSizes:
    """The forward and backward tiles for padded lengths: one query and one key block size throughout."""
    bq, bk = _block(q_len), _block(kv_len)
    return tpu_flash.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                                block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                                block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)


def check_inputs(q_shape: tuple, k_shape: tuple, v_shape: tuple) -> None:
    """Refuses what the kernel cannot take, naming the value (q `[B, Tq, H, D]`, k/v `[B, Tk, KV, D]`)."""
    d = q_shape[-1]
    if k_shape[-1] != d or v_shape[-1] != d:
        raise ValueError(f"pallas attention: head dims q {d}, k {k_shape[-1]}, v {v_shape[-1]} must be equal")
    if d > LANES and d % LANES:
        raise ValueError(f"pallas attention: head_dim {d} is above {LANES} and not a multiple of it, "
                         f"which the TPU flash kernel cannot tile; use attention_impl='xla'")
    if q_shape[-2] % k_shape[-2]:
        raise ValueError(f"pallas attention: {q_shape[-2]} query heads are not a multiple of "
                         f"{k_shape[-2]} key/value heads")


def _pad(x: jax.Array, axis: int, length: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def _key_padding_segments(batch: int, q_len: int, kv_len: int, kv_real: int) -> tpu_flash.SegmentIds:
    """Segment ids that mask the padded keys: every query 1, the real keys 1, the padded keys 0."""
    kv = (jnp.arange(kv_len) < kv_real).astype(jnp.int32)
    return tpu_flash.SegmentIds(q=jnp.ones((batch, q_len), jnp.int32), kv=jnp.broadcast_to(kv, (batch, kv_len)))


def _mesh_axes(logical: str, size: int, mesh) -> Any:
    """The mesh axes the rules in force give `logical`, or None where their product does not divide `size`."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = 1
    for name in names:
        shards *= mesh.shape[name]
    return axes if names and size % shards == 0 else None


def _kernel(q, k, v, bias, segments, sizes):
    return tpu_flash.flash_attention(q, k, v, bias, segments, sm_scale=1.0, block_sizes=sizes)


def _call_kernel(q, k, v, bias, segments, sizes):
    """The kernel on `[B, H, T, D]` inputs; under a mesh, a `shard_map` over batch and heads (module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _kernel(q, k, v, bias, segments, sizes)
    batch, heads = _mesh_axes("batch", q.shape[0], mesh), _mesh_axes("heads", q.shape[1], mesh)
    qkv, rows = P(batch, heads, None, None), P(batch, None)
    specs = (qkv, qkv, qkv, None if bias is None else qkv,
             None if segments is None else tpu_flash.SegmentIds(rows, rows))
    return jax.shard_map(lambda *a: _kernel(*a, sizes), mesh=mesh, in_specs=specs, out_specs=qkv,
                         check_vma=False)(q, k, v, bias, segments)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array] = None, *,
                    scale: float, dtype: Any = jnp.float32) -> jax.Array:
    """`layers.dot_product_attention`'s semantics (no dropout) on the TPU flash kernel.

    q `[B, Tq, H, D]`, k and v `[B, Tk, KV, D]` (H a multiple of KV), `bias` broadcastable to
    `[B, H, Tq, Tk]`, added to the scaled scores. Returns `[B, Tq, H, D]` in `dtype`. On a backend
    other than TPU the kernel lowers only inside `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`.
    """
    check_inputs(q.shape, k.shape, v.shape)
    (b, tq, h, _), tk = q.shape, k.shape[1]
    if k.shape[2] != h:
        k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
    q = (q.astype(jnp.float32) * scale).astype(dtype)  # the scale before the bias (module docstring)
    q, k, v = (x.astype(dtype).transpose(0, 2, 1, 3) for x in (q, k, v))
    q_pad, k_pad = padded_lengths(tq, tk)
    q, k, v = _pad(q, 2, q_pad), _pad(k, 2, k_pad), _pad(v, 2, k_pad)
    if bias is not None:
        bias = jnp.broadcast_to(bias.astype(jnp.float32), (b, h, tq, tk))
        bias = _pad(_pad(bias, 2, q_pad), 3, k_pad)
    segments = _key_padding_segments(b, q_pad, k_pad, tk) if k_pad != tk else None
    out = _call_kernel(q, k, v, bias, segments, block_sizes(q_pad, k_pad))
    return out[:, :, :tq].transpose(0, 2, 1, 3).astype(dtype)
