"""Caption cleaning and the stage-1 / stage-2 text encodings (fixed length, numpy int32).

- `clean_caption`: LAVIS `BlipCaptionProcessor.pre_caption` (lowercase, `([.!\\"()*#:;~])` -> space,
  collapse whitespace, strip, at most `max_words` words).
- `blip_question`: LAVIS `BlipQuestionProcessor.pre_question` (lowercase, the same punctuation
  deleted, "?" kept, trailing spaces stripped, at most `max_words` words).
- `Stage1Text`: BERT uncased WordPiece + bos `[DEC]` (id 30522), padding="max_length", truncation,
  max 32, as `Blip2Base.init_tokenizer` + `Blip2Qformer.forward`.
- `OPTText`: `</s>` (BOS) + prompt + caption + "\\n", right padding to 32, labels = ids with padding
  and the prompt (BOS included, as LAVIS counts it) set to -100.
- `T5Text`: `mode="prefix"`: the caption's tokens are split at k, drawn uniformly from 1 to the
  middle (len // 2) of the caption, prefix -> encoder text, suffix -> decoder target (the prefix-LM
  objective the BLIP-2 authors describe in LAVIS issue #139); `mode="prompt"`: encoder text is the
  fixed prompt (e.g. "a photo of"), target the caption. Both end with `</s>`; decoder inputs are the
  labels shifted right behind the decoder start token (T5's pad, id 0).
- `InstructText` (InstructBLIP instruction tuning): either of the two with a per-example instruction
  as the prompt, and that instruction for the Q-Former (`qformer_input_ids`, `qformer_attention_mask`).

Tokenizers load from local directories (`load_tokenizer`); nothing is downloaded.
"""
from __future__ import annotations

import os
import re

import numpy as np

from blip2_jax.data import instructions

IGNORE_INDEX = -100
DEC_TOKEN = "[DEC]"
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's pre_caption."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def blip_question(question: str, max_words: int = 50) -> str:
    """LAVIS `BlipQuestionProcessor.pre_question`: lowercase, delete `.!"()*#:;~` (not "?"), strip
    trailing spaces, keep at most `max_words` words."""
    question = _PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (never the hub)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_bert_tokenizer(path: str):
    """BERT uncased WordPiece from a directory (tokenizer files or just vocab.txt) + `[DEC]` bos."""
    from transformers import BertTokenizerFast

    if not os.path.isdir(path):
        raise FileNotFoundError(f"BERT tokenizer directory {path!r} does not exist")
    has_config = any(os.path.exists(os.path.join(path, f))
                     for f in ("tokenizer.json", "tokenizer_config.json"))
    if has_config:
        tok = BertTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        vocab_file = os.path.join(path, "vocab.txt")
        # transformers 5.x takes the vocabulary as `vocab=` (a `vocab_file=` keyword is silently
        # ignored and leaves a 5-token vocabulary).
        tok = BertTokenizerFast(vocab=vocab_file, do_lower_case=True)
        with open(vocab_file, encoding="utf-8") as f:
            expected = sum(1 for line in f if line.strip())
        if len(tok) < expected:
            raise ValueError(f"{vocab_file}: tokenizer has {len(tok)} entries, the file {expected}")
    tok.truncation_side = "right"
    if tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


def _pad(ids: list[int], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = ids[:length]
    mask = np.zeros(length, np.int32)
    mask[: len(ids)] = 1
    out = np.full(length, pad_id, np.int32)
    out[: len(ids)] = ids
    return out, mask


class Stage1Text:
    """Caption -> {"input_ids", "attention_mask"} for the Q-Former (BERT + [DEC])."""

    def __init__(self, tokenizer, max_len: int = 32):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, caption: str, rng: np.random.Generator | None = None) -> dict:
        del rng
        enc = self.tokenizer(caption, padding="max_length", truncation=True,
                             max_length=self.max_len)
        return {"input_ids": np.asarray(enc["input_ids"], np.int32),
                "attention_mask": np.asarray(enc["attention_mask"], np.int32)}


PROMPT_MASKS = ("lavis", "exact")


