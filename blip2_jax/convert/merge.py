"""`merge_params`: put loaded weights into a fresh (or abstract) parameter tree.

Every loader of this project ends here: a Hugging Face BLIP-2 directory (`from_pretrained`), BERT
into the Q-Former, a LAVIS stage-1 directory, a frozen tower for the train loop (placed shard by
shard on the loop's shardings), a stage-1 workdir into stage 2. One function, one set of checks:
shapes, dtype kinds (a float tensor never lands in an integer leaf), the cast to the fresh leaf's
dtype, the placement on its sharding, and one error that names every missing, unexpected and
misshapen key together. A target leaf that is a `models.quant.QuantizedArray` (int8 frozen towers,
`model.frozen_dtype="int8"`) takes a float tensor, quantised on the host and placed on its shardings.
"""
from __future__ import annotations

import logging
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blip2_jax.convert.hf_io import CheckpointError
from blip2_jax.models import quant

log = logging.getLogger(__name__)
_POLICIES = ("error", "keep", "drop")


_LEAF_NAMES = ("kernel", "bias", "scale", "embedding")
_TOWERS = ("vision", "language_model")


def _name(path) -> str:
    return "/".join(map(str, path))


def _names(paths) -> list[str]:
    return sorted(_name(p) for p in paths)


def _summary(paths) -> str:
    """Module paths with leaf names and the towers folded: 'qformer/layer_0/crossattention, temp, vision'."""
    mods = set()
    for p in paths:
        p = p[:-1] if len(p) > 1 and p[-1] in _LEAF_NAMES else p
        mods.add(p[0] if p[0] in _TOWERS else "/".join(p[:3]))
    return ", ".join(sorted(mods))


def _place(value, leaf):
    """`value` cast to `leaf`'s dtype, on `leaf`'s sharding when it has one (a jax.Array, or a
    ShapeDtypeStruct that carries one), else as a jax array on the default device; quantised like `leaf`
    when that is a `QuantizedArray`."""
    if quant.is_quantized(leaf):
        return quant.place(value, leaf)
    value = np.asarray(value).astype(leaf.dtype) if not isinstance(value, jax.Array) else value.astype(leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)


def _is_float(leaf) -> bool:
    """Whether `leaf` holds a float tensor (a quantised one does: it stands for float weights)."""
    return quant.is_quantized(leaf) or jnp.issubdtype(leaf.dtype, jnp.floating)


def merge_params(fresh: Mapping, loaded: Mapping, *, source: str, missing: str = "error",
                 unexpected: str = "error") -> dict:
    """`fresh`'s tree with `loaded`'s leaves put in, cast and placed like the leaves they replace.

    Args:
      fresh: the target tree: real arrays (a freshly initialised model) or `jax.ShapeDtypeStruct`s
        (an abstract one, optionally carrying `.sharding`). Defines the structure, dtypes, shardings.
      loaded: a (possibly partial) nested dict of numpy / jax arrays, e.g. from a checkpoint.
      source: what `loaded` came from (a path), for the messages.
      missing: a `fresh` leaf that `loaded` lacks: "error", or "keep" the fresh leaf (logged; needs
        real arrays, not abstract ones).
      unexpected: a `loaded` leaf that `fresh` lacks: "error", or "drop" it (logged).

    Raises CheckpointError (a ValueError) naming every problem at once (missing / unexpected / shape / dtype).
    """
    if missing not in ("error", "keep") or unexpected not in ("error", "drop"):
        raise ValueError(f"merge_params: missing={missing!r} (error|keep), unexpected={unexpected!r} (error|drop)")
    want = traverse_util.flatten_dict(dict(fresh))
    have = traverse_util.flatten_dict(dict(loaded))
    lacking = [p for p in want if p not in have]
    extra = [p for p in have if p not in want]
    problems = []
    if lacking and (missing == "error" or any(isinstance(want[p], jax.ShapeDtypeStruct) for p in lacking)):
        problems.append(f"missing ({len(lacking)}): {', '.join(_names(lacking))}")
    if extra and unexpected == "error":
        problems.append(f"unexpected ({len(extra)}): {', '.join(_names(extra))}")
    for path in sorted(set(want) & set(have)):
        value, leaf = have[path], want[path]
        if tuple(np.shape(value)) != tuple(leaf.shape):
            problems.append(f"{_name(path)}: shape {tuple(np.shape(value))} in the checkpoint, "
                            f"{tuple(leaf.shape)} in the model")
        elif _is_float(leaf) != jnp.issubdtype(np.asarray(value).dtype, jnp.floating):
            problems.append(f"{_name(path)}: dtype {np.asarray(value).dtype} in the checkpoint, "
                            f"{'int8-quantised float' if quant.is_quantized(leaf) else leaf.dtype} in the model")
    if problems:
        raise CheckpointError(f"{source}: the checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    if lacking:
        log.warning("%s: not in the checkpoint, freshly initialised: %s", source, _summary(lacking))
    if extra:
        log.info("%s: in the checkpoint, not used by this model: %s", source, _summary(extra))
    merged = {p: _place(have[p], leaf) if p in have else leaf for p, leaf in want.items()}
    return traverse_util.unflatten_dict(merged)

