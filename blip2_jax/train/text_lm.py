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
Everything trains (no frozen tree). After the last step (`evaluate`), the weights are written as a
Hugging Face directory (`opt.save` / `t5.save` + the tokenizer files) to `config.export_dir`, or
`<workdir>/hf` when `make_task` gets the workdir; stage 2 loads it as `init.llm_checkpoint`.

Tokenizers: when `data.tokenizer_path` does not exist and `build_tokenizer` is set, a byte-level BPE
is trained on the training captions (deterministic) and saved there, OPT-style (`<s>`=0, `<pad>`=1,
`</s>`=2 = BOS = EOS, `<unk>`=3; "\\n" is a byte token) or T5-style (`<pad>`=0, `</s>`=1, `<unk>`=2).
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import text as data_text
from blip2_jax.models.opt import OPTConfig, OPTForCausalLM
from blip2_jax.models.t5 import T5Config, T5ForConditionalGeneration
from blip2_jax.train import losses
from blip2_jax.train.task import Task

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


# -- tokenizers ---------------------------------------------------------------------------------
def build_tokenizer(captions: list[str], out_dir: str, style: str, vocab_size: int = 384):
    """Train a byte-level BPE on `captions` and save it as a `PreTrainedTokenizerFast` directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in ("opt", "t5"):
        raise ValueError(f"tokenizer style must be 'opt' or 't5', got {style!r}")
    specials = OPT_SPECIALS if style == "opt" else T5_SPECIALS
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(captions)) + ["\n"], trainer)
    if style == "opt":  # HF OPT prepends </s> as BOS
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                           special_tokens=[("</s>", 2)])
        kw = dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    else:  # T5 appends </s>
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
        kw = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    for i, s in enumerate(specials):
        assert fast.convert_tokens_to_ids(s) == i, (s, i)
    fast.save_pretrained(out_dir)
    return fast


def training_captions(data_cfg) -> list[str]:
    """Every cleaned caption of the training sources."""
    out = []
    for name in sorted(data_cfg.train_sources):
        for caps in data_pipeline.read_captions(data_cfg.train_sources[name]):
            out.extend(data_text.clean_caption(c, data_cfg.max_words) for c in caps)
    return out


def ensure_tokenizer(config) -> None:
    """Builds `data.tokenizer_path` from the training captions if it is missing and allowed to."""
    path = config.data.tokenizer_path
    if os.path.isdir(path):
        return
    if not config.build_tokenizer:
        raise FileNotFoundError(f"config.data.tokenizer_path {path!r} does not exist (set build_tokenizer=True "
                                "to train one on the training captions)")
    corpus = [config.data.prompt + c for c in training_captions(config.data)]  # the prompt gets merges too
    build_tokenizer(corpus, path, config.model.llm, config.tokenizer_vocab_size)
    log.info("trained a %s-style byte-level BPE tokenizer on the training captions -> %s", config.model.llm, path)


# -- model --------------------------------------------------------------------------------------
def llm_config(config, tokenizer):
    """`OPTConfig` / `T5Config` from `config.model.text` (HF field names; vocab_size 0 = tokenizer's).

    OPT's EOS becomes the id of "\\n", as in BLIP-2's OPT configs (generation stops at the newline).
    """
    m = config.model
    fields = dict(m.text)
    if not fields.get("vocab_size"):
        fields["vocab_size"] = len(tokenizer)
    dtype = DTYPES[m.dtype]
    if m.llm == "opt":
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) != 1:
            raise ValueError(f"{config.data.tokenizer_path}: '\\n' must be one token, got {newline}")
        fields["eos_token_id"] = newline[0]
        return OPTConfig.from_hf(fields, dtype=dtype, param_dtype=dtype)
    if m.llm == "t5":  # an untied head (as FlanT5) unless the fields say tied
        return T5Config.from_hf(fields, dtype=dtype, param_dtype=dtype,
                                tie_word_embeddings=fields.get("tie_word_embeddings", True) is not False)
    raise ValueError(f"config.model.llm must be 'opt' or 't5', got {m.llm!r}")


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
    from blip2_jax.convert import opt as opt_conv
    from blip2_jax.convert import t5 as t5_conv

    conv = opt_conv if isinstance(model, OPTForCausalLM) else t5_conv
    host = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32)), params)
    conv.save(host, model.config, out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("wrote the trained %s LM to %s", config.model.llm, out_dir)


# -- task ---------------------------------------------------------------------------------------
def make_task(config, mesh, workdir: str | None = None) -> Task:
    """The text-LM task; the final weights go to `config.export_dir` (or `<workdir>/hf`)."""
    del mesh
    ensure_tokenizer(config)
    tok = data_text.load_tokenizer(config.data.tokenizer_path)
    cfg = llm_config(config, tok)
    model = OPTForCausalLM(cfg) if config.model.llm == "opt" else T5ForConditionalGeneration(cfg)
    out_dir = config.export_dir or (os.path.join(workdir, "hf") if workdir else "")
    total = int(config.train.total_steps)
    encoder = data_pipeline.make_text_encoder(config.data)
    eval_batch = _eval_batch(config, encoder) if config.eval_source.path else None
    eval_loss = jax.jit(lambda p, b: lm_loss(model, p, b, jax.random.PRNGKey(0), False))

    def init_trainable(rng):
        ids = jnp.zeros((1, 4), jnp.int32)
        mask = jnp.ones((1, 4), jnp.int32)
        if config.model.llm == "opt":
            return model.init({"params": rng, "dropout": rng}, input_ids=ids, attention_mask=mask)["params"]
        return model.init({"params": rng, "dropout": rng}, input_ids=ids, attention_mask=mask,
                          decoder_input_ids=ids, decoder_attention_mask=mask)["params"]

    def loss_fn(trainable, frozen, batch, rng, train):
        del frozen
        return lm_loss(model, trainable, batch, rng, train)

    def evaluate(trainable, frozen, step):
        out = {}
        if eval_batch is not None:
            loss, metrics = eval_loss(trainable, eval_batch)
            out = {"heldout_lm_loss": float(loss), "heldout_token_accuracy": float(metrics["token_accuracy"])}
        if step >= total and out_dir:
            export(config, model, trainable, tok, out_dir)
        return out

    return Task(init_trainable=init_trainable, loss_fn=loss_fn, evaluate=evaluate, name=f"text_lm_{config.model.llm}")


def _eval_batch(config, encoder) -> dict:
    """Every held-out caption, encoded once (T5 prefix splits drawn with a fixed seed)."""
    rng = np.random.default_rng(0)
    caps = [data_text.clean_caption(c, config.data.max_words)
            for group in data_pipeline.read_captions(config.eval_source) for c in group]
    enc = [encoder(c, rng) for c in caps[:config.eval_max_captions]]
    return {k: np.stack([e[k] for e in enc]) for k in enc[0]}


# -- data ---------------------------------------------------------------------------------------
class WithContext:
    """Wraps a pipeline text encoder: with probability `prob` the caption's gist is also given as context.

    A frozen LLM is only useful to stage 2 if what comes before its text steers it: BLIP-2's LLMs
    read a soft visual prompt because pretraining taught them to use their context. A tiny LM fitted
    to captions alone has only learned the caption prior and ignores anything before it, so the demo's
    text LM also sees, `prob` of the time, the content words of a caption of the same image (the caption
    itself or one of its `siblings`, drawn at random, without the `drop_words`: e.g. "small red circle
    left large blue square" before "a large blue square right of a small red circle") in front of the
    sequence, the place the visual prompt takes in stage 2, and learns to follow them. Drawing the
    context from any caption of the image matters: stage 2 trains on either caption of an image with
    one visual prompt, which can only describe the scene, not which caption is wanted.
    - OPT: `words "\n"` before `</s> [prompt] caption "\n"`, out of the loss (labels -100);
    - T5: `words` before the encoder text (the decoder target is unchanged).
    This also trains the positions the text occupies behind the visual prompt. Sequences are re-padded
    to the encoder's length; a context that does not fit is not added.
    """

    def __init__(self, encoder, tokenizer, prob: float, max_len: int, is_opt: bool, drop_words=(),
                 siblings=None):
        self.encoder, self.tokenizer, self.prob, self.max_len = encoder, tokenizer, float(prob), max_len
        self.pad, self.is_opt, self.drop_words = tokenizer.pad_token_id, is_opt, frozenset(drop_words)
        self.siblings = siblings or {}  # caption -> sorted captions of the same image(s), itself included

    def context_text(self, caption: str) -> str:
        words = " ".join(w for w in caption.split(" ") if w not in self.drop_words)
        return words + "\n" if self.is_opt else words

    def _prepend(self, ids, mask, context, fill):
        n = int(mask.sum())
        if n + len(context) > self.max_len:
            return None
        out = np.full(self.max_len, fill, np.int32)
        out[:len(context)] = context
        out[len(context):len(context) + n] = ids[:n]
        return out

    def __call__(self, caption: str, rng: np.random.Generator) -> dict:
        use = rng.random() < self.prob
        enc = self.encoder(caption, rng)
        if not use:
            return enc
        choices = self.siblings.get(caption, (caption,))
        source = choices[int(rng.integers(len(choices)))]
        context = self.tokenizer.encode(self.context_text(source), add_special_tokens=False)
        mask = enc["attention_mask"]
        ids = self._prepend(enc["input_ids"], mask, context, self.pad)
        if ids is None:
            return enc
        out = dict(enc, input_ids=ids, attention_mask=self._prepend(mask, mask, [1] * len(context), 0))
        if self.is_opt:
            out["labels"] = self._prepend(enc["labels"], mask, [losses.IGNORE_INDEX] * len(context),
                                          losses.IGNORE_INDEX)
        return out


def make_encoder(config):
    """The pipeline's text encoder for `config.data`, with a context `context_prob` of the time (`WithContext`)."""
    encoder = data_pipeline.make_text_encoder(config.data)
    prob = float(config.get("context_prob", 0.0))
    if prob <= 0:
        return encoder
    # With a fixed caption per image (data.caption_index >= 0) stage 2 always asks for that caption, so the
    # context is the caption's own words, in order; otherwise any caption of the image may be the context.
    siblings = caption_siblings(config.data) if config.data.caption_index < 0 else None
    return WithContext(encoder, data_text.load_tokenizer(config.data.tokenizer_path), prob, config.data.max_text_len,
                       is_opt=config.model.llm == "opt", drop_words=config.context_drop_words.split(),
                       siblings=siblings)


def caption_siblings(data_cfg) -> dict[str, tuple[str, ...]]:
    """Cleaned caption -> every cleaned caption of the training images it describes (itself included)."""
    out: dict[str, set] = {}
    for name in sorted(data_cfg.train_sources):
        for caps in data_pipeline.read_captions(data_cfg.train_sources[name]):
            group = {data_text.clean_caption(c, data_cfg.max_words) for c in caps}
            for c in group:
                out.setdefault(c, set()).update(group)
    return {c: tuple(sorted(g)) for c, g in out.items()}


class CaptionIterator:
    """Per-process batches of encoded captions, shuffled per epoch; state = the global example index.

    Element i of the global stream is caption `perm_epoch[i % n]` encoded with an rng seeded by
    (seed, i), so the stream does not depend on restarts; this process takes rows
    `process_index::process_count` of each global batch.
    """

    def __init__(self, captions, encoder, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
        self.captions, self.encoder, self.seed = captions, encoder, seed
        self.global_batch, self.process_index, self.process_count = global_batch, process_index, process_count
        self.index = 0
        self._perms = {}

    def _caption(self, i: int) -> str:
        epoch, pos = divmod(i, len(self.captions))
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.captions))}
        return self.captions[self._perms[epoch][pos]]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = range(self.index + self.process_index, self.index + self.global_batch, self.process_count)
        enc = [self.encoder(self._caption(i), np.random.default_rng([self.seed, i])) for i in rows]
        self.index += self.global_batch
        return {k: np.stack([e[k] for e in enc]) for k in enc[0]}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def make_data(config):
    """Caption-only batches (the data batch size is checked by config validation)."""

    def factory():
        ensure_tokenizer(config)
        captions = training_captions(config.data)
        return CaptionIterator(captions, make_encoder(config), config.train.batch_size,
                               config.seed, jax.process_index(), jax.process_count())

    return factory


# -- config sections ----------------------------------------------------------------------------
def model_section(llm: str = "opt") -> ml_collections.ConfigDict:
    """`config.model` for the text LM: which LLM, its HF config fields, its dtype."""
    m = ml_collections.ConfigDict()
    m.llm = llm                   # "opt" or "t5"
    m.dtype = "float32"           # parameters and compute while training the LM
    # HF config.json fields of the LM (the names transformers uses); vocab_size 0 = the tokenizer's size.
    if llm == "opt":
        m.text = ml_collections.ConfigDict(dict(
            model_type="opt", vocab_size=0, hidden_size=128, num_hidden_layers=2, ffn_dim=512,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=128, dropout=0.1,
            attention_dropout=0.0, activation_function="relu", do_layer_norm_before=True,
            pad_token_id=1, bos_token_id=2, eos_token_id=2))
    else:
        m.text = ml_collections.ConfigDict(dict(
            model_type="t5", vocab_size=0, d_model=128, d_kv=32, d_ff=384, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=32,
            dropout_rate=0.1, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return m
