"""Caption-only data for the demo's text-LM pretraining (`blip2_jax/train/text_lm.py`).

- `build_tokenizer`: a byte-level BPE trained on the captions, OPT-style (`<s>`=0, `<pad>`=1,
  `</s>`=2 = BOS = EOS, `<unk>`=3; "\\n" is a byte token), LLaMA-style (`<unk>`=0, `<s>`=1 = BOS,
  `</s>`=2 = EOS, no pad token, as LLaMA's) or T5-style (`<pad>`=0, `</s>`=1, `<unk>`=2);
- `training_captions`, `caption_siblings`: the cleaned captions of the training sources;
- `question_answers`, `QuestionAnswer`: the (answer, question) pairs of instruction records and the
  encoder adapter that feeds them to an instruction encoder (the InstructBLIP demo's text LM);
- `WithContext`: a text encoder that sometimes puts a caption's content words in front (what teaches
  a tiny LM to follow its context, the place stage 2's visual prompt takes);
- `CaptionIterator`: per-process batches of encoded captions with a restartable position.
"""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import text as data_text
from blip2_jax.data.text import IGNORE_INDEX

OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
SPECIALS = {"opt": OPT_SPECIALS, "llama": LLAMA_SPECIALS, "t5": T5_SPECIALS}


def build_tokenizer(captions: list[str], out_dir: str, style: str, vocab_size: int = 384):
    """Train a byte-level BPE on `captions` and save it as a `PreTrainedTokenizerFast` directory."""
    if style not in SPECIALS:
        raise ValueError(f"tokenizer style must be one of {tuple(SPECIALS)}, got {style!r}")
    specials = SPECIALS[style]
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
    elif style == "llama":  # LLaMA prepends <s>; it has no pad token (padding uses EOS, masked)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
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


def question_answers(data_cfg, sources=None) -> list[tuple[str, str]]:
    """`(answer, question)` of every question of the instruction records of `sources` (default: the
    training sources), cleaned as the pipeline cleans them (`clean_caption`, `blip_question`)."""
    sources = sources if sources is not None else [data_cfg.train_sources[n] for n in sorted(data_cfg.train_sources)]
    out = []
    for source in sources:
        for answers, questions in zip(data_pipeline.read_captions(source), data_pipeline.read_questions(source)):
            if len(questions) != len(answers):
                raise ValueError(f"{source.path}: a record without a question per answer (instruction records "
                                 "come from `data.shapes_vqa` or `data.build table --question_key`)")
            out.extend((data_text.clean_caption(a, data_cfg.max_words), data_text.blip_question(q, data_cfg.max_words))
                       for a, q in zip(answers, questions))
    return out


class QuestionAnswer:
    """An `(answer, question)` item -> the instruction encoder's tokens for the LLM (`encoder(answer, rng,
    question=question)`), without the Q-Former's instruction (a text LM has no Q-Former)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, item: tuple[str, str], rng: np.random.Generator) -> dict:
        answer, question = item
        enc = self.encoder(answer, rng, question=question)
        return {k: v for k, v in enc.items() if not k.startswith("qformer_")}


def caption_siblings(data_cfg) -> dict[str, tuple[str, ...]]:
    """Cleaned caption -> every cleaned caption of the training images it describes (itself included)."""
    out: dict[str, set] = {}
    for name in sorted(data_cfg.train_sources):
        for caps in data_pipeline.read_captions(data_cfg.train_sources[name]):
            group = {data_text.clean_caption(c, data_cfg.max_words) for c in caps}
            for c in group:
                out.setdefault(c, set()).update(group)
    return {c: tuple(sorted(g)) for c, g in out.items()}


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
        # LLaMA's tokenizers have no pad token: pad with EOS (masked), as the pipeline's OPTText does.
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.is_opt, self.drop_words = is_opt, frozenset(drop_words)
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

    def __call__(self, caption: str, rng: np.random.Generator, **fields) -> dict:
        """`fields` go to the wrapped encoder (an instruction encoder's `question`)."""
        use = rng.random() < self.prob
        enc = self.encoder(caption, rng, **fields)
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
            out["labels"] = self._prepend(enc["labels"], mask, [IGNORE_INDEX] * len(context),
                                          IGNORE_INDEX)
        return out


class CaptionIterator:
    """Per-process batches of encoded captions, shuffled per epoch; state = the global example index.

    Element i of the global stream is caption `perm_epoch[i % n]` encoded with an rng seeded by
    (seed, i), so the stream does not depend on restarts; this process takes its contiguous block of
    each global batch (rows `p * B ... (p + 1) * B - 1`, B = global batch / process count), so the global
    batch is the same for any process count. The state, `{"global_position": i}`, is the same for every
    process: a checkpoint resumes on any process count (`checkpoint.Checkpointer.restore`).
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
        block = self.global_batch // self.process_count
        first = self.index + self.process_index * block
        rows = range(first, first + block)
        enc = [self.encoder(self._caption(i), np.random.default_rng([self.seed, i])) for i in rows]
        self.index += self.global_batch
        return {k: np.stack([e[k] for e in enc]) for k in enc[0]}

    def get_state(self):
        return {"global_position": self.index}

    def set_state(self, state):
        self.index = int(state["global_position"] if "global_position" in state else state["index"])  # "index": before re-sharding