class OPTText:
    """Caption -> {"input_ids", "attention_mask", "labels"} for a decoder-only LLM (LAVIS blip2_opt.forward):
    `BOS prompt caption "\n"`. BOS only where the tokenizer has one (OPT `</s>`, LLaMA `<s>`; Qwen2 none);
    padding with the pad token, or EOS where there is none (LLaMA; padded positions are masked)."""

    def __init__(self, tokenizer, max_len: int = 32, prompt: str = "", prompt_mask: str = "lavis"):
        if prompt_mask not in PROMPT_MASKS:
            raise ValueError(f"data.prompt_mask={prompt_mask!r}: expected one of {PROMPT_MASKS}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.prompt = prompt
        self.prompt_mask = prompt_mask
        self.bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad is None:
            raise ValueError("the LLM's tokenizer needs a pad_token or an eos_token")
        self.prompt_len = self._prompt_len(prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prompt_len(self, prompt: str) -> int:
        """Leading label positions the prompt masks (see `data.prompt_mask` in config_sections)."""
        if not prompt:
            return 0
        counted = prompt.rstrip() if self.prompt_mask == "exact" else prompt
        return len(self.bos) + len(self._encode(counted))

    def __call__(self, caption: str, rng: np.random.Generator | None = None, prompt: str | None = None) -> dict:
        """`prompt` replaces the fixed one for this caption (instruction tuning: one per example)."""
        del rng
        prompt_len = self.prompt_len
        if prompt is not None:
            prompt_len = self._prompt_len(prompt)
        else:
            prompt = self.prompt
        ids = self.bos + self._encode(prompt + caption + "\n")
        input_ids, mask = _pad(ids, self.max_len, self.pad)
        labels = np.where(mask == 1, input_ids, IGNORE_INDEX).astype(np.int32)
        labels[:prompt_len] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class T5Text:
    """Caption -> encoder text + decoder target for FlanT5 (prefix-LM split or a fixed prompt)."""

    def __init__(self, tokenizer, max_len: int = 32, mode: str = "prefix",
                 prompt: str = "a photo of"):
        if mode not in ("prefix", "prompt"):
            raise ValueError(f"T5 text mode must be 'prefix' or 'prompt', got {mode!r}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.mode = mode
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.prompt_ids = self._encode(prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def split_point(self, num_tokens: int, rng: np.random.Generator) -> int:
        """k uniform in [1, max(1, num_tokens // 2)]."""
        return int(rng.integers(1, max(1, num_tokens // 2) + 1))

    def __call__(self, caption: str, rng: np.random.Generator | None = None, prompt: str | None = None) -> dict:
        """`prompt` (mode "prompt" only) replaces the fixed encoder text for this caption."""
        if prompt is not None and self.mode != "prompt":
            raise ValueError("a per-caption prompt needs T5 text mode 'prompt' (data.text_mode t5_prompt)")
        ids = self._encode(caption)
        if self.mode == "prefix":
            if rng is None:
                raise ValueError("prefix mode draws its split point from an rng")
            k = self.split_point(len(ids), rng)
            enc_ids, dec_ids = ids[:k], ids[k:]
        else:
            enc_ids, dec_ids = (self.prompt_ids if prompt is None else self._encode(prompt)), ids
        m = self.max_len - 1  # Truncate the text, keep </s> (as HF's truncation does).
        input_ids, mask = _pad(enc_ids[:m] + [self.eos], self.max_len, self.pad)
        target, dec_mask = _pad(dec_ids[:m] + [self.eos], self.max_len, self.pad)
        labels = np.where(dec_mask == 1, target, IGNORE_INDEX).astype(np.int32)
        decoder_input_ids = np.concatenate([[self.pad], target[:-1]]).astype(np.int32)
        return {"input_ids": input_ids, "attention_mask": mask,
                "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": dec_mask,
                "labels": labels}


class InstructText:
    """Caption -> the LLM's tokens (`OPTText` / `T5Text` in prompt mode) with an InstructBLIP instruction of
    `task` as the prompt, drawn per example from `data/instructions.py`, plus that instruction for the
    Q-Former: `qformer_input_ids` / `qformer_attention_mask` (`[CLS] instruction [SEP]`, padded to `max_len`).

    Tasks: "caption" (caption records; the target is the caption), "vqa" (instruction records; the target is
    the answer, the instruction holds the question), "vqg" (visual question generation on the same records,
    InstructBLIP's third held-in task: the instruction holds the answer, the target is the question)."""

    TASKS = ("caption", "vqa", "vqg")
    QUESTION_TASKS = ("vqa", "vqg")  # read instruction records (a question per caption)

    def __init__(self, llm_text, qformer_tokenizer, task: str = "caption", max_len: int = 32):
        if task not in self.TASKS:
            raise ValueError(f"data.instruction_task={task!r}: expected 'caption' (caption records), 'vqa' or 'vqg' "
                             "(instruction records of question and answer, `data.build table --question_key`)")
        self.llm_text, self.qformer_tokenizer, self.task, self.max_len = llm_text, qformer_tokenizer, task, max_len
        # A decoder-only LLM reads `instruction caption`. The space goes in front of the caption, not after the
        # instruction: a byte-level BPE attaches it to the next word ("Ġtwo"), so an instruction ending in a
        # space would count one token too many as prompt and mask the answer's first token.
        self.separator = " " if isinstance(llm_text, OPTText) else ""

    def __call__(self, caption: str, rng: np.random.Generator | None = None, question: str | None = None) -> dict:
        """`caption`: a caption, or the answer to `question` (tasks "vqa" and "vqg")."""
        if rng is None:
            raise ValueError("InstructText draws its instruction from an rng")
        if (question is not None) != (self.task in self.QUESTION_TASKS):
            raise ValueError(f"instruction task {self.task!r} got {'a' if question is not None else 'no'} question: "
                             "vqa and vqg need instruction records (questions), caption needs caption records")
        target, fields = caption, {}
        if self.task == "vqa":
            fields = {"question": question}
        elif self.task == "vqg":
            target, fields = question, {"answer": caption}
        instruction = instructions.instruction(self.task, rng, **fields)
        out = self.llm_text(self.separator + target, rng, prompt=instruction)
        enc = self.qformer_tokenizer(instruction, padding="max_length", truncation=True, max_length=self.max_len)
        out["qformer_input_ids"] = np.asarray(enc["input_ids"], np.int32)
        out["qformer_attention_mask"] = np.asarray(enc["attention_mask"], np.int32)
        return out
