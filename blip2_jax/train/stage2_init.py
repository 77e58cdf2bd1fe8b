"""Pretrained initialisation for stage 2, from `config.init` paths.

Frozen tree `{"vision", "language_model"}`:
- `vision_checkpoint`: the ViT from an HF BLIP-2 directory or an HF `CLIPVisionModel` directory (as
  stage 1). Empty: the random ViT `init_frozen` draws, which for the same `config.seed` and vision
  sizes is the very ViT stage 1 drew (Flax derives a parameter's random numbers from its path, and
  the ViT sits under `vision` in both models), so a stage-1 demo run with a random frozen ViT and
  the stage-2 demo see the same image features.
- `llm_checkpoint`: an HF `OPTForCausalLM` / `T5ForConditionalGeneration` directory. Empty: random.

Trainable tree: `ln_vision`, `query_tokens` and the Q-Former's query path come from
`stage1_checkpoint`, which is either this project's stage-1 workdir (the newest Orbax checkpoint's
`params`) or an HF BLIP-2 directory (retrieval or conditional generation). The stage-1 text-only
parts (word/position embeddings, text FFNs, ITC/ITM/ITG heads, temperature) are dropped;
`language_projection` stays fresh. Fine-tuning a stage-2 model instead (`stage2_checkpoint`: an HF
`Blip2ForConditionalGeneration` directory or a stage-2 workdir) also loads `language_projection`.
Everything loaded and everything left fresh is logged.

Tensors are read one at a time, cast to the target leaf's dtype and put on its sharding.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Optional

from flax import traverse_util

from blip2_jax import checkpoint as checkpoint_lib
from blip2_jax.convert import blip2 as hf_blip2
from blip2_jax.convert.hf_io import CheckpointReader
from blip2_jax.convert.merge import merge_params
from blip2_jax.convert.rules import Rule, check_keys, linear, load_rules, prefixed
from blip2_jax.models.blip2 import Blip2Config

log = logging.getLogger(__name__)
# Top-level trainable entries a stage-1 checkpoint provides for stage 2.
FROM_STAGE1 = ("ln_vision", "query_tokens", "qformer")


def read_hf_config(path: str) -> dict:
    """`config.json` of a Hugging Face directory, with an error naming the file when it is missing."""
    name = os.path.join(path, "config.json")
    if not os.path.exists(name):
        raise FileNotFoundError(f"{name} does not exist (expected a Hugging Face model directory)")
    with open(name) as f:
        return json.load(f)


# -- frozen -------------------------------------------------------------------------------------
def llm_rules(text_config: Any) -> list[Rule]:
    """The LLM's HF keys (a standalone OPT / T5 directory) under our `language_model` subtree."""
    conv = hf_blip2.text_converter(text_config)
    return prefixed(conv.rules(text_config), "", ("language_model",))


def load_llm(path: str, cfg: Blip2Config, abstract: dict) -> dict:
    """`{"language_model": ...}` from an OPT / T5 directory, placed like `abstract`."""
    conv = hf_blip2.text_converter(cfg.text)
    rules = llm_rules(cfg.text)
    ignore = conv.ignore_patterns() if hasattr(conv, "ignore_patterns") else conv.IGNORE
    with CheckpointReader(path) as reader:
        check_keys(rules, reader.keys(), ignore=ignore, source=path)
        tree = load_rules(reader.get, rules, source=path)
    return {"language_model": merge_params(abstract["language_model"], tree["language_model"], source=path)}


def load_vision(path: str, cfg: Blip2Config, abstract: dict) -> dict:
    from blip2_jax.train import stage1_init
    tree = stage1_init.load_vision(path, cfg)
    return {"vision": merge_params(abstract["vision"], tree["vision"], source=path)}


def frozen_loader(config, cfg: Blip2Config, random_frozen: Callable[[], dict]) -> Optional[Callable]:
    """`Task.load_frozen`: the loaded towers; a tower without a checkpoint comes from `random_frozen()`."""
    vision_path, llm_path = config.init.vision_checkpoint, config.init.llm_checkpoint
    if not vision_path and not llm_path:
        return None

    def load(abstract: dict) -> dict:
        frozen_vit = "vision" in abstract  # not when the ViT trains (model.train_vision: trainable_loader)
        # The random tree is drawn only when some frozen tower has no checkpoint (at scale it is GBs).
        random = random_frozen() if (frozen_vit and not vision_path) or not llm_path else {}
        out = {}
        if frozen_vit and vision_path:
            out.update(load_vision(vision_path, cfg, abstract))
            log.info("frozen ViT loaded from %s", vision_path)
        elif frozen_vit:
            out["vision"] = random["vision"]
            log.warning("init.vision_checkpoint is empty: the frozen ViT is random (seed %d)", config.seed)
        if llm_path:
            out.update(load_llm(llm_path, cfg, abstract))
            log.info("frozen LLM loaded from %s", llm_path)
        else:
            out["language_model"] = random["language_model"]
            log.warning("init.llm_checkpoint is empty: the frozen LLM is random (seed %d)", config.seed)
        return out

    return load


