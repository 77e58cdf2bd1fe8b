"""The two layouts of a tower's layers in a parameter tree, and the moves between them.

A tower built with `scan_layers=False` keeps layer i at `at/{prefix}{i}/...`; built with
`scan_layers=True` it keeps every layer in one subtree `at/{stacked}/...` whose leaves carry a leading
layer axis (`nn.scan`). The Q-Former scans groups of `period` layers (cross-attention comes every
`period` layers): layer i is `at/{stacked}/{prefix}{i % period}/...` at index `i // period`.

A `LayerStack` names both layouts of one stack; each tower module lists its stacks
(`layer_stacks(config, at)`), `models.blip2.layer_stacks` those of a composition. The same names
serve the converters (`convert.rules.stack_rules`: per-layer rules read into stacked leaves) and
trees read from this project's checkpoints (`match_layout`, `stack_layers`, `unstack_layers`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """One stack of `num_layers` layers under `at`: unrolled `{prefix}{i}`, scanned `{stacked}` (see the
    module docstring); `scanned` says which layout the model in hand uses."""

    at: Path
    prefix: str  # "layers_" (ViT, OPT), "layer_" (Q-Former), "blocks_" (T5)
    num_layers: int
    scanned: bool
    period: int = 0  # > 0: scanned in groups of `period` layers (the Q-Former)
    stacked: str = "layers"

    def _layer(self, name: str) -> Optional[int]:
        m = re.fullmatch(re.escape(self.prefix) + r"(\d+)", name)
        return int(m.group(1)) if m else None

    def to_stacked(self, path: Path) -> Optional[tuple[Path, int]]:
        """`(stacked path, index on the layer axis)` of an unrolled per-layer path; None for other paths."""
        n = len(self.at)
        if path[:n] != self.at or len(path) <= n:
            return None
        i = self._layer(path[n])
        if i is None or i >= self.num_layers:
            return None
        if self.period:
            return self.at + (self.stacked, f"{self.prefix}{i % self.period}") + path[n + 1:], i // self.period
        return self.at + (self.stacked,) + path[n + 1:], i

    def to_unrolled(self, path: Path, index: int) -> Optional[Path]:
        """The unrolled path of entry `index` of a stacked path; None for paths outside this stack."""
        n = len(self.at)
        if path[:n] != self.at or len(path) <= n + 1 or path[n] != self.stacked:
            return None
        if not self.period:
            return self.at + (f"{self.prefix}{index}",) + path[n + 1:]
        j = self._layer(path[n + 1])
        return None if j is None else self.at + (f"{self.prefix}{index * self.period + j}",) + path[n + 2:]


def _stack(values: list):
    """The layers' leaves stacked on a new axis 0: jax arrays (tracers too) with jnp, numpy with numpy;
    a flax `Partitioned` box (from `init`) keeps its box and gains the logical axis "layers" in front."""
    if isinstance(values[0], meta.Partitioned):
        stacked = _stack([v.value for v in values])
        return values[0].replace_boxed(stacked).add_axis(0, {meta.PARTITION_NAME: "layers"})
    if any(isinstance(v, jax.Array) for v in values):
        return jnp.stack(values)
    return np.stack([np.asarray(v) for v in values])


def stack_layers(tree: dict, stacks: Sequence[LayerStack]) -> dict:
    """`tree` with the unrolled layers of every stack in `stacks` stacked along a new leading axis;
    everything else (and a stack already stacked) unchanged. Numpy stays numpy, jax arrays jax."""
    flat = traverse_util.flatten_dict(dict(tree))
    out, groups = {}, {}
    for path, value in flat.items():
        hit = next((h for s in stacks for h in [s.to_stacked(path)] if h is not None), None)
        if hit is None:
            out[path] = value
        else:
            groups.setdefault(hit[0], {})[hit[1]] = value
    for path, parts in groups.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"{'/'.join(path)}: layers {sorted(parts)} are not 0..n-1")
        out[path] = _stack([parts[i] for i in range(len(parts))])
    return traverse_util.unflatten_dict(out)


def unstack_layers(tree: dict, stacks: Sequence[LayerStack]) -> dict:
    """`tree` with every stacked stack of `stacks` split back into its unrolled layers (the inverse of
    `stack_layers`)."""
    flat = traverse_util.flatten_dict(dict(tree))
    out = {}
    for path, value in flat.items():
        stack = next((s for s in stacks if s.to_unrolled(path, 0) is not None), None)
        if stack is None:
            out[path] = value
            continue
        for index in range(np.shape(value)[0]):
            out[stack.to_unrolled(path, index)] = value[index]
    return traverse_util.unflatten_dict(out)


def match_layout(tree: dict, stacks: Sequence[LayerStack]) -> dict:
    """`tree` (e.g. a checkpoint's, in either layout) in the layout of the model `stacks` describe:
    the stacks it scans stacked, the others unrolled."""
    tree = stack_layers(tree, [s for s in stacks if s.scanned])
    return unstack_layers(tree, [s for s in stacks if not s.scanned])
