"""A standalone Hugging Face tower directory (config.json + safetensors) <-> our model and params.

The tower converters (`opt`, `t5`, `clip`, `bert`) each own their key map (`rules.Rule` lists) and
their config; what is left is the same for all of them and lives here: find the prefix a file
stores the tower under, check that every key is accounted for, read the tensors, and write a
directory that transformers loads.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.convert.hf_io import CheckpointError, CheckpointReader, write_hf_dir
from blip2_jax.convert.rules import Rule, check_keys, load_rules, save_rules


def detect_prefix(keys: Iterable[str], marker: str, prefixes: Sequence[str], what: str) -> str:
    """The first of `prefixes` under which the file holds `marker`; `CheckpointError` naming `what` if none."""
    keys = set(keys)
    for prefix in prefixes:
        if prefix + marker in keys:
            return prefix
    tried = " nor ".join(repr(p + marker) for p in prefixes)
    raise CheckpointError(f"no {what} in the file: neither {tried} is present")


def read_params(reader: CheckpointReader, rules: Sequence[Rule], *, ignore: Iterable[str] = (),
                dtype=np.float32) -> dict:
    """Our tree (numpy, cast to `dtype`) from an open directory.

    Every key of the file must be read by a rule or match an `ignore` regex, and every rule must
    find its key: otherwise `CheckpointError` lists the missing and the unexpected keys together.
    """
    check_keys(rules, reader.keys(), ignore=ignore, source=reader.path)
    return load_rules(reader.get, rules, dtype=np.dtype(dtype), source=reader.path)


def load(path: str, model_cls: Callable[[Any], Any], config_for_checkpoint: Callable[..., Any],
         rules: Callable[[Any], Sequence[Rule]], *, ignore: Iterable[str] = (), dtype=jnp.float32,
         **overrides) -> tuple[Any, dict]:
    """A tower directory -> `(model_cls(config), params)`, params as jax arrays in `dtype`.

    `config_for_checkpoint(hf_config, keys, dtype=, param_dtype=, **overrides)` builds the config
    from the file's `config.json` and keys (`dtype` is both the storage and the compute dtype);
    `rules(config)` is its key map.
    """
    with CheckpointReader(path) as reader:
        config = config_for_checkpoint(reader.config, reader.keys(), dtype=dtype, param_dtype=dtype, **overrides)
        params = read_params(reader, rules(config), ignore=ignore, dtype=dtype)
    return model_cls(config), jax.tree.map(jnp.asarray, params)


def save(path: str, hf_config: dict, params: dict, rules: Sequence[Rule], dtype=np.float32) -> None:
    """Write `params` (any dtype, on any device) as a directory transformers loads: `hf_config` as
    config.json, the tensors (in `dtype`, through float32 on the host) as model.safetensors."""
    host = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32)), params)
    write_hf_dir(path, hf_config, save_rules(host, rules, dtype=dtype))
