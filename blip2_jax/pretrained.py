"""`from_pretrained` / `save_pretrained`: the public entry points (DESIGN.md, "Public API").

`from_pretrained(path)` reads a Hugging Face BLIP-2 directory (`blip2_jax.convert.blip2.load`) or a
workdir this project's train loop wrote (`blip2_jax.workdir.load`); `save_pretrained` writes a
Hugging Face directory that transformers 5.x loads.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax import checkpoint, workdir
from blip2_jax.convert import blip2 as hf_blip2
from blip2_jax.models import quant
from blip2_jax.models.blip2 import FROZEN_KEYS


def from_pretrained(path: str, *, dtype: Any = jnp.float32, frozen_dtype: Optional[Any] = None,
                    scan_layers: Optional[bool] = None):
    """`(model, params)` for a Hugging Face BLIP-2 directory or a workdir of this project.

    HF directory: `dtype` is the parameter/compute dtype of the trainable part, `frozen_dtype`
    (default `dtype`) that of the frozen ViT and LLM. Weights are read tensor by tensor from
    safetensors.
    Workdir (`<path>/checkpoints/`, a stage-1 or stage-2 run): the model its recorded config
    (`run_config.json`) describes, the newest checkpoint's trainable parameters, and the frozen towers
    re-read from where the run read them (or re-drawn from its seed when it had none); the frozen
    towers in `frozen_dtype` if given, else the run's `model.frozen_dtype`.
    `frozen_dtype="int8"`: int8 weight-only quantisation of the frozen towers' matrices (per-channel
    scales, bfloat16 compute; `blip2_jax.models.quant`): about half the frozen memory of bfloat16. For a
    workdir the frozen towers are quantised as its run's `model.frozen_dtype="int8"` quantises them (from
    their float32 checkpoint: the tree an int8 run trained against), and a ViT the run trained
    (`model.train_vision`) is quantised too.
    `scan_layers`: every tower's layers scanned (True) or unrolled (False); default: unrolled for an HF
    directory, the run's layout for a workdir. Either layout loads from either.
    """
    int8 = _is_int8(frozen_dtype)
    if checkpoint.is_workdir(path):
        loaded = workdir.load(path, frozen_dtype="int8" if int8 else frozen_dtype, scan_layers=scan_layers)
        model, params = loaded.model, loaded.params
    else:  # bfloat16 compute, then the frozen towers' matrices stored as int8 (`models.quant`)
        model, params = hf_blip2.load(path, dtype=dtype, frozen_dtype=jnp.bfloat16 if int8 else frozen_dtype,
                                      scan_layers=bool(scan_layers))
    if int8:
        params = quantize_frozen(params)  # a workdir's frozen towers already are: `quantize_tree` skips them
    return model, params


def _is_int8(frozen_dtype) -> bool:
    if frozen_dtype is None:
        return False
    return frozen_dtype == "int8" if isinstance(frozen_dtype, str) else np.dtype(frozen_dtype) == np.int8


def quantize_frozen(params: dict) -> dict:
    """`params` with the frozen towers' (`vision`, `language_model`) matrices int8 weight-only quantised
    (per-channel scales, `blip2_jax.models.quant`); the trainable part is untouched."""
    return {k: jax.tree.map(jnp.asarray, quant.quantize_tree(v)) if k in FROZEN_KEYS else v
            for k, v in params.items()}


def save_pretrained(model: nn.Module, params: dict, path: str, *, dtype: Any = np.float32) -> None:
    """Write a Hugging Face directory (`config.json` + `model.safetensors`) that transformers 5.x loads
    into the matching Blip2 class and runs with the same outputs."""
    hf_blip2.save(model, quant.dequantize_tree(params), path, dtype=dtype)
