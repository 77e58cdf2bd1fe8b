"""A workdir of this project -> the model, its parameters and its tokenizer (no training `Task`).

A workdir is what `python -m blip2_jax.main` writes: `checkpoints/<step>/` (the trainable tree, the
optimizer and the data position) and `run_config.json` (the run's config and the directory it was
started in). `load(path)` rebuilds the model from that config (`blip2_jax.spec.model.build`), reads
the newest checkpoint's trainable parameters and re-reads the frozen towers from where the run read
them, or re-draws them from its seed (`blip2_jax.spec.weights.frozen_tree`): the exact tree the run
trained against.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from blip2_jax import checkpoint as checkpoint_lib
from blip2_jax import sharding as sharding_lib
from blip2_jax.models.blip2 import Blip2Stage1, Blip2T5, layer_stacks
from blip2_jax.models.stacking import match_layout
from blip2_jax.spec import model as spec
from blip2_jax.spec import weights

TASKS = ("stage1", "stage2")


@dataclasses.dataclass
class Loaded:
    """A model ready to use. `tokenizer`: the LLM's (stage 2) or BERT + [DEC] (stage 1); `config`: the
    run's config (None for a Hugging Face directory); `step`: the checkpoint's step."""

    model: nn.Module
    params: Any
    tokenizer: Any
    config: Any = None
    step: Optional[int] = None

    @property
    def llm(self) -> str:
        """The LLM's HF model type ("opt", "llama", "qwen2", ..., "t5"), or "" for a stage-1 (retrieval) model."""
        return llm_kind(self.model)


def llm_kind(model: nn.Module) -> str:
    """The LLM's HF model type, "" for a stage-1 model."""
    if isinstance(model, Blip2Stage1):
        return ""
    return "t5" if isinstance(model, Blip2T5) else model.config.text.to_hf()["model_type"]


def run_config(path: str, frozen_dtype: Optional[Any] = None):
    """The config `path`'s run recorded (`checkpoint.load_run_config`), its frozen towers in
    `frozen_dtype` when given (float32, bfloat16 or "int8")."""
    return with_frozen_dtype(checkpoint_lib.load_run_config(path), frozen_dtype)


def with_frozen_dtype(config, frozen_dtype: Optional[Any]):
    """`config` with `model.frozen_dtype` set to `frozen_dtype` (a dtype or its name: float32, bfloat16,
    "int8") when given; `config` itself when None."""
    if frozen_dtype is None:
        return config
    name = frozen_dtype if isinstance(frozen_dtype, str) else np.dtype(frozen_dtype).name
    if name not in spec.FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype={name}: a workdir's frozen towers load as one of {spec.FROZEN_DTYPES}")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.frozen_dtype = name
    return config


def load(path: str, *, config=None, frozen_dtype: Optional[Any] = None, tokenizer_path: str = "",
         scan_layers: Optional[bool] = None) -> Loaded:
    """The stage-1 or stage-2 model of workdir `path` (see the module docstring).

    `config`: the run's config when the workdir predates `run_config.json` (e.g.
    `get_config("demo_opt")` of configs/stage2.py); `tokenizer_path`: another tokenizer directory;
    `scan_layers`: build the model with its layers scanned (True) or unrolled (False) whatever the run
    used (the checkpoint's tree is moved to that layout: `models.stacking.match_layout`).
    `frozen_dtype` (a dtype, or "int8": the frozen matrices int8-quantised as the train loop's
    `model.frozen_dtype="int8"` makes them) overrides the run's, also that of a given `config`.
    """
    if not checkpoint_lib.is_workdir(path):
        raise FileNotFoundError(f"{path}: not a workdir of this project (no {checkpoint_lib.CHECKPOINTS}/)")
    config = run_config(path, frozen_dtype) if config is None else with_frozen_dtype(config, frozen_dtype)
    if scan_layers is not None:
        with config.unlocked():
            config.model.scan_layers = bool(scan_layers)
    if config.get("task", "") not in TASKS:
        raise ValueError(f"{path}: a {config.get('task', '')!r} workdir; only stage-1 and stage-2 workdirs hold "
                         "a BLIP-2 model")
    built = spec.build(config, tokenizer_path)
    mesh = sharding_lib.make_mesh(config.mesh)
    rules = sharding_lib.axis_rules(tuple(config.mesh.axis_rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        frozen = weights.frozen_tree(config, built.model, mesh, rules)
    step, trainable = checkpoint_lib.latest_params(path)
    trainable = match_layout(trainable, layer_stacks(built.model.config))  # a run of either layout
    return Loaded(built.model, {**trainable, **frozen}, built.tokenizer, config, step)
