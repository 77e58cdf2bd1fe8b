"""One tiny config per stage: the config file's demo variant (configs/<stage>.py, read as `--config=`
reads it), shrunk to what a test on 2 CPU cores can compile and train.

The ViT and Q-Former sizes are those of tests/hf_tiny.py's default BLIP-2 models, so a stage-1 or
stage-2 config built here loads the tiny Hugging Face directories the tests write (tests that do so
fail loudly if the two drift apart).
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hf_tiny.blip2_retrieval_config() / blip2_opt_config() / blip2_t5_config() defaults, in our field names.
VISION = dict(hidden_size=32, intermediate_size=72, num_layers=2, num_heads=4, image_size=28, patch_size=14,
              layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=68, cross_attention_frequency=2)
QFORMER_TEXT = dict(vocab_size=99, max_position_embeddings=40)  # the stage-1 Q-Former's text side
NUM_QUERY_TOKENS = 4
EMBED_DIM = 16


def load(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """`configs/<name>.py:<variant>`, as `python -m blip2_jax.main --config=configs/<name>.py:<variant>` reads it."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def flags(config: ml_collections.ConfigDict, name: str, variant: str) -> list[str]:
    """The `--config.<field>=<value>` overrides that turn `configs/<name>.py:<variant>` into `config`, for the
    command line (`python -m blip2_jax.main --config=configs/<name>.py:<variant> ...`)."""
    from flax.traverse_util import flatten_dict

    base = flatten_dict(load(name, variant).to_dict(), sep=".")
    want = flatten_dict(config.to_dict(), sep=".")
    assert set(want) <= set(base), sorted(set(want) - set(base))  # flags can only set existing fields
    return [f"--config.{k}={v}" for k, v in want.items() if v != base[k]]


def _towers(c: ml_collections.ConfigDict) -> None:
    c.model.vision.update(VISION)
    c.model.qformer.update(QFORMER)
    c.model.num_query_tokens = NUM_QUERY_TOKENS
    c.model.ln_vision_eps = VISION["layer_norm_eps"]  # as HF checkpoints
    c.data.image_size = VISION["image_size"]


def _train(c: ml_collections.ConfigDict, defaults: dict, train: dict) -> None:
    c.train.update({**defaults, **train})
    c.data.global_batch_size = c.train.batch_size


def stage1(data_dir: str = "", **train) -> ml_collections.ConfigDict:
    """`configs/stage1.py:demo` at hf_tiny's retrieval-model sizes, on the shapes data in `data_dir` (its BERT
    vocabulary in `data_dir/tokenizer`, as the `shapes_dir` fixture writes it); no retrieval eval; 5 steps of
    16 (`train` overrides `config.train`)."""
    c = load("stage1", "demo")
    _towers(c)
    c.model.qformer.update(QFORMER_TEXT)
    c.model.embed_dim = EMBED_DIM
    c.data.train_sources.shapes.path = data_dir
    c.data.tokenizer_path = os.path.join(data_dir, "tokenizer")
    c.eval.source.path = ""
    c.optimizer.warmup_steps = 1
    _train(c, dict(batch_size=16, total_steps=5, log_every=1, checkpoint_every=0, eval_every=0), train)
    return c


def stage2(llm: str = "opt", **train) -> ml_collections.ConfigDict:
    """`configs/stage2.py:demo_<llm>` at hf_tiny's BLIP-2 OPT / T5 sizes, float32 towers, every `init`
    checkpoint empty (set the ones a test has), no data paths, no eval; 3 steps of 4 (`train` overrides
    `config.train`)."""
    c = load("stage2", f"demo_{llm}")
    _towers(c)
    c.model.llm_dropout = True  # the frozen LLM's dropout in training, as the paper variants
    for key in c.init:
        c.init[key] = ""
    c.data.train_sources.shapes.path = ""
    c.data.tokenizer_path = ""
    c.eval.source.path = ""
    c.optimizer.warmup_steps = 1
    _train(c, dict(batch_size=4, total_steps=3, log_every=1, checkpoint_every=0, async_checkpointing=False), train)
    return c


def text_lm(data_dir: str = "", tokenizer_path: str = "", **train) -> ml_collections.ConfigDict:
    """`configs/text_lm.py:demo_opt` with a d=64 OPT on the shapes captions in `data_dir` (held-out loss on its
    held-out split), its tokenizer built at `tokenizer_path`; 30 steps of 32 (`train` overrides `config.train`)."""
    c = load("text_lm", "demo_opt")
    c.model.text.update(hidden_size=64, word_embed_proj_dim=64, ffn_dim=128)
    c.data.train_sources.shapes.path = c.eval_source.path = data_dir
    c.data.tokenizer_path = tokenizer_path
    c.optimizer.update(warmup_steps=5, peak_lr=3e-3)
    _train(c, dict(total_steps=30, batch_size=32, log_every=5, async_checkpointing=False), train)
    return c
