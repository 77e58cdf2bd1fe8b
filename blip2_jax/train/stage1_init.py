"""Pretrained initialisation for stage 1, from `config.init` paths.

- `vision_checkpoint`: the frozen ViT from an HF BLIP-2 directory (EVA ViT-g), an HF
  `CLIPVisionModel` directory (CLIP ViT-L, `config.model.vision.style = "clip"`), or a workdir of this
  project whose checkpoint trained the ViT; with `model.train_vision` it initialises the trained ViT.
- `stage1_checkpoint`: a whole stage-1 model from an HF `Blip2ForImageTextRetrieval` directory or a
  converted LAVIS directory; `qformer_checkpoint`: the Q-Former from a `bert-base-uncased` directory.
What a checkpoint lacks keeps its fresh initialisation, and the log lists it.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Optional

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blip2_jax import checkpoint as checkpoint_lib
from blip2_jax.convert import blip2 as hf_blip2
from blip2_jax.convert.hf_io import CheckpointReader
from blip2_jax.convert.merge import merge_params
from blip2_jax.convert.rules import load_rules
from blip2_jax.models.blip2 import Blip2Config

log = logging.getLogger(__name__)


def _read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def load_vision(path: str, cfg: Blip2Config) -> dict:
    """`{"vision": ...}` as numpy from a BLIP-2 or CLIP directory, or from a workdir of this project
    whose newest checkpoint trained the ViT (`model.train_vision`)."""
    if checkpoint_lib.is_workdir(path):
        step, params = checkpoint_lib.latest_params(path)
        if "vision" not in params:
            raise ValueError(f"{path}: its checkpoint (step {step}) holds no trained ViT (`vision`); "
                             "init.vision_checkpoint takes a workdir of a run with model.train_vision=True")
        log.info("ViT from %s, step %d", path, step)
        return {"vision": params["vision"]}
    hf = _read_config(path)
    if hf.get("model_type") in ("clip_vision_model", "clip") or cfg.vision.style == "clip":
        from blip2_jax.convert import clip
        tower, params = clip.load(path)
        clip.check_matches(tower.config, dataclasses.replace(cfg.vision, dtype=jnp.float32,
                                                             param_dtype=jnp.float32))
        return {"vision": jax.tree.map(np.asarray, params)}
    with CheckpointReader(path) as reader:
        rules = hf_blip2.vision_rules(cfg.vision, ln_vision=False)
        return load_rules(reader.get, rules, source=path)


def frozen_loader(config, cfg: Blip2Config) -> Optional[Callable]:
    path = config.init.vision_checkpoint
    if not path:
        return None

    def load(abstract):
        tree = load_vision(path, cfg)
        log.info("frozen ViT loaded from %s", path)
        return merge_params(abstract, tree, source=path)

    return load


def _stage1_from_dir(path: str, cfg: Blip2Config) -> dict:
    """The trainable stage-1 leaves a checkpoint directory provides (numpy)."""
    if os.path.exists(os.path.join(path, "lavis_extra.safetensors")) or _read_config(path).get("lavis"):
        from blip2_jax.convert import lavis
        tree = lavis.load_stage1(path, cfg)
        tree.pop("vision", None)
        return tree
    hf = _read_config(path)
    if hf_blip2.architecture(hf) != "retrieval":
        raise ValueError(f"{path}: init.stage1_checkpoint must be a Blip2ForImageTextRetrieval or LAVIS stage-1 "
                         f"directory, found {hf.get('architectures')}")
    with CheckpointReader(path) as reader:
        rules = [r for r in hf_blip2.rules(hf_blip2.config_from_hf(hf)) if r.path[0] != "vision"]
        return load_rules(reader.get, rules, source=path)


def trainable_loader(config, cfg: Blip2Config) -> Optional[Callable]:
    """`fresh trainable tree -> tree with the checkpoints' leaves in` (BERT first, then a whole stage-1
    model on top, then the ViT when it trains: `model.train_vision`), or None when `config.init`
    names none of them."""
    stage1, bert = config.init.stage1_checkpoint, config.init.qformer_checkpoint
    vision = config.init.vision_checkpoint if config.model.get("train_vision") else ""
    if not stage1 and not bert and not vision:
        return None

    def load(fresh: dict) -> dict:
        loaded: dict = {}
        if bert:
            from blip2_jax.convert import bert as bert_conv
            dec_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)  # the [DEC] embedding row
            # A full trainable tree; what BERT lacks is the fresh init (and the converter logs which).
            from_bert = bert_conv.init_stage1_from_bert(bert, jax.tree.map(np.asarray, fresh), cfg, dec_rng)
            loaded.update(traverse_util.flatten_dict(from_bert))
            log.info("Q-Former initialised from BERT at %s", bert)
        if stage1:
            loaded.update(traverse_util.flatten_dict(_stage1_from_dir(stage1, cfg)))
            log.info("stage-1 model initialised from %s", stage1)
        if vision:
            loaded.update(traverse_util.flatten_dict(load_vision(vision, cfg)))
            log.info("trainable ViT initialised from %s", vision)
        return merge_params(fresh, traverse_util.unflatten_dict(loaded), source="config.init", missing="keep")

    return load
