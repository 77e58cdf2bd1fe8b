"""Pretrained weights for the model a config describes, from its `config.init` paths.

Frozen towers (`frozen_loader`, `frozen_tree`), read on every start of a run and on every reload
of its workdir (they are never checkpointed):
- `init.vision_checkpoint`: the ViT from an HF BLIP-2 directory (EVA ViT-g), an HF `CLIPVisionModel`
  directory (CLIP ViT-L, `model.vision.style = "clip"`), or a workdir of this project whose checkpoint
  trained the ViT (`model.train_vision`), or an EfficientNet-Lite0 directory written by
  `python -m blip2_jax.convert.efficientnet` (`model.vision.style = "efficientnet_lite0"`). Empty: the random ViT drawn from the run's frozen key
  (`spec.model.run_keys`), which for the same seed and vision sizes is the very ViT stage 1 drew
  (Flax derives a parameter's random numbers from its path), so the stage-2 demo sees the stage-1
  demo's image features.
- `init.llm_checkpoint` (stage 2): an HF `OPTForCausalLM`, LLaMA / Mistral / Qwen2 / Gemma
  `...ForCausalLM` or `T5ForConditionalGeneration` directory.
  Empty: random.

Trainable tree (`trainable_loader`), read on a fresh start only (a resume restores its checkpoint):
- stage 1: `qformer_checkpoint` (a `bert-base-uncased` directory, LAVIS's init), then
  `stage1_checkpoint` (an HF `Blip2ForImageTextRetrieval` or converted LAVIS directory) on top;
- stage 2: `stage1_checkpoint` (this project's stage-1 workdir or an HF BLIP-2 directory: ln_vision,
  the queries and the Q-Former's query path; the stage-1-only parts are dropped, language_projection
  stays fresh) or `stage2_checkpoint` (an HF `Blip2ForConditionalGeneration` directory or a stage-2
  workdir: the projection too);
- with `model.train_vision`, the ViT from `vision_checkpoint`.
What no checkpoint provides keeps its fresh initialisation, and the log lists it
(`blip2_jax.convert.merge.merge_params`). Every tree read here comes in the model's layer layout
(`model.scan_layers`): Hugging Face and LAVIS files through their rules (`convert.rules.stack_rules`),
this project's workdirs, written in either layout, through `models.stacking.match_layout`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blip2_jax import checkpoint as checkpoint_lib
from blip2_jax import sharding as sharding_lib
from blip2_jax.convert import bert as bert_conv
from blip2_jax.convert import blip2 as hf_blip2
from blip2_jax.convert import clip, efficientnet, lavis
from blip2_jax.convert.hf_io import CheckpointReader
from blip2_jax.convert.merge import merge_params
from blip2_jax.convert.rules import Rule, check_keys, linear, load_rules, prefixed
from blip2_jax.models.blip2 import Blip2Config, layer_stacks
from blip2_jax.models.efficientnet import EfficientNetConfig
from blip2_jax.models.stacking import match_layout
from blip2_jax.spec.model import frozen_keys, init_fns, read_hf_config, run_keys

log = logging.getLogger(__name__)
# Top-level trainable entries a stage-1 checkpoint provides for stage 2.
FROM_STAGE1 = ("ln_vision", "query_tokens", "qformer")


# -- towers ---------------------------------------------------------------------------------------
def load_vision(path: str, cfg: Blip2Config) -> dict:
    """`{"vision": ...}` as numpy from a BLIP-2 or CLIP directory, or from a workdir of this project
    whose newest checkpoint trained the ViT (`model.train_vision`)."""
    if checkpoint_lib.is_workdir(path):
        step, params = checkpoint_lib.latest_params(path)
        if "vision" not in params:
            raise ValueError(f"{path}: its checkpoint (step {step}) holds no trained ViT (`vision`); "
                             "init.vision_checkpoint takes a workdir of a run with model.train_vision=True")
        log.info("ViT from %s, step %d", path, step)
        return match_layout({"vision": params["vision"]}, layer_stacks(cfg))
    hf = read_hf_config(path)
    if (hf.get("model_type") == efficientnet.MODEL_TYPE) != (cfg.vision.style == EfficientNetConfig.style):
        raise ValueError(f"init.vision_checkpoint={path!r} holds a {hf.get('model_type')!r} tower but "
                         f"model.vision.style is {cfg.vision.style!r}")
    if cfg.vision.style == EfficientNetConfig.style:
        return {"vision": efficientnet.read_params(path, cfg.vision)}
    if hf.get("model_type") in ("clip_vision_model", "clip") or cfg.vision.style == "clip":
        tower, params = clip.load(path, scan_layers=cfg.vision.scan_layers)
        clip.check_matches(tower.config, dataclasses.replace(cfg.vision, dtype=jnp.float32,
                                                             param_dtype=jnp.float32))
        return {"vision": jax.tree.map(np.asarray, params)}
    with CheckpointReader(path) as reader:
        return load_rules(reader.get, hf_blip2.vision_rules(cfg.vision, ln_vision=False), source=path)


def load_llm(path: str, cfg: Blip2Config) -> dict:
    """`{"language_model": ...}` as numpy from a standalone LLM directory (OPT, LLaMA & co., T5)."""
    conv = hf_blip2.text_converter(cfg.text)
    rules = prefixed(conv.rules(cfg.text), "", ("language_model",))
    with CheckpointReader(path) as reader:
        check_keys(rules, reader.keys(), ignore=conv.ignore_patterns(), source=path)
        return load_rules(reader.get, rules, source=path)


def _tower_paths(config) -> dict[str, str]:
    """Frozen tower -> the checkpoint it is read from ("" = random)."""
    paths = {"vision": config.init.vision_checkpoint, "language_model": config.init.get("llm_checkpoint", "")}
    return {tower: paths[tower] for tower in frozen_keys(config)}


def frozen_loader(config, model, mesh, rules) -> Optional[Callable]:
    """`abstract frozen tree (with shardings) -> frozen tree` for `config`'s `model` on `mesh`, or None
    when every frozen tower is random (then the caller draws them all from `init_frozen`).

    A tower with a checkpoint is read and placed shard by shard; one without is drawn from the run's
    frozen key (only then: at scale it is GBs)."""
    paths = _tower_paths(config)
    if not any(paths.values()):
        return None
    readers = {"vision": load_vision, "language_model": load_llm}
    cfg = model.config
    _, init_frozen = init_fns(config, model)

    def load(abstract: dict) -> dict:
        random = {}
        if not all(paths.values()):
            random, _ = sharding_lib.create_sharded(init_frozen, run_keys(config.seed)[1], mesh, rules)
        out = {}
        for tower, path in paths.items():
            if path:
                tree = readers[tower](path, cfg)[tower]
                out[tower] = merge_params(abstract[tower], tree, source=path)
                log.info("frozen %s loaded from %s", tower, path)
            else:
                out[tower] = random[tower]
                log.warning("no checkpoint for the frozen %s: it is random (seed %d)", tower, config.seed)
        return out

    return load


def frozen_tree(config, model, mesh, rules) -> dict:
    """The frozen towers of `config`'s run, as its train loop makes them on every (re)start: read from
    their checkpoints, or drawn from the run's frozen key; sharded by `rules` on `mesh`."""
    _, init_frozen = init_fns(config, model)
    return sharding_lib.create_or_load(init_frozen, run_keys(config.seed)[1], mesh, rules,
                                       load=frozen_loader(config, model, mesh, rules))


