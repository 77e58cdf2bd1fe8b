"""Models for evaluation: a Hugging Face BLIP-2 directory or a workdir of this project.

- HF directory (`config.json` + safetensors): `blip2_jax.from_pretrained`; the tokenizer from the
  directory (or `tokenizer`).
- Workdir (`<dir>/checkpoints/<step>/state`): the config the run recorded (`run_config.json`), or
  `train_config` (e.g. `configs/stage2.py:demo_opt`, for workdirs older than that record) rebuilds
  the model; the trainable tree is
  the newest checkpoint's `params`, the frozen towers are loaded (or drawn, for a random frozen
  tower, from the same seed) exactly as the train loop does on a (re)start.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax import checkpoint as checkpoint_lib
from blip2_jax.models.blip2 import Blip2OPT, Blip2Stage1

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Loaded:
    """A model ready to evaluate. `tokenizer`: the LLM's (stage 2) or BERT + [DEC] (stage 1)."""

    model: nn.Module
    params: Any
    tokenizer: Any
    llm: str  # "opt", "t5", or "" for a stage-1 (retrieval) model


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> `get_config(arg)` (as `--config` does), with a clear error."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train_config: {path!r} does not exist (expected configs/<name>.py[:variant])")
    module_spec = importlib.util.spec_from_file_location(f"_eval_train_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def llm_kind(model: nn.Module) -> str:
    if isinstance(model, Blip2Stage1):
        return ""
    return "opt" if isinstance(model, Blip2OPT) else "t5"


def load_model(path: str, *, train_config=None, tokenizer: str = "", frozen_dtype: str = "float32") -> Loaded:
    """The model at `path` (HF BLIP-2 directory or workdir; see the module docstring)."""
    if not path:
        raise ValueError("config.model is empty: pass --config.model=PATH (an HF BLIP-2 directory or a workdir)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if frozen_dtype not in DTYPES:
        raise ValueError(f"config.frozen_dtype={frozen_dtype!r}: expected one of {tuple(DTYPES)}")
    if checkpoint_lib.is_workdir(path):
        if train_config is None:  # the config the run recorded (checkpoint_lib.save_run_config)
            train_config = checkpoint_lib.load_run_config(path)
        return load_workdir(path, train_config, tokenizer)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json and no checkpoints/: neither a Hugging Face BLIP-2 "
                                "directory nor a workdir of this project")
    import blip2_jax
    from blip2_jax.data import text as data_text

    model, params = blip2_jax.from_pretrained(path, frozen_dtype=DTYPES[frozen_dtype])
    kind = llm_kind(model)
    tok_dir = tokenizer or path
    tok = data_text.load_bert_tokenizer(tok_dir) if not kind else data_text.load_tokenizer(tok_dir)
    return Loaded(model, params, tok, kind)


def load_workdir(workdir: str, config, tokenizer: str = "") -> Loaded:
    """The stage-1 or stage-2 model `config` describes, with `workdir`'s newest trainable parameters
    and the frozen towers loaded (or re-drawn from the seed) as the train loop does."""
    from blip2_jax import sharding as sharding_lib
    from blip2_jax.data import text as data_text
    from blip2_jax.train import loop

    task_name = config.get("task", "")
    if task_name not in ("stage1", "stage2"):
        raise ValueError(f"train_config: task {task_name!r}; only stage-1 and stage-2 workdirs can be evaluated")
    mesh = sharding_lib.make_mesh(config.mesh)
    rules = sharding_lib.axis_rules(tuple(config.mesh.axis_rules))
    if task_name == "stage2":
        from blip2_jax.train import stage2 as stage
        model = stage.build_model(stage.model_config(config))
        tok = data_text.load_tokenizer(tokenizer or config.data.tokenizer_path)
    else:
        from blip2_jax.train import stage1 as stage
        tok = data_text.load_bert_tokenizer(tokenizer or config.data.tokenizer_path)
        model = Blip2Stage1(stage.model_config(config, vocab_size=len(tok)))
    task = stage.make_task(config, mesh)
    # The loop's frozen key: a random frozen tower is the one the run trained against.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        frozen = loop.make_frozen(task, loop.run_keys(config.seed)[1], mesh, rules)
    _, trainable = checkpoint_lib.latest_params(workdir)
    return Loaded(model, {**trainable, **frozen}, tok, llm_kind(model))
