"""Key maps between Hugging Face state dicts and our parameter trees.

A tower's converter lists `Rule`s: one HF key, one path in our tree, and a `Transform` that maps
the HF tensor to ours and back. The same list drives loading and saving, so a round trip is exact
by construction and every key is accounted for in both directions.

A tower built with `scan_layers` keeps its layers stacked (`blip2_jax.models.stacking`): its
converter writes the same per-layer rules and passes them through `stack_rules`, which merges the
rules of one parameter in every layer into a `StackedRule` (read: the layers' tensors stacked on a
new leading axis; save: split back). One key map, two layouts.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np
from flax import traverse_util

from blip2_jax.convert.hf_io import CheckpointError, strict_merge
from blip2_jax.models.stacking import LayerStack

Tree = dict


@dataclasses.dataclass(frozen=True)
class Transform:
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda x: x, lambda x: x)
# torch Linear weight [out, in] <-> our kernel [in, out].
LINEAR = Transform(lambda x: x.T, lambda x: x.T)
# torch Conv2d weight [O, I, H, W] <-> flax Conv kernel [H, W, I, O].
CONV = Transform(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


def reshape(ours_shape: tuple[int, ...], hf_shape: tuple[int, ...]) -> Transform:
    return Transform(lambda x: x.reshape(ours_shape), lambda x: x.reshape(hf_shape))


@dataclasses.dataclass(frozen=True)
class Rule:
    """`hf_key` <-> `path`. With `chunk=(i, n)` the HF tensor is fused: ours is its i-th of n equal
    parts along axis 0 (HF's fused ViT `qkv`); chunks no rule names are written as zeros."""

    hf_key: str
    path: tuple[str, ...]
    transform: Transform = IDENTITY
    chunk: tuple[int, int] | None = None

    def read(self, get: Callable[[str], np.ndarray]) -> np.ndarray:
        """Our leaf from the HF tensors `get` returns; KeyError(hf_key) when the file lacks it."""
        try:
            value = get(self.hf_key)
        except KeyError:
            raise KeyError(self.hf_key) from None
        if self.chunk is not None:
            index, count = self.chunk
            value = np.split(value, count, axis=0)[index]
        return self.transform.to_ours(value)

    @property
    def hf_keys(self) -> tuple[str, ...]:
        return (self.hf_key,)

    def write(self, value: np.ndarray) -> list[tuple["Rule", np.ndarray]]:
        """`[(rule, HF tensor)]` for our leaf `value` (one pair; `StackedRule` gives one per layer)."""
        return [(self, self.transform.to_hf(value))]

    def renamed(self, hf_key: Callable[[str], str], path_prefix: tuple[str, ...] = ()) -> "Rule":
        """This rule with its HF key mapped by `hf_key` and `path_prefix` before its path."""
        return dataclasses.replace(self, hf_key=hf_key(self.hf_key), path=path_prefix + self.path)


@dataclasses.dataclass(frozen=True)
class StackedRule:
    """The rules of one parameter in every layer of a scanned stack (`parts`, in layer order) as one
    leaf at `path`: read, the layers' tensors stacked along a new leading axis; saved, split back."""

    path: tuple[str, ...]
    parts: tuple[Rule, ...]

    def read(self, get: Callable[[str], np.ndarray]) -> np.ndarray:
        return np.stack([part.read(get) for part in self.parts])

    @property
    def hf_keys(self) -> tuple[str, ...]:
        return tuple(part.hf_key for part in self.parts)

    def write(self, value: np.ndarray) -> list[tuple[Rule, np.ndarray]]:
        if len(value) != len(self.parts):
            raise CheckpointError(f"{'/'.join(self.path)}: {len(value)} layers stacked, the model has {len(self.parts)}")
        return [pair for part, layer in zip(self.parts, value) for pair in part.write(layer)]

    def renamed(self, hf_key: Callable[[str], str], path_prefix: tuple[str, ...] = ()) -> "StackedRule":
        return StackedRule(path_prefix + self.path, tuple(p.renamed(hf_key, path_prefix) for p in self.parts))


AnyRule = Union[Rule, StackedRule]


def stack_rules(rules: Iterable[AnyRule], stacks: Sequence[LayerStack]) -> list[AnyRule]:
    """`rules` with the per-layer rules of every scanned stack of `stacks` merged into `StackedRule`s
    (at the place of their layer-0 rule); other rules, and stacks that are not scanned, unchanged."""
    scanned = [s for s in stacks if s.scanned]
    out: list = []
    groups: dict[tuple[str, ...], dict[int, Rule]] = {}
    for rule in rules:
        hit = next((h for s in scanned for h in [s.to_stacked(rule.path)] if h is not None), None)
        if hit is None:
            out.append(rule)
            continue
        path, index = hit
        if path not in groups:
            groups[path] = {}
            out.append(path)  # a placeholder, replaced below
        groups[path][index] = rule
    for path, parts in groups.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"{'/'.join(path)}: rules for layers {sorted(parts)}, not 0..n-1")
    return [StackedRule(r, tuple(groups[r][i] for i in range(len(groups[r])))) if isinstance(r, tuple) else r
            for r in out]


