"""The model side of the server: turning checked request fields into padded batches and running them.

An engine has `routes` (route -> field schema), `buckets()` (every shape it compiles), `warm(bucket)`
(one run of that shape), `prepare(route, fields) -> (key, payload)` (decode, tokenise and check one
request; requests with equal keys may share a batch), `run(key, payloads)` (one model call for a
batch) and `respond(route, result)` (the JSON answer).

- `GenerationEngine` (BLIP-2 OPT / FlanT5): `/caption` and `/vqa` through `blip2_jax.generate`.
  Static, compiled at warm-up: batch sizes, prompt lengths, the beam counts, the token budgets
  (`max_new_tokens` values) and the repetition penalty. Per request: the prompt or question, `num_beams`
  (one of the compiled counts), `max_new_tokens` (greedy: any value up to the largest budget, decoded
  at the smallest budget that holds it and cut, which is exactly greedy decoding at that length; beam
  search: one of the budgets, since its result depends on the budget), `min_new_tokens` (>= 1, a traced
  value) and `length_penalty` (a traced value). Requests batch together when they share beams, budget,
  min_new_tokens and length_penalty.
- `RetrievalEngine` (a stage-1 / `Blip2ForImageTextRetrieval` model): `/itm` and `/embed`; one jitted
  function (image ITC features, text ITC feature, ITM logits) per batch size, texts padded to one length.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
from typing import Any, Optional, Sequence

import jax
import numpy as np

from blip2_jax import workdir
from blip2_jax.data import image_ops
from blip2_jax.data import text as data_text
from blip2_jax.decoding import generate
from blip2_jax.evaluate import load as load_lib
from blip2_jax.models.blip2 import Blip2DecoderOnly
from blip2_jax.processor import Blip2Processor, load_processor, pad_rows
from blip2_jax.serve.inputs import Field, RequestError, decode_image
from blip2_jax.serve.settings import Settings, bucket

log = logging.getLogger(__name__)

DECODING_FIELDS = {"num_beams": Field(int), "max_new_tokens": Field(int), "min_new_tokens": Field(int),
                   "length_penalty": Field(float)}
CAPTION_FIELDS = {"image": Field(bytes, True), "prompt": Field(str), **DECODING_FIELDS}
VQA_FIELDS = {"image": Field(bytes, True), "question": Field(str, True), **DECODING_FIELDS}
ITM_FIELDS = {"image": Field(bytes, True), "text": Field(str, True)}
EMBED_FIELDS = {"image": Field(bytes), "text": Field(str)}
# LAVIS's zero-shot VQA length penalty per LLM (configs/eval.py); captions use 1.0.
VQA_LENGTH_PENALTY = {"decoder": 0.0, "t5": -1.0}  # LAVIS: OPT (every decoder-only LLM) 0, FlanT5 -1


class CompileCounter:
    """XLA compilations in this process so far (jax.monitoring's backend-compile event)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def fill_batch(items: list, size: int) -> list:
    """`items` repeated from the first up to `size` rows (a batch padded to its bucket)."""
    return items + [items[0]] * (size - len(items))


class _Engine:
    """What both engines share: image decoding, text checks and tokenising, describing itself."""

    kind = ""
    routes: dict = {}

    def __init__(self, model, params, processor: Blip2Processor, settings: Settings):
        self.model, self.params, self.processor, self.settings = model, params, processor, settings
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe across threads

    def pixels(self, data: bytes) -> np.ndarray:
        """Image bytes -> the model's normalised `[S, S, 3]` float32 input."""
        return self.processor.preprocess([decode_image(data, self.settings.max_image_pixels)])[0]

    def blank_pixels(self) -> np.ndarray:
        size = self.processor.image_size
        return np.zeros((size, size, 3), np.float32)

    def check_text(self, name: str, text: str, hint: str = "") -> str:
        """`text` when it is non-empty and within the character limit; a 400 naming `name` otherwise."""
        if not text.strip():
            raise RequestError(400, f"field {name!r} is empty{hint}")
        if len(text) > self.settings.max_prompt_chars:
            raise RequestError(400, f"field {name!r} has {len(text)} characters, more than this server's limit "
                                    f"of {self.settings.max_prompt_chars}")
        return text

    def tokens(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.processor.tokenizer(text, add_special_tokens=True)["input_ids"])

    def describe(self) -> dict:
        """The static settings, for /health."""
        s = self.settings
        return {"model": type(self.model).__name__, "routes": [f"/{r}" for r in self.routes],
                "batch_sizes": list(s.batch_sizes), "max_wait_ms": s.max_wait_ms, "queue_size": s.queue_size,
                "image_size": self.processor.image_size}


# -- generation ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Decoding:
    """The settings a generation batch shares (its batching key); `budget` is the compiled
    `max_new_tokens` the batch decodes with."""

    num_beams: int
    budget: int
    min_new_tokens: int
    length_penalty: float


@dataclasses.dataclass(eq=False)
class Prompted:
    """One generation request: its image, its prompt's token ids (special tokens included, unpadded),
    how many new tokens it wants, and for InstructBLIP the same text as the Q-Former's instruction
    (`[CLS] ... [SEP]` in its BERT vocabulary, unpadded)."""

    pixels: np.ndarray
    ids: list
    max_new_tokens: int
    instruction: Optional[list] = None


class GenerationEngine(_Engine):
    """Captions and VQA answers of a `Blip2DecoderOnly` (OPT, LLaMA, ...) / `Blip2T5` (see the module docstring)."""

    kind = "generation"
    routes = {"caption": CAPTION_FIELDS, "vqa": VQA_FIELDS}

    def __init__(self, model, params, processor: Blip2Processor, settings: Settings):
        super().__init__(model, params, processor, settings)
        self.llm = "decoder" if isinstance(model, Blip2DecoderOnly) else "t5"
        text = model.config.text
        # Without a prompt a decoder-only LLM starts from its BOS and T5 encodes the visual prompt alone
        # (as `generate`).
        self.empty_prompt = [text.bos_token_id] if self.llm == "decoder" else []
        self.pad_id = processor.pad_token_id  # EOS for LLaMA-style tokenizers without a pad token
        # InstructBLIP: the prompt is also the Q-Former's instruction, padded to one width (the longest prompt
        # bucket + [CLS] and [SEP], within the Q-Former's positions) so that it adds no bucket dimension.
        self.instruction_width = 0
        if processor.instruction_aware:
            self.instruction_width = min(max(settings.prompt_lens) + 2, model.config.qformer.max_position_embeddings)
        if self.llm == "decoder":
            longest = model.config.num_query_tokens + max(settings.prompt_lens) + max(settings.max_new_tokens)
            if longest > text.max_position_embeddings:
                raise ValueError(f"{model.config.num_query_tokens} queries + the longest prompt bucket "
                                 f"{max(settings.prompt_lens)} + the largest budget {max(settings.max_new_tokens)} "
                                 f"exceed the LLM's max_position_embeddings {text.max_position_embeddings}")

    def buckets(self) -> list[tuple]:
        s = self.settings
        return [(b, t, k, n) for b in s.batch_sizes for t in s.prompt_lens for k in s.num_beams
                for n in s.max_new_tokens]

    def warm(self, shape: tuple) -> None:
        b, t, k, n = shape
        filler = [self.pad_id if self.llm == "t5" else self.empty_prompt[0]] * t
        instruction = self.instruction_ids("prompt", "") if self.instruction_width else None
        self.run(Decoding(k, n, 1, 1.0), [Prompted(self.blank_pixels(), filler, n, instruction)] * b)

    def prepare(self, route: str, fields: dict) -> tuple[Decoding, Prompted]:
        decoding, max_new = self.decoding(route, fields)
        if route == "caption":
            name, text = "prompt", fields.get("prompt")
            if text is None:
                ids = self.empty_prompt
            else:
                text = self.check_text("prompt", text, ": leave it out to caption without a prompt")
                ids = self.prompt_ids("prompt", text)
        else:
            question = data_text.blip_question(self.check_text("question", fields["question"]))
            name, text = "question", self.settings.vqa_prompt.format(self.check_text("question", question))
            ids = self.prompt_ids("question", text)
        instruction = self.instruction_ids(name, text or "") if self.instruction_width else None
        return decoding, Prompted(self.pixels(fields["image"]), ids, max_new, instruction)

    def instruction_ids(self, name: str, text: str) -> list[int]:
        """InstructBLIP's Q-Former instruction for `text` (an empty one is `[CLS] [SEP]`, as the caption CLI)."""
        with self._tokenizer_lock:
            ids = list(self.processor.qformer_tokenizer(text, add_special_tokens=True)["input_ids"])
        if len(ids) > self.instruction_width:
            raise RequestError(400, f"field {name!r} is too long: it is {len(ids)} WordPieces in the Q-Former's "
                                    f"vocabulary, more than this server's {self.instruction_width}")
        return ids

    def decoding(self, route: str, fields: dict) -> tuple[Decoding, int]:
        """The request's decoding settings within the compiled ones, and its `max_new_tokens`."""
        s = self.settings
        beams = fields.get("num_beams", s.num_beams[0])
        if beams not in s.num_beams:
            raise RequestError(400, f"num_beams={beams} is not compiled on this server (compiled: "
                                    f"{', '.join(map(str, s.num_beams))})")
        top = max(s.max_new_tokens)
        max_new = fields.get("max_new_tokens", top)
        if not 1 <= max_new <= top:
            raise RequestError(400, f"max_new_tokens must be between 1 and {top} (this server's largest budget), "
                                    f"got {max_new}")
        budget = bucket(max_new, s.max_new_tokens)
        if beams > 1 and max_new != budget:
            raise RequestError(400, f"max_new_tokens={max_new} with num_beams={beams}: beam search is compiled for "
                                    f"max_new_tokens in {sorted(s.max_new_tokens)} only (its result depends on the "
                                    f"budget); greedy decoding (num_beams=1) takes any value up to {top}")
        min_new = fields.get("min_new_tokens", 1)
        if not 1 <= min_new <= max_new:
            raise RequestError(400, f"min_new_tokens must be between 1 and max_new_tokens ({max_new}), got {min_new}")
        default_lp = VQA_LENGTH_PENALTY[self.llm] if route == "vqa" else 1.0
        length_penalty = fields.get("length_penalty", default_lp) if beams > 1 else 1.0  # greedy ignores it
        return Decoding(beams, budget, min_new, length_penalty), max_new

    def prompt_ids(self, name: str, text: str) -> list[int]:
        ids = self.tokens(text)
        longest = max(self.settings.prompt_lens)
        if len(ids) > longest:
            what = "the prompt" if name == "prompt" else f"the VQA prompt {self.settings.vqa_prompt!r} with it"
            raise RequestError(400, f"field {name!r} is too long: {what} is {len(ids)} tokens, more than this "
                                    f"server's longest compiled prompt of {longest} tokens")
        return ids

    def run(self, key: Decoding, items: Sequence[Prompted]) -> list[str]:
        """One `generate` call for the batch, padded to its batch and prompt buckets."""
        s = self.settings
        rows = fill_batch(list(items), bucket(len(items), s.batch_sizes))
        width = bucket(max(len(r.ids) for r in rows), s.prompt_lens)
        ids, mask = pad_rows([r.ids for r in rows], width, self.pad_id, self.processor.padding_side)
        instruction = {}
        if self.instruction_width:
            q_pad = self.processor.qformer_tokenizer.pad_token_id or 0
            q_ids, q_mask = pad_rows([r.instruction for r in rows], self.instruction_width, q_pad, "right")
            instruction = {"qformer_input_ids": q_ids, "qformer_attention_mask": q_mask}
        out = generate(self.model, self.params, np.stack([r.pixels for r in rows]), ids, mask,
                       max_new_tokens=key.budget, num_beams=key.num_beams, min_new_tokens=key.min_new_tokens,
                       length_penalty=key.length_penalty, repetition_penalty=s.repetition_penalty, **instruction)
        out = np.asarray(out)
        return [self.processor.decode(out[i:i + 1, :item.max_new_tokens])[0] for i, item in enumerate(items)]

    def respond(self, route: str, result: str) -> dict:
        return {"caption": result} if route == "caption" else {"answer": result}

    def describe(self) -> dict:
        s = self.settings
        return {**super().describe(), "llm": workdir.llm_kind(self.model), "prompt_lens": list(s.prompt_lens),
                "num_beams": list(s.num_beams), "max_new_tokens": list(s.max_new_tokens),
                "repetition_penalty": s.repetition_penalty, "vqa_prompt": s.vqa_prompt,
                "instruction_aware": bool(self.instruction_width),
                "per_request": ["prompt/question", "num_beams", "max_new_tokens", "min_new_tokens", "length_penalty"]}


# -- retrieval ----------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Pair:
    """One retrieval request: the route, and its image and/or text (`None` when absent)."""

    route: str
    pixels: Optional[np.ndarray]
    ids: Optional[list]


def _retrieval_outputs(model, params, pixels, ids, mask):
    """`(image ITC features [B, Q, E], text ITC features [B, E], ITM logits [B, 2])` of the pairs."""
    def f(m):
        embeds = m.image_embeds(m.vit_features(pixels))
        return m.image_features(embeds)[0], m.text_features(ids, mask), m.itm_logits(embeds, ids, mask)
    return model.apply({"params": params}, method=f)


class RetrievalEngine(_Engine):
    """ITM scores and ITC embeddings of a `Blip2Stage1` (see the module docstring). Texts are cleaned as
    LAVIS's caption processor does (lowercase, punctuation) and tokenised `[CLS] text [SEP]`."""

    kind = "retrieval"
    routes = {"itm": ITM_FIELDS, "embed": EMBED_FIELDS}
    KEY = "retrieval"

    def __init__(self, model, params, processor: Blip2Processor, settings: Settings):
        super().__init__(model, params, processor, settings)
        positions = model.config.qformer.max_position_embeddings
        if settings.text_len > positions:
            raise ValueError(f"text_len {settings.text_len} exceeds the Q-Former's max_position_embeddings {positions}")
        self.pad_id = processor.tokenizer.pad_token_id or 0
        self._fn = jax.jit(functools.partial(_retrieval_outputs, model))

    def buckets(self) -> list[tuple]:
        return [(b,) for b in self.settings.batch_sizes]

    def warm(self, shape: tuple) -> None:
        self.run(self.KEY, [Pair("itm", self.blank_pixels(), self.tokens(""))] * shape[0])

    def prepare(self, route: str, fields: dict) -> tuple[str, Pair]:
        if route == "embed" and not fields:
            raise RequestError(400, "give 'image', 'text' or both")
        ids = self.text_ids(fields["text"]) if "text" in fields else None
        pixels = self.pixels(fields["image"]) if "image" in fields else None
        return self.KEY, Pair(route, pixels, ids)

    def text_ids(self, text: str) -> list[int]:
        cleaned = data_text.clean_caption(self.check_text("text", text))
        ids = self.tokens(self.check_text("text", cleaned))
        if len(ids) > self.settings.text_len:
            raise RequestError(400, f"field 'text' is too long: {len(ids)} tokens, more than this server's limit of "
                                    f"{self.settings.text_len}")
        return ids

    def run(self, key: str, items: Sequence[Pair]) -> list[dict]:
        """One jitted call for the batch (absent images and texts filled with blanks)."""
        rows = fill_batch(list(items), bucket(len(items), self.settings.batch_sizes))
        blank_ids = self.tokens("")
        ids, mask = pad_rows([r.ids if r.ids is not None else blank_ids for r in rows], self.settings.text_len,
                             self.pad_id, "right")
        pixels = np.stack([r.pixels if r.pixels is not None else self.blank_pixels() for r in rows])
        image_feats, text_feats, itm = (np.asarray(x) for x in self._fn(self.params, pixels, ids, mask))
        return [_retrieval_result(item, image_feats[i], text_feats[i], itm[i]) for i, item in enumerate(items)]

    def respond(self, route: str, result: dict) -> dict:
        return result

    def describe(self) -> dict:
        return {**super().describe(), "text_len": self.settings.text_len}


def _retrieval_result(item: Pair, image_feats: np.ndarray, text_feat: np.ndarray, itm: np.ndarray) -> dict:
    """The JSON answer of one pair: ITM match probability, logits and ITC similarity (`/itm`), or the
    embeddings and, with both, their similarity (`/embed`). ITC similarity = max over queries of the
    cosine, as `model.apply(..., method="itc")`."""
    similarity = float((image_feats @ text_feat).max())
    if item.route == "itm":
        logits = itm.astype(np.float64)
        probs = np.exp(logits - logits.max())
        return {"score": float(probs[1] / probs.sum()), "itm_logits": logits.tolist(), "itc_similarity": similarity}
    out: dict[str, Any] = {}
    if item.pixels is not None:
        out["image_embedding"] = image_feats.tolist()
    if item.ids is not None:
        out["text_embedding"] = text_feat.tolist()
    if item.pixels is not None and item.ids is not None:
        out["similarity"] = similarity
    return out


# -- loading ------------------------------------------------------------------------------------------
def load_engine(path: str, settings: Settings, *, tokenizer: str = "", frozen_dtype: str = "") -> _Engine:
    """The engine for the model at `path` (a Hugging Face BLIP-2 directory or a workdir of this project):
    generation for an OPT / FlanT5 model, retrieval for a stage-1 one. `frozen_dtype` ("float32", "bfloat16"
    or "int8": weight-only int8 matrices, bfloat16 compute) is that of the frozen ViT and LLM; default:
    float32 for a directory, the run's for a workdir."""
    loaded = load_lib.load_model(path, tokenizer=tokenizer, frozen_dtype=frozen_dtype)
    if loaded.llm:
        processor = load_processor(path, tokenizer_path=tokenizer or None)
        return GenerationEngine(loaded.model, loaded.params, processor, settings)
    size, mean, std = _retrieval_image_settings(path, loaded)
    processor = Blip2Processor(loaded.tokenizer, size, eos_token_id=None, padding_side="right", image_mean=mean,
                               image_std=std)
    return RetrievalEngine(loaded.model, loaded.params, processor, settings)


def _retrieval_image_settings(path: str, loaded) -> tuple[int, tuple, tuple]:
    """`(image size, mean, std)` of a stage-1 model: its run's data config (workdir), else the
    directory's preprocessor_config.json, else the ViT's size and CLIP's statistics."""
    if loaded.config is not None:
        data = loaded.config.data
        return (int(data.image_size), tuple(data.get("image_mean", image_ops.CLIP_MEAN)),
                tuple(data.get("image_std", image_ops.CLIP_STD)))
    pre = {}
    pre_file = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(pre_file):
        with open(pre_file, encoding="utf-8") as f:
            pre = json.load(f)
        pre = pre.get("image_processor", pre)
    size = pre.get("size")
    size = size.get("height") if isinstance(size, dict) else size
    return (int(size or loaded.model.config.vision.image_size), tuple(pre.get("image_mean", image_ops.CLIP_MEAN)),
            tuple(pre.get("image_std", image_ops.CLIP_STD)))