# -- trainable ----------------------------------------------------------------------------------
def stage1_tree_from_hf(path: str, cfg: Blip2Config, with_projection: bool = False) -> dict:
    """`ln_vision`, `query_tokens` and the query-path Q-Former from an HF BLIP-2 directory (numpy), and
    `language_projection` when `with_projection` (a `Blip2ForConditionalGeneration` directory)."""
    hf = read_hf_config(path)
    kind = hf_blip2.architecture(hf)  # fails with a clear message for other models
    if with_projection and kind == "retrieval":
        raise ValueError(f"{path}: init.stage2_checkpoint must be a Blip2ForConditionalGeneration directory "
                         "(a retrieval model has no language_projection); use init.stage1_checkpoint")
    rules = [r for r in hf_blip2.vision_rules(cfg.vision) if r.path[0] == "ln_vision"]
    rules.append(Rule("query_tokens", ("query_tokens",)))
    rules += hf_blip2.qformer_rules(cfg.qformer)  # cfg.qformer.use_text_input is False: query path only
    if with_projection:
        rules += linear("language_projection", ("language_projection",))
    with CheckpointReader(path) as reader:
        return load_rules(reader.get, rules, source=path)


def read_stage1(path: str, cfg: Blip2Config, with_projection: bool = False) -> dict:
    """The stage-1 tree (numpy) of a workdir or an HF BLIP-2 directory (`with_projection`: also its
    `language_projection`, for fine-tuning a stage-2 model)."""
    if checkpoint_lib.is_workdir(path):
        step, params = checkpoint_lib.latest_params(path)
        log.info("checkpoint: %s, step %d", path, step)
        return params
    return stage1_tree_from_hf(path, cfg, with_projection)


def trainable_loader(config, cfg: Blip2Config) -> Optional[Callable]:
    """`Task.load_trainable`: the query path from `init.stage1_checkpoint` (projection fresh) or from
    `init.stage2_checkpoint` (projection included); with `model.train_vision`, the ViT from
    `init.vision_checkpoint`. None when none of them applies."""
    stage1_path, stage2_path = config.init.stage1_checkpoint, config.init.get("stage2_checkpoint", "")
    if stage1_path and stage2_path:
        raise ValueError(f"config.init: stage1_checkpoint ({stage1_path!r}) and stage2_checkpoint "
                         f"({stage2_path!r}) both name the Q-Former's source; set one")
    path = stage1_path or stage2_path
    parts = FROM_STAGE1 + (("language_projection",) if stage2_path else ())
    vision_path = config.init.vision_checkpoint if config.model.get("train_vision") else ""
    if not path and not vision_path:
        return None

    def load(fresh: dict) -> dict:
        from blip2_jax.train import stage1_init
        source = traverse_util.flatten_dict(read_stage1(path, cfg, with_projection=bool(stage2_path))) if path else {}
        fresh_flat = traverse_util.flatten_dict(fresh)
        wanted = {p for p in fresh_flat if p[0] in parts} if path else set()
        if vision_path:
            vision = traverse_util.flatten_dict(stage1_init.load_vision(vision_path, cfg))
            source.update(vision)
            wanted |= set(vision)
            log.info("trainable ViT initialised from %s", vision_path)
        # Stage-1-only parts (text embeddings and FFNs, ITC/ITM/ITG heads, temperature) are dropped;
        # a query-path part the source lacks is an error (different Q-Former sizes?).
        lacking = sorted(".".join(p) for p in wanted if p not in source)
        if lacking:
            raise ValueError(f"{path}: the checkpoint lacks {lacking} (different Q-Former sizes?)")
        used = {p: v for p, v in source.items() if p in wanted}
        dropped = sorted({".".join(p[:3]) for p in source if p not in wanted})
        log.info("from %s: loaded %d tensors (%s); not used by stage 2: %s", path, len(used),
                 ", ".join(parts), ", ".join(dropped) or "nothing")
        return merge_params(fresh, traverse_util.unflatten_dict(used), source=path or vision_path, missing="keep")

    return load
