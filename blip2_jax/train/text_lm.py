"""Text-only LM pretraining of a tiny OPT or T5 on captions: the demo's stand-in for a pretrained LLM.

No pretrained LLM can be downloaded here, so the stage-2 demo first trains its LLM on the caption
text alone with the same train loop (`config.task = "text_lm"`), then freezes it. The objectives are
exactly the stage-2 text objectives without the image (the pipeline's text encoders):
- OPT (`data.text_mode = "opt"`): causal LM on `</s> [prompt] caption "\\n"`, BOS/prompt/padding
  out of the loss (`losses.lm_loss`);
- T5 (`"t5_prefix"` / `"t5_prompt"`): encoder gets the caption prefix (split uniformly between the
  first token and the middle) or the fixed prompt, the decoder learns the rest (`</s>`-terminated);
  plain prefix -> suffix, no span corruption.
With `context_prob > 0` (the demo configs), that fraction of sequences also carries the content words
of a caption of the same image in front (`WithContext`), so the frozen LM learns to follow what
precedes its text, which is what lets stage 2's visual prompt steer it.
Everything trains (no frozen tree). After the last step (`Task.on_finish`), the weights are written as
a Hugging Face directory (`opt.save` / `t5.save` + the tokenizer files) to `config.export_dir`, or
`<workdir>/hf`; stage 2 loads it as `init.llm_checkpoint`.

Tokenizers: when `data.tokenizer_path` does not exist and `build_tokenizer` is set, a byte-level BPE
is trained on the training captions (deterministic, `blip2_jax.data.caption_lm.build_tokenizer`) and
saved there. The caption data (context prefixing, the iterator) is `blip2_jax/data/caption_lm.py`.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.convert import opt as opt_conv
from blip2_jax.convert import t5 as t5_conv
from blip2_jax.data import caption_lm
from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import text as data_text
from blip2_jax.models.opt import OPTForCausalLM
from blip2_jax.spec import model as spec
from blip2_jax.train import losses
from blip2_jax.train.task import Task

log = logging.getLogger(__name__)


def ensure_tokenizer(config) -> None:
    """Builds `data.tokenizer_path` from the training captions if it is missing and allowed to."""
    path = config.data.tokenizer_path
    if os.path.isdir(path):
        return
    if not config.build_tokenizer:
        raise FileNotFoundError(f"config.data.tokenizer_path {path!r} does not exist (set build_tokenizer=True "
                                "to train one on the training captions)")
    corpus = [config.data.prompt + c for c in caption_lm.training_captions(config.data)]  # the prompt gets merges too
    caption_lm.build_tokenizer(corpus, path, config.model.llm, config.tokenizer_vocab_size)
    log.info("trained a %s-style byte-level BPE tokenizer on the training captions -> %s", config.model.llm, path)


# -- model --------------------------------------------------------------------------------------
def lm_loss(model, params, batch, rng, train: bool):
    """`(loss, metrics)`: the stage-2 text loss without the image."""
    rngs = {"dropout": rng}
    if isinstance(model, OPTForCausalLM):
        logits, _ = model.apply({"params": params}, input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"], deterministic=not train, rngs=rngs)
        loss = losses.lm_loss(logits, batch["labels"])
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    else:
        logits = model.apply({"params": params}, input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"],
                             decoder_attention_mask=batch["decoder_attention_mask"], deterministic=not train,
                             rngs=rngs)
        labels = batch["labels"]
        loss = losses.cross_entropy(logits, labels)
    valid = labels != losses.IGNORE_INDEX
    accuracy = ((jnp.argmax(logits, -1) == labels) & valid).sum() / jnp.maximum(valid.sum(), 1)
    return loss, {"token_accuracy": accuracy}


def export(config, model, params, tokenizer, out_dir: str) -> None:
    """Write the LLM as a Hugging Face directory with its tokenizer (what stage 2 loads)."""
    conv = opt_conv if isinstance(model, OPTForCausalLM) else t5_conv
    host = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32)), params)
    conv.save(host, model.config, out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("wrote the trained %s LM to %s", config.model.llm, out_dir)


# -- task ---------------------------------------------------------------------------------------
def make_task(config, mesh) -> Task:
    """The text-LM task. After the last step (`Task.on_finish`) the LM and its tokenizer are written
    to `config.export_dir`, or `<workdir>/hf` when that is empty."""
    del mesh
    ensure_tokenizer(config)
    built = spec.build(config)
    model, tok = built.model, built.tokenizer
    encoder = data_pipeline.make_text_encoder(config.data)
    eval_batch = _eval_batch(config, encoder) if config.eval_source.path else None
    eval_loss = jax.jit(lambda p, b: lm_loss(model, p, b, jax.random.PRNGKey(0), False))

    def init_trainable(rng):
        ids = jnp.zeros((1, 4), jnp.int32)
        mask = jnp.ones((1, 4), jnp.int32)
        decoder = {} if isinstance(model, OPTForCausalLM) else dict(decoder_input_ids=ids, decoder_attention_mask=mask)
        return model.init({"params": rng, "dropout": rng}, input_ids=ids, attention_mask=mask, **decoder)["params"]

    def loss_fn(trainable, frozen, batch, rng, train):
        del frozen
        return lm_loss(model, trainable, batch, rng, train)

    def evaluate(trainable, frozen, step):
        if eval_batch is None:
            return {}
        loss, metrics = eval_loss(trainable, eval_batch)
        return {"heldout_lm_loss": float(loss), "heldout_token_accuracy": float(metrics["token_accuracy"])}

    def on_finish(trainable, workdir: str):
        if jax.process_index() == 0:
            export(config, model, trainable, tok, config.export_dir or os.path.join(workdir, "hf"))

    return Task(init_trainable=init_trainable, loss_fn=loss_fn, evaluate=evaluate, on_finish=on_finish,
                name=f"text_lm_{config.model.llm}")


def _eval_batch(config, encoder) -> dict:
    """Every held-out caption, encoded once (T5 prefix splits drawn with a fixed seed)."""
    rng = np.random.default_rng(0)
    caps = [data_text.clean_caption(c, config.data.max_words)
            for group in data_pipeline.read_captions(config.eval_source) for c in group]
    enc = [encoder(c, rng) for c in caps[:config.eval_max_captions]]
    return {k: np.stack([e[k] for e in enc]) for k in enc[0]}


# -- data ---------------------------------------------------------------------------------------
def make_encoder(config):
    """The pipeline's text encoder for `config.data`, with a context `context_prob` of the time (`WithContext`)."""
    encoder = data_pipeline.make_text_encoder(config.data)
    prob = float(config.get("context_prob", 0.0))
    if prob <= 0:
        return encoder
    # With a fixed caption per image (data.caption_index >= 0) stage 2 always asks for that caption, so the
    # context is the caption's own words, in order; otherwise any caption of the image may be the context.
    siblings = caption_lm.caption_siblings(config.data) if config.data.caption_index < 0 else None
    return caption_lm.WithContext(encoder, data_text.load_tokenizer(config.data.tokenizer_path), prob, config.data.max_text_len,
                       is_opt=config.model.llm == "opt", drop_words=config.context_drop_words.split(),
                       siblings=siblings)


def make_data(config):
    """Caption-only batches (the data batch size is checked by config validation)."""

    def factory():
        ensure_tokenizer(config)
        captions = caption_lm.training_captions(config.data)
        return caption_lm.CaptionIterator(captions, make_encoder(config), config.train.batch_size,
                               config.seed, jax.process_index(), jax.process_count())

    return factory


# -- config sections ----------------------------------------------------------------------------