def linear(hf_prefix: str, path: tuple[str, ...], bias: bool = True) -> list[Rule]:
    """`{hf_prefix}.weight/.bias` <-> `path + (kernel|bias)`."""
    rules = [Rule(f"{hf_prefix}.weight", path + ("kernel",), LINEAR)]
    if bias:
        rules.append(Rule(f"{hf_prefix}.bias", path + ("bias",)))
    return rules


def layer_norm(hf_prefix: str, path: tuple[str, ...], bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{hf_prefix}.weight", path + ("scale",))]
    if bias:
        rules.append(Rule(f"{hf_prefix}.bias", path + ("bias",)))
    return rules


def embedding(hf_key: str, path: tuple[str, ...]) -> list[Rule]:
    return [Rule(hf_key, path + ("embedding",))]


def load_rules(get: Callable[[str], np.ndarray], rules: Iterable[AnyRule], *, dtype=np.float32,
               source: str = "checkpoint") -> Tree:
    """Build our tree from HF tensors, one leaf at a time, cast to `dtype`."""
    flat = {}
    for rule in rules:
        try:
            value = rule.read(get)
        except KeyError as e:
            raise CheckpointError(f"{source}: missing tensor {e.args[0]!r}") from None
        flat[rule.path] = np.asarray(value).astype(dtype)
    return traverse_util.unflatten_dict(flat)


def save_rules(params: Mapping, rules: Iterable[AnyRule], *, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF tensors from our tree; fails if a parameter of ours is not covered by a rule."""
    rules = list(rules)
    flat = traverse_util.flatten_dict(dict(params))
    out, chunks = {}, {}
    for rule in rules:
        for part, value in rule.write(np.asarray(flat[rule.path])):
            value = np.ascontiguousarray(value.astype(dtype))
            if part.chunk is None:
                out[part.hf_key] = value
            else:
                chunks.setdefault(part.hf_key, [None] * part.chunk[1])[part.chunk[0]] = value
    for key, parts in chunks.items():
        like = next(p for p in parts if p is not None)
        out[key] = np.concatenate([np.zeros_like(like) if p is None else p for p in parts], axis=0)
    covered = {r.path for r in rules}
    leftover = [".".join(p) for p in flat if p not in covered]
    if leftover:
        raise CheckpointError(f"parameters with no Hugging Face key: {leftover}")
    return out


def check_keys(rules: Iterable[AnyRule], found: Iterable[str], *, ignore: Iterable[str] = (), source: str) -> None:
    strict_merge((key for r in rules for key in r.hf_keys), found, ignore=ignore, source=source)


def prefixed(rules: Iterable[AnyRule], hf_prefix: str = "", path_prefix: tuple[str, ...] = ()) -> list[AnyRule]:
    return [r.renamed(lambda key: hf_prefix + key, path_prefix) for r in rules]