# -- trainable ------------------------------------------------------------------------------------
def trainable_loader(config, cfg: Blip2Config) -> Optional[Callable]:
    """`fresh trainable tree -> tree with the checkpoints' leaves in` for `config.task`, or None when
    `config.init` names no trainable source."""
    return (_stage1_trainable_loader if config.task == "stage1" else _stage2_trainable_loader)(config, cfg)


def _vision_if_trained(config) -> str:
    return config.init.vision_checkpoint if config.model.get("train_vision") else ""


def _stage1_from_dir(path: str, cfg: Blip2Config) -> dict:
    """The trainable stage-1 leaves a checkpoint directory provides (numpy)."""
    hf = read_hf_config(path)
    if os.path.exists(os.path.join(path, lavis.EXTRA_FILE)) or hf.get("lavis"):
        _, tree = lavis.load_stage1(path)  # unrolled: the layout its converter writes
        return match_layout({k: v for k, v in tree.items() if k != "vision"}, layer_stacks(cfg))
    if hf_blip2.architecture(hf) != "retrieval":
        raise ValueError(f"{path}: init.stage1_checkpoint must be a Blip2ForImageTextRetrieval or LAVIS stage-1 "
                         f"directory, found {hf.get('architectures')}")
    config = hf_blip2.config_from_hf(hf, scan_layers=cfg.qformer.scan_layers)
    with CheckpointReader(path) as reader:
        rules = [r for r in hf_blip2.rules(config) if r.path[0] != "vision"]
        return load_rules(reader.get, rules, source=path)


def _stage1_trainable_loader(config, cfg: Blip2Config) -> Optional[Callable]:
    """BERT first, then a whole stage-1 model on top, then the ViT when it trains."""
    stage1, bert = config.init.stage1_checkpoint, config.init.qformer_checkpoint
    vision = _vision_if_trained(config)
    if not stage1 and not bert and not vision:
        return None

    def load(fresh: dict) -> dict:
        loaded: dict = {}
        if bert:
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


