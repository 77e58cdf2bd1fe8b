"""`from_pretrained` / `save_pretrained`: the public entry points for Hugging Face BLIP-2 directories."""
from __future__ import annotations

import logging
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.convert import blip2 as hf_blip2
from blip2_jax.convert.hf_io import CheckpointReader, write_hf_dir
from blip2_jax.convert.rules import check_keys, flatten, load_rules, save_rules, set_path
from blip2_jax.models.blip2 import Blip2Config, Blip2Stage1, Blip2T5, build_model

log = logging.getLogger(__name__)


def abstract_params(model: nn.Module) -> dict:
    """Shapes and dtypes of the model's parameters (nothing is allocated)."""
    cfg: Blip2Config = model.config
    size = cfg.vision.image_size
    pixels = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    args = [pixels, ids, ids]
    if isinstance(model, Blip2T5):
        args += [ids, ids]
    variables = jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a), *args)
    return nn.unbox(variables["params"])


def _cast_like(tree: dict, abstract: dict) -> dict:
    flat = flatten(tree)
    out: dict = {}
    for path, leaf in flatten(abstract).items():
        if path in flat:
            set_path(out, path, jnp.asarray(flat[path], dtype=leaf.dtype))
    return out


def from_pretrained(path: str, *, dtype: Any = jnp.float32, frozen_dtype: Optional[Any] = None):
    """`(model, params)` for a Hugging Face BLIP-2 directory or a workdir of this project (see DESIGN.md,
    "Public API").

    HF directory: `dtype` is the parameter/compute dtype of the trainable part, `frozen_dtype`
    (default `dtype`) that of the frozen ViT and LLM. Weights are read tensor by tensor from
    safetensors.
    Workdir (`<path>/checkpoints/`, a stage-1 or stage-2 run): the model its recorded config
    (`run_config.json`) describes, the newest checkpoint's trainable parameters, and the frozen towers
    re-read from where the run read them (or re-drawn from its seed when it had none); the frozen
    towers in `frozen_dtype` if given, else the run's `model.frozen_dtype`.
    """
    from blip2_jax.checkpoint import is_workdir

    if is_workdir(path):
        return _from_workdir(path, frozen_dtype)
    with CheckpointReader(path) as reader:
        config = hf_blip2.config_from_hf(reader.config, reader.keys(), dtype=dtype, frozen_dtype=frozen_dtype)
        model = build_model(config)
        rules = hf_blip2.rules(config)
        check_keys(rules, reader.keys(), ignore=hf_blip2.IGNORED_HF_KEYS, source=path)
        tree = load_rules(reader.get, rules, source=path)
    abstract = abstract_params(model)
    if isinstance(model, Blip2Stage1):
        tree["temp"] = np.float32(config.temperature_init)  # HF retrieval checkpoints carry no temperature
        log.info("%s: no ITC temperature in the checkpoint; starting from %s", path, config.temperature_init)
    params = _cast_like(tree, abstract)
    _check_complete(params, abstract, path)
    return model, params


def _from_workdir(path: str, frozen_dtype: Optional[Any]):
    from blip2_jax.checkpoint import load_run_config
    from blip2_jax.evaluate.load import load_workdir

    config = load_run_config(path)
    if frozen_dtype is not None:
        name = np.dtype(frozen_dtype).name
        if name not in ("float32", "bfloat16"):
            raise ValueError(f"frozen_dtype={name}: a workdir's frozen towers load as float32 or bfloat16")
        config.model.frozen_dtype = name
    loaded = load_workdir(path, config)
    return loaded.model, loaded.params


def _check_complete(params: dict, abstract: dict, source: str) -> None:
    have, want = set(flatten(params)), set(flatten(abstract))
    missing = sorted(".".join(p) for p in want - have)
    if missing:
        raise ValueError(f"{source}: the model has parameters the checkpoint did not provide: {missing}")


def save_pretrained(model: nn.Module, params: dict, path: str, *, dtype: Any = np.float32) -> None:
    """Write a Hugging Face directory (`config.json` + `model.safetensors`) that transformers 5.x loads
    into the matching Blip2 class and runs with the same outputs."""
    config: Blip2Config = model.config
    params = {k: v for k, v in params.items() if k not in hf_blip2.STAGE1_ONLY}
    if config.text is None and not config.qformer.use_text_input:
        raise ValueError("a retrieval checkpoint needs the Q-Former's text path (use_text_input=True)")
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), dtype=np.float32), params)
    tensors = save_rules(host, hf_blip2.rules(config), dtype=dtype)
    hf_config = hf_blip2.config_to_hf(config)
    hf_config["torch_dtype"] = np.dtype(dtype).name
    write_hf_dir(path, hf_config, tensors)
