"""Models for evaluation: a Hugging Face BLIP-2 directory or a workdir of this project.

- HF directory (`config.json` + safetensors): `blip2_jax.from_pretrained`; the tokenizer from the
  directory (or `tokenizer`).
- Workdir (`<dir>/checkpoints/<step>/state`): `blip2_jax.workdir.load`, with the config the run
  recorded (`run_config.json`), or `train_config` (e.g. `configs/stage2.py:demo_opt`) for workdirs
  older than that record.
"""
from __future__ import annotations

import importlib.util
import os

from blip2_jax import checkpoint, workdir
from blip2_jax.data import text as data_text
from blip2_jax.pretrained import from_pretrained
from blip2_jax.spec import model as spec
from blip2_jax.workdir import Loaded


def load_config_file(spec_str: str):
    """`path/to/config.py[:arg]` -> `get_config(arg)` (as `--config` does), with a clear error."""
    path, _, arg = spec_str.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train_config: {path!r} does not exist (expected configs/<name>.py[:variant])")
    module_spec = importlib.util.spec_from_file_location(f"_eval_train_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def load_model(path: str, *, train_config=None, tokenizer: str = "", frozen_dtype: str = "") -> Loaded:
    """The model at `path` (HF BLIP-2 directory or workdir; see the module docstring), its frozen ViT and
    LLM in `frozen_dtype`: "float32", "bfloat16" or "int8" (weight-only int8, bfloat16 compute,
    `blip2_jax.models.quant`); "": float32 for an HF directory, the run's `model.frozen_dtype` for a workdir."""
    if not path:
        raise ValueError("config.model is empty: pass --config.model=PATH (an HF BLIP-2 directory or a workdir)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if checkpoint.is_workdir(path):
        dtype = spec.check_frozen_dtype(frozen_dtype, "frozen_dtype") if frozen_dtype else None
        return workdir.load(path, config=train_config, frozen_dtype=dtype, tokenizer_path=tokenizer)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json and no checkpoints/: neither a Hugging Face BLIP-2 "
                                "directory nor a workdir of this project")
    name = spec.check_frozen_dtype(frozen_dtype or "float32", "frozen_dtype")
    model, params = from_pretrained(path, frozen_dtype=name if name == spec.INT8 else spec.DTYPES[name])
    stage1 = model.config.text is None
    tok_dir = tokenizer or path
    tok = data_text.load_bert_tokenizer(tok_dir) if stage1 else data_text.load_tokenizer(tok_dir)
    return Loaded(model, params, tok)