def _query_path_from_hf(path: str, cfg: Blip2Config, with_projection: bool = False) -> dict:
    """`ln_vision`, `query_tokens` and the query-path Q-Former from an HF BLIP-2 directory (numpy), and
    `language_projection` when `with_projection` (a `Blip2ForConditionalGeneration` directory). For an
    InstructBLIP model (`cfg.instruction_aware`) the Q-Former's text path too, where the directory has one
    (a retrieval or an InstructBLIP directory)."""
    kind = hf_blip2.architecture(read_hf_config(path))  # fails with a clear message for other models
    if with_projection and kind == "retrieval":
        raise ValueError(f"{path}: init.stage2_checkpoint must be a Blip2ForConditionalGeneration directory "
                         "(a retrieval model has no language_projection); use init.stage1_checkpoint")
    rules = [r for r in hf_blip2.vision_rules(cfg.vision) if r.path[0] == "ln_vision"]
    rules.append(Rule("query_tokens", ("query_tokens",)))
    with_text = cfg.instruction_aware and kind != "generation"  # BLIP-2 with an LLM has no text path
    qformer = dataclasses.replace(cfg.qformer, use_text_input=with_text)
    rules += hf_blip2.instruct_qformer_rules(qformer) if kind == "instruct" else hf_blip2.qformer_rules(qformer)
    if with_projection:
        rules += linear("language_projection", ("language_projection",))
    with CheckpointReader(path) as reader:
        return load_rules(reader.get, rules, source=path)


def read_query_path(path: str, cfg: Blip2Config, with_projection: bool = False) -> dict:
    """The trainable tree (numpy) of a workdir, or the query path of an HF BLIP-2 directory
    (`with_projection`: also its `language_projection`, for fine-tuning a stage-2 model)."""
    if checkpoint_lib.is_workdir(path):
        step, params = checkpoint_lib.latest_params(path)
        log.info("checkpoint: %s, step %d", path, step)
        return match_layout(params, layer_stacks(cfg))
    return _query_path_from_hf(path, cfg, with_projection)


def is_text_path(path: tuple[str, ...]) -> bool:
    """Whether a trainable parameter belongs to the Q-Former's text path (word/position embeddings, text
    FFNs): what an InstructBLIP Q-Former has and a BLIP-2 stage-2 one lacks."""
    return path[0] == "qformer" and (path[1] in ("word_embeddings", "position_embeddings") or "text_ffn" in path)


def _stage2_trainable_loader(config, cfg: Blip2Config) -> Optional[Callable]:
    """The query path from `init.stage1_checkpoint` (projection fresh) or `init.stage2_checkpoint`
    (projection included); with `model.train_vision`, the ViT from `init.vision_checkpoint`.
    Instruction tuning (`cfg.instruction_aware`) may name both: the stage-2 checkpoint (a BLIP-2 one has no
    text path) over the stage-1 one (the Q-Former's text path); a text path neither has stays fresh."""
    stage1_path, stage2_path = config.init.stage1_checkpoint, config.init.get("stage2_checkpoint", "")
    if stage1_path and stage2_path and not cfg.instruction_aware:
        raise ValueError(f"config.init: stage1_checkpoint ({stage1_path!r}) and stage2_checkpoint "
                         f"({stage2_path!r}) both name the Q-Former's source; set one")
    sources = [(p, FROM_STAGE1 + (("language_projection",) if p == stage2_path else ()))
               for p in (stage1_path, stage2_path) if p]
    vision_path = _vision_if_trained(config)
    if not sources and not vision_path:
        return None

    def load(fresh: dict) -> dict:
        source = {}
        for path, parts in sources:  # the stage-2 checkpoint last: over the stage-1 one
            tree = traverse_util.flatten_dict(read_query_path(path, cfg, with_projection=path == stage2_path))
            # The query path of the fresh tree (and InstructBLIP's text path); the stage-1-only parts (the
            # ITC/ITM/ITG heads, the temperature; a BLIP-2 model's text embeddings and FFNs) are dropped.
            wanted = [p for p in traverse_util.flatten_dict(fresh) if p[0] in parts]
            may_lack = is_text_path if len(sources) > 1 or path == stage2_path else (lambda p: False)
            lacking = sorted("/".join(p) for p in wanted if p not in tree and not may_lack(p))
            if lacking:
                raise ValueError(f"{path}: the checkpoint lacks {lacking} (different Q-Former sizes?)")
            used = {p: tree[p] for p in wanted if p in tree}
            source.update(used)
            dropped = sorted({"/".join(p[:3]) for p in tree if p not in used})
            log.info("from %s: %s; not used by stage 2: %s", path, ", ".join(parts), ", ".join(dropped) or "nothing")
        if vision_path:
            source.update(traverse_util.flatten_dict(load_vision(vision_path, cfg)))
            log.info("trainable ViT initialised from %s", vision_path)
        return merge_params(fresh, traverse_util.unflatten_dict(source),
                            source=" + ".join(p for p, _ in sources) or vision_path, missing="keep")

    return load
