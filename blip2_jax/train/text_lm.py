"""Text-only LM pretraining of a tiny OPT, LLaMA or T5 on captions: the demo's stand-in for a pretrained LLM.

No pretrained LLM can be downloaded here, so the stage-2 demo first trains its LLM on the caption
text alone with the same train loop (`config.task = "text_lm"`), then freezes it. The objectives are
exactly the stage-2 text objectives without the image (the pipeline's text encoders):
- OPT and LLaMA (`data.text_mode = "opt"`): causal LM on `BOS [prompt] caption "\\n"` (OPT's BOS is
  `</s>`, LLaMA's `<s>`), BOS/prompt/padding out of the loss (`losses.lm_loss`);
- T5 (`"t5_prefix"` / `"t5_prompt"`): encoder gets the caption prefix (split uniformly between the
  first token and the middle) or the fixed prompt, the decoder learns the rest (`</s>`-terminated);
  plain prefix -> suffix, no span corruption.
With `context_prob > 0` (the demo configs), that fraction of sequences also carries the content words
of a caption of the same image in front (`WithContext`), so the frozen LM learns to follow what
precedes its text, which is what lets stage 2's visual prompt steer it.
With `data.instruction_task = "vqa"` (the InstructBLIP demo) the text is that of instruction tuning
without the image: `BOS instruction answer "\\n"`, one of InstructBLIP's VQA templates around each
question of the instruction records, the answer as the target, and the answer's words as the context.
Everything trains (no frozen tree). After the last step (`Task.on_finish`), the weights are written as
a Hugging Face directory (`opt.save` / `decoder.save` / `t5.save` + the tokenizer files) to `config.export_dir`, or
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

from blip2_jax.convert import decoder as decoder_conv
from blip2_jax.convert import opt as opt_conv
from blip2_jax.convert import t5 as t5_conv
from blip2_jax.data import caption_lm, instructions
from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import text as data_text
from blip2_jax.models.opt import OPTForCausalLM
from blip2_jax.models.t5 import T5ForConditionalGeneration
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
    corpus = training_texts(config)
    caption_lm.build_tokenizer(corpus, path, config.model.llm, config.tokenizer_vocab_size)
    log.info("trained a %s-style byte-level BPE tokenizer on the training captions -> %s", config.model.llm, path)


# -- model --------------------------------------------------------------------------------------
def lm_loss(model, params, batch, rng, train: bool):
    """`(loss, metrics)`: the stage-2 text loss without the image."""
    rngs = {"dropout": rng}
    if not isinstance(model, T5ForConditionalGeneration):  # decoder-only: OPT, LLaMA
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
    conv = (opt_conv if isinstance(model, OPTForCausalLM) else t5_conv if isinstance(model, T5ForConditionalGeneration)
            else decoder_conv)
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
        decoder = (dict(decoder_input_ids=ids, decoder_attention_mask=mask)
                   if isinstance(model, T5ForConditionalGeneration) else {})
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
    """Every held-out caption (or question's answer), encoded once (T5 prefix splits, instructions drawn
    with a fixed seed)."""
    rng = np.random.default_rng(0)
    if is_vqa(config):
        items = caption_lm.question_answers(config.data, [config.eval_source])
        encoder = caption_lm.QuestionAnswer(encoder)
    else:
        items = [data_text.clean_caption(c, config.data.max_words)
                 for group in data_pipeline.read_captions(config.eval_source) for c in group]
    enc = [encoder(c, rng) for c in items[:config.eval_max_captions]]
    return {k: np.stack([e[k] for e in enc]) for k in enc[0]}


def is_vqa(config) -> bool:
    """The text of VQA instruction tuning (instruction records) rather than captions."""
    return config.data.get("instruction_task", "") == "vqa"


def training_texts(config) -> list[str]:
    """What the tokenizer is trained on: the prompt and every training caption; with VQA instruction
    records, every (question, answer) in each VQA template (every word an instruction can use)."""
    if not is_vqa(config):
        return [config.data.prompt + c for c in caption_lm.training_captions(config.data)]  # the prompt gets merges too
    pairs = sorted(set(caption_lm.question_answers(config.data)))
    return [t.format(question=q) + " " + a for a, q in pairs for t in instructions.TEMPLATES["vqa"]]


# -- data ---------------------------------------------------------------------------------------
def make_encoder(config):
    """The pipeline's text encoder for `config.data`, with a context `context_prob` of the time (`WithContext`)."""
    encoder = data_pipeline.make_text_encoder(config.data)
    prob = float(config.get("context_prob", 0.0))
    if prob <= 0:
        return encoder
    # With a fixed caption per image (data.caption_index >= 0) stage 2 always asks for that caption, so the
    # context is the caption's own words, in order; otherwise any caption of the image may be the context.
    # VQA: the context is the answer's own words (the other answers of an image answer other questions).
    any_caption = config.data.caption_index < 0 and not is_vqa(config)
    siblings = caption_lm.caption_siblings(config.data) if any_caption else None
    return caption_lm.WithContext(encoder, data_text.load_tokenizer(config.data.tokenizer_path), prob, config.data.max_text_len,
                       is_opt=config.model.llm != "t5", drop_words=config.context_drop_words.split(),
                       siblings=siblings)


def make_data(config):
    """Caption-only batches (the data batch size is checked by config validation)."""

    def factory():
        ensure_tokenizer(config)
        if is_vqa(config):  # (answer, question) items; the context is the answer's own words
            items, encoder = caption_lm.question_answers(config.data), caption_lm.QuestionAnswer(make_encoder(config))
        else:
            items, encoder = caption_lm.training_captions(config.data), make_encoder(config)
        return caption_lm.CaptionIterator(items, encoder, config.train.batch_size,
                               config.seed, jax.process_index(), jax.process_count())

    return factory


# -- config sections ----------------------------------------------------------------------------
