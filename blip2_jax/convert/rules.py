"""Key maps between Hugging Face state dicts and our parameter trees.

A tower's converter lists `Rule`s: one HF key, one path in our tree, and a `Transform` that maps
the HF tensor to ours and back. The same list drives loading and saving, so a round trip is exact
by construction and every key is accounted for in both directions.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from blip2_jax.convert.hf_io import CheckpointError, strict_merge

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
        value = get(self.hf_key)
        if self.chunk is not None:
            index, count = self.chunk
            value = np.split(value, count, axis=0)[index]
        return self.transform.to_ours(value)


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


def load_rules(get: Callable[[str], np.ndarray], rules: Iterable[Rule], *, dtype=np.float32,
               source: str = "checkpoint") -> Tree:
    """Build our tree from HF tensors, one tensor at a time, cast to `dtype`."""
    flat = {}
    for rule in rules:
        try:
            value = rule.read(get)
        except KeyError:
            raise CheckpointError(f"{source}: missing tensor {rule.hf_key!r}") from None
        flat[rule.path] = np.asarray(value).astype(dtype)
    return traverse_util.unflatten_dict(flat)


def save_rules(params: Mapping, rules: Iterable[Rule], *, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF tensors from our tree; fails if a parameter of ours is not covered by a rule."""
    rules = list(rules)
    flat = traverse_util.flatten_dict(dict(params))
    out, chunks = {}, {}
    for rule in rules:
        value = np.ascontiguousarray(rule.transform.to_hf(np.asarray(flat[rule.path])).astype(dtype))
        if rule.chunk is None:
            out[rule.hf_key] = value
        else:
            chunks.setdefault(rule.hf_key, [None] * rule.chunk[1])[rule.chunk[0]] = value
    for key, parts in chunks.items():
        like = next(p for p in parts if p is not None)
        out[key] = np.concatenate([np.zeros_like(like) if p is None else p for p in parts], axis=0)
    covered = {r.path for r in rules}
    leftover = [".".join(p) for p in flat if p not in covered]
    if leftover:
        raise CheckpointError(f"parameters with no Hugging Face key: {leftover}")
    return out


def check_keys(rules: Iterable[Rule], found: Iterable[str], *, ignore: Iterable[str] = (), source: str) -> None:
    strict_merge((r.hf_key for r in rules), found, ignore=ignore, source=source)


def prefixed(rules: Iterable[Rule], hf_prefix: str = "", path_prefix: tuple[str, ...] = ()) -> list[Rule]:
    return [dataclasses.replace(r, hf_key=hf_prefix + r.hf_key, path=path_prefix + r.path) for r in rules]
