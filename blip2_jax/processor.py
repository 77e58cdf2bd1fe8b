"""`load_processor(path)`: image preprocessing, prompt tokenisation and decoding for a BLIP-2 directory.

- Images: LAVIS `blip_image_eval` / HF `BlipImageProcessor` (bicubic resize to the model's image size,
  `/255`, CLIP mean and std), reusing `blip2_jax.data.image_ops.eval_transform`; NHWC float32 out.
- Prompts: the directory's tokenizer with its own special tokens (OPT prepends `</s>` as BOS, LLaMA
  `<s>`, T5 appends `</s>`), padded to the longest prompt: on the left for a decoder-only LLM (it
  continues from the last position), on the right for T5.
- InstructBLIP: the instruction also goes to the Q-Former, tokenised by its own BERT tokenizer
  (`qformer_tokenizer/`, where `InstructBlipProcessor.save_pretrained` writes it) with `[CLS]` and
  `[SEP]`, padded on the right (`tokenize_instruction`).
- Decoding: each row is cut at its first EOS (the text config's, e.g. "\\n" for BLIP-2 OPT), special
  tokens are skipped and the text is stripped, as LAVIS's `generate` does.

Everything is read from local files (config.json, preprocessor_config.json, tokenizer files); nothing
is downloaded.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from blip2_jax import checkpoint, workdir
from blip2_jax.convert import blip2 as hf_blip2
from blip2_jax.data import image_ops
from blip2_jax.data.text import load_bert_tokenizer, load_tokenizer
from blip2_jax.models.blip2 import Blip2T5
from blip2_jax.spec import model as spec

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> `(ids, mask)` int32 `[N, width]`, padded on `side` ("left" or "right")."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


class Blip2Processor:
    """Preprocessing and decoding around `blip2_jax.generate`."""

    def __init__(self, tokenizer, image_size: int, *, eos_token_id, padding_side: str = "left",
                 image_mean: Sequence[float] = image_ops.CLIP_MEAN, image_std: Sequence[float] = image_ops.CLIP_STD,
                 qformer_tokenizer=None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer  # InstructBLIP only
        self.image_size = int(image_size)
        self.padding_side = padding_side
        eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def preprocess(self, images) -> np.ndarray:
        """PIL images or uint8 arrays (`[H, W]`, `[H, W, 3|4]`) -> float32 `[N, S, S, 3]`, CLIP-normalised."""
        out = []
        for i, im in enumerate(images):
            if isinstance(im, np.ndarray):
                if im.dtype != np.uint8 or im.ndim not in (2, 3):
                    raise ValueError(f"image {i}: expected a uint8 [H, W] or [H, W, C] array, got "
                                     f"{im.dtype} {im.shape}")
                im = Image.fromarray(im if im.ndim == 2 or im.shape[-1] != 1 else im[..., 0])
            if not isinstance(im, Image.Image):
                raise TypeError(f"image {i}: expected a PIL image or a uint8 array, got {type(im).__name__}")
            rgb = np.asarray(im.convert("RGB"), np.uint8)
            out.append(image_ops.eval_transform(rgb, self.image_size, draft=False, mean=self.image_mean,
                                                std=self.image_std))
        return np.stack(out).astype(np.float32)

    def tokenize(self, prompts: Sequence[str], padding_side: Optional[str] = None):
        """`(input_ids, attention_mask)` int32 `[N, T]` with the tokenizer's special tokens, padded to the
        longest prompt on `padding_side` (default: left for a decoder-only LLM, right for T5)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        rows = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        return pad_rows(rows, max(len(r) for r in rows), self.pad_token_id, side)

    @property
    def pad_token_id(self) -> int:
        """The id prompts are padded with: the tokenizer's pad token, or its EOS where it has none (LLaMA's
        tokenizers; the padded positions are masked anyway)."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has no pad token and no EOS token")
        return pad

    @property
    def instruction_aware(self) -> bool:
        """Whether the model (InstructBLIP) also reads the prompt in its Q-Former (`tokenize_instruction`)."""
        return self.qformer_tokenizer is not None

    def tokenize_instruction(self, prompts: Sequence[str]):
        """`(qformer_input_ids, qformer_attention_mask)` int32 `[N, T_q]`: InstructBLIP's instruction in the
        Q-Former's BERT vocabulary (`[CLS] ... [SEP]`), padded on the right, as `InstructBlipProcessor`."""
        if not self.instruction_aware:
            raise ValueError("tokenize_instruction: this processor has no Q-Former tokenizer (only InstructBLIP "
                             "models take an instruction in the Q-Former)")
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.qformer_tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        return pad_rows(rows, max(len(r) for r in rows), self.qformer_tokenizer.pad_token_id or 0, "right")

    def decode(self, ids) -> list[str]:
        """Token rows -> text: cut at the first EOS, skip special tokens, strip."""
        texts = []
        for row in np.asarray(ids):
            row = [int(t) for t in row]
            ends = [k for k, t in enumerate(row) if t in self.eos_token_ids]
            row = row[:ends[0]] if ends else row
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_processor(path: str, *, tokenizer_path: Optional[str] = None, image_size: Optional[int] = None,
                   qformer_tokenizer_path: Optional[str] = None) -> Blip2Processor:
    """A `Blip2Processor` for a BLIP-2 or InstructBLIP directory (its config.json and tokenizer files), or
    for a stage-2 workdir of this project (the run's `data.tokenizer_path`, `data.image_size` and LLM EOS).

    `tokenizer_path` points elsewhere for the tokenizer; `image_size` overrides the config's;
    `qformer_tokenizer_path` (InstructBLIP) elsewhere for the Q-Former's (default `path/qformer_tokenizer`).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_processor: {path!r} is not a directory")
    if checkpoint.is_workdir(path):
        return _workdir_processor(path, tokenizer_path, image_size)
    config = _read_json(os.path.join(path, "config.json"))
    # transformers 5.x saves a processor's image settings nested in processor_config.json
    pre = _read_json(os.path.join(path, "preprocessor_config.json")) or _read_json(os.path.join(path, "processor_config.json"))
    pre = pre.get("image_processor", pre)
    text = config.get("text_config", {})
    kind = text.get("model_type", "opt")
    if image_size is None:
        size = pre.get("size")
        image_size = (size.get("height") if isinstance(size, dict) else size) or \
            config.get("vision_config", {}).get("image_size", 224)
    tok_dir = tokenizer_path or path
    if not any(os.path.exists(os.path.join(tok_dir, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"load_processor: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in "
                                f"{tok_dir!r}; pass tokenizer_path=")
    tokenizer = load_tokenizer(tok_dir)
    qformer_tokenizer = None
    if hf_blip2.is_instructblip(config):
        q_dir = qformer_tokenizer_path or os.path.join(path, "qformer_tokenizer")
        if not os.path.isdir(q_dir):
            raise FileNotFoundError(f"load_processor: an InstructBLIP model reads its instruction with the Q-Former's "
                                    f"BERT tokenizer; no directory {q_dir!r} (InstructBlipProcessor.save_pretrained "
                                    "writes it there); pass qformer_tokenizer_path=")
        qformer_tokenizer = load_tokenizer(q_dir)
    return Blip2Processor(tokenizer, image_size, eos_token_id=text.get("eos_token_id"),
                          padding_side=_padding_side(kind),
                          image_mean=pre.get("image_mean", image_ops.CLIP_MEAN),
                          image_std=pre.get("image_std", image_ops.CLIP_STD), qformer_tokenizer=qformer_tokenizer)


def _workdir_processor(path: str, tokenizer_path: Optional[str], image_size: Optional[int]) -> Blip2Processor:
    config = workdir.run_config(path)
    if config.task != "stage2":
        raise ValueError(f"load_processor: {path} is a {config.task!r} workdir; captions and answers need a "
                         "stage-2 (LLM) model")
    text = spec.text_config(config)
    qformer_tokenizer = None
    if config.model.get("instruction_aware", False):  # an instruction-tuned (InstructBLIP) run
        qformer_tokenizer = load_bert_tokenizer(config.data.qformer_tokenizer_path)
    return Blip2Processor(load_tokenizer(tokenizer_path or config.data.tokenizer_path),
                          image_size or config.data.image_size, eos_token_id=text.eos_token_id,
                          padding_side=_padding_side(config.model.llm),
                          image_mean=tuple(config.data.get("image_mean", image_ops.CLIP_MEAN)),
                          image_std=tuple(config.data.get("image_std", image_ops.CLIP_STD)),
                          qformer_tokenizer=qformer_tokenizer)


def for_model(model, tokenizer, image_size: int, qformer_tokenizer=None) -> Blip2Processor:
    """The processor of a stage-2 `model` with `tokenizer`: its LLM's EOS, prompts padded on the left
    for a decoder-only LLM (it continues from the last position) and on the right for T5; an InstructBLIP
    `model` needs its Q-Former's `qformer_tokenizer`."""
    if model.config.instruction_aware and qformer_tokenizer is None:
        raise ValueError("for_model: an InstructBLIP model needs qformer_tokenizer (its Q-Former's BERT vocabulary)")
    return Blip2Processor(tokenizer, image_size, eos_token_id=model.config.text.eos_token_id,
                          padding_side="right" if isinstance(model, Blip2T5) else "left",
                          qformer_tokenizer=qformer_tokenizer)


def _padding_side(model_type: str) -> str:
    """Right for T5 (an encoder reads the prompt), left for every decoder-only LLM."""
    return "right" if model_type == "t5" else "left"
