"""The grain input pipeline: image-text records -> fixed-shape numpy batches for one JAX process.

Batch contract (what the train loop relies on). A batch is a dict of numpy arrays whose leading
dimension is the per-process batch size B = config.global_batch_size // process_count:

  every text mode:
    "image"          float32 [B, H, W, 3]  NHWC, H = W = config.image_size, CLIP mean/std normalised
    "image_id"       int32   [B]           dense id of the source image: equal for every caption of
                                           the same image (used to keep same-image pairs out of ITM
                                           negatives and for COCO soft ITC targets)
  text_mode "stage1" (Q-Former: BERT uncased + [DEC]):
    "input_ids"      int32   [B, L]        [CLS] caption [SEP] [PAD]..., L = config.max_text_len (32)
    "attention_mask" int32   [B, L]
  text_mode "opt" (stage 2, any decoder-only LLM: OPT, LLaMA, Mistral, Qwen2, Gemma):
    "input_ids"      int32   [B, L]        BOS prompt caption "\n" then pad (right padding; OPT's BOS
                                           is </s>; no BOS with a tokenizer that has none, as Qwen2's)
    "attention_mask" int32   [B, L]
    "labels"         int32   [B, L]        = input_ids, -100 at padding and at BOS + prompt
                                           (the loss shifts: logits[:, t] predict labels[:, t + 1])
  with data.instruction_task (InstructBLIP instruction tuning; text modes "opt" and "t5_prompt", the
  prompt is a drawn instruction), also:
    "qformer_input_ids"      int32 [B, Lq] [CLS] instruction [SEP] [PAD]..., Lq = max_instruction_len
    "qformer_attention_mask" int32 [B, Lq]
  text_mode "t5_prefix" / "t5_prompt" (stage 2, FlanT5):
    "input_ids"      int32   [B, L]        encoder text (caption prefix, or the fixed prompt) + </s>
    "attention_mask" int32   [B, L]
    "decoder_input_ids"      int32 [B, L]  labels shifted right behind the start token (pad, 0)
    "decoder_attention_mask" int32 [B, L]  1 where labels are real tokens
    "labels"         int32   [B, L]        decoder target (caption suffix, or the caption) + </s>,
                                           -100 at padding (not shifted: logits[:, t] vs labels[:, t])

Order and randomness. Each source is shuffled globally with a seed derived from `seed` (a new
permutation every epoch) and repeated forever; sources are mixed with their configured weights
(the global stream); global batch k is elements k*G ... (k+1)*G - 1 of that stream (G =
global_batch_size), and JAX process p reads only its contiguous block of each, rows p*B ...
(p+1)*B - 1 (B = G / process_count), which are its rows of the global array. The global batches are
therefore the same for any process count, and a position in the global stream is a position for
every process (checkpoints store it: resuming on another process count continues the stream). Everything random for an element (which caption of a
multi-caption record, the FlanT5 split point, crop/flip/RandAugment) comes from a generator seeded
by `seed` and the element's position in the global stream, so it does not depend on worker count,
thread count or restarts. `TrainIterator.get_state()` returns a JSON-serialisable dict; after
`set_state` the iterator yields exactly the batches an uninterrupted run would have yielded.

A record that fails to parse or decode is dropped (its batch is filled from the next elements),
counted in `TrainIterator.num_dropped` (a metric for the loop) and its id logged.

To turn a per-process batch into global `jax.Array`s, use `blip2_jax.sharding.make_global_batch`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from blip2_jax import config_sections
from blip2_jax.data import image_ops, records, text

TEXT_MODES = ("stage1", "opt", "t5_prefix", "t5_prompt")
_MAX_LOGGED_IDS = 32


# ----------------------------------------------------------------------------- sources


def _open_source(cfg) -> Sequence:
    if cfg.tfds_name:
        import tensorflow_datasets as tfds

        return tfds.data_source(cfg.tfds_name, split=cfg.split,
                                data_dir=cfg.tfds_data_dir or None)
    return grain.sources.ArrayRecordDataSource(records.find_shards(cfg.path, cfg.prefix or None))


def _as_str(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def _lookup(d: Mapping, key: str):
    for part in key.split("/"):
        d = d[part]
    return d


@dataclasses.dataclass(frozen=True)
class _Parse:
    """Raw record (our bytes or a TFDS dict) -> (image data, captions, printable id)."""

    name: str
    image_key: str
    captions_key: str

    def __call__(self, raw) -> tuple[Any, list[str], str]:
        image, captions, _, record_id = self.with_questions(raw)
        return image, captions, record_id

    def with_questions(self, raw) -> tuple[Any, list[str], list[str], str]:
        """`(image data, captions, questions, printable id)`; questions only in instruction records."""
        if isinstance(raw, (bytes, bytearray)):
            rec = records.decode_record(raw)
            return rec.image, list(rec.captions), list(rec.questions), f"{self.name}:{rec.image_id}"
        image = raw[self.image_key]
        caps = _lookup(raw, self.captions_key)
        caps = [caps] if isinstance(caps, (str, bytes, np.bytes_)) else list(np.ravel(caps))
        image_id = raw.get("image_id", raw.get("id", ""))
        return image, [_as_str(c) for c in caps], [], f"{self.name}:{_as_str(image_id)}"


def _parsers_and_sources(source_cfgs: Mapping) -> list[tuple[str, Sequence, _Parse]]:
    if not source_cfgs:
        raise ValueError("config.train_sources is empty: add name=source_config(...) entries")
    out = []
    for name in sorted(source_cfgs):
        cfg = source_cfgs[name]
        out.append((name, _open_source(cfg), _Parse(name, cfg.image_key, cfg.captions_key)))
    return out


# ----------------------------------------------------------------------------- element transforms


def make_text_encoder(config):
    """The text encoder for config.text_mode (loads the tokenizer from config.tokenizer_path)."""
    mode = config.text_mode
    if mode not in TEXT_MODES:
        raise ValueError(f"config.text_mode={mode!r}; expected one of {TEXT_MODES}")
    if not config.tokenizer_path:
        raise ValueError("config.tokenizer_path is empty: point it at a local tokenizer directory")
    if mode == "stage1":
        return text.Stage1Text(text.load_bert_tokenizer(config.tokenizer_path), config.max_text_len)
    tok = text.load_tokenizer(config.tokenizer_path)
    if mode == "opt":
        llm_text = text.OPTText(tok, config.max_text_len, config.prompt, config.get("prompt_mask", "lavis"))
    else:
        llm_text = text.T5Text(tok, config.max_text_len, mode="prefix" if mode == "t5_prefix" else "prompt",
                               prompt=config.prompt or "a photo of")
    task = config.get("instruction_task", "")
    if not task:
        return llm_text
    if mode == "t5_prefix":
        raise ValueError("config.data.instruction_task needs text_mode 'opt' or 't5_prompt' (the instruction is "
                         "the prompt), got 't5_prefix'")
    if not config.get("qformer_tokenizer_path"):
        raise ValueError("config.data.instruction_task is set but config.data.qformer_tokenizer_path (the Q-Former's "
                         "BERT vocabulary for the instruction) is empty")
    return text.InstructText(llm_text, text.load_bert_tokenizer(config.qformer_tokenizer_path), task,
                             config.get("max_instruction_len", 32))


@dataclasses.dataclass
class _TrainTransform(grain.transforms.RandomMap):
    """(dense id, source index, raw record) -> training example, or a drop marker."""

    parsers: tuple
    text_encoder: Any
    image_kwargs: dict
    image_size: int
    max_words: int
    caption_index: int = -1

    def random_map(self, element, rng: np.random.Generator):
        dense_id, source_index, raw = element
        record_id = f"source {source_index} record {dense_id}"
        try:
            image, captions, questions, record_id = self.parsers[source_index].with_questions(raw)
            if not captions:
                raise ValueError("record has no captions")
            if self.caption_index < 0:
                k = int(rng.integers(len(captions)))  # One caption per visit.
            else:
                k = min(self.caption_index, len(captions) - 1)
            caption = text.clean_caption(captions[k], self.max_words)
            if questions:  # an instruction record: question k and its answer (instruction_task "vqa" / "vqg")
                if not isinstance(self.text_encoder, text.InstructText):
                    raise ValueError("an instruction record (questions) needs data.instruction_task = 'vqa' or 'vqg'")
                tokens = self.text_encoder(caption, rng, question=text.blip_question(questions[k], self.max_words))
            else:
                tokens = self.text_encoder(caption, rng)
            pixels = image_ops.train_transform(image, self.image_size, rng, **self.image_kwargs)
        except Exception as e:  # A bad record must not stop a long run: drop, count and log it.
            return {"_dropped": f"{record_id} ({type(e).__name__}: {e})"}
        return {"image": pixels, "image_id": np.int32(dense_id), **tokens}


@dataclasses.dataclass(frozen=True)
class _Tag:
    """Attaches (dense id = offset + record index, source index) to a raw record."""

    offset: int
    source_index: int
    length: int

    def __call__(self, index: int, raw):
        # Repeated MapDatasets pass indices past the length (epoch * length + i) to their parents.
        return self.offset + index % self.length, self.source_index, raw


class _DropFailedBatchIterator(grain.DatasetIterator):
    """Batches `batch_size` good elements, skipping and counting drop markers."""

    def __init__(self, parent, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __next__(self):
        good, dropped = [], []
        while len(good) < self._batch_size:
            x = next(self._parent)
            if "_dropped" in x:
                dropped.append(x["_dropped"])
            else:
                good.append(x)
        batch = {k: np.stack([g[k] for g in good]) for k in good[0]}
        batch["_num_dropped"] = np.int64(len(dropped))
        batch["_dropped_ids"] = "\n".join(dropped[:_MAX_LOGGED_IDS])
        return batch

    def get_state(self):
        # A batch is assembled within one __next__, so the parent's state is the whole state.
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _DropFailedBatch(grain.IterDataset):
    def __init__(self, parent, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self):
        return _DropFailedBatchIterator(self._parent.__iter__(), self._batch_size)


class TrainIterator:
    """Infinite iterator of per-process training batches with checkpointable state.

    `num_dropped` counts the records dropped so far by this process (decode/parse failures).

    State (`get_state()`, JSON): `grain` (grain's iterator state), `num_dropped`, `global_position`
    (how many elements of the global stream the global batches handed out so far cover, counted from
    the stream's start) and `layout` (what the grain state is relative to: the position the dataset was
    built from, the process count, the worker count, the global batch size). `set_state` with a state
    of the same layout restores grain's state exactly; with another layout (another process count, a
    checkpoint written by 2 processes resumed on 1) it restarts the stream at `global_position`, which
    is every process's own position in any layout (see `make_train_dataset`). That is exact unless
    records were dropped before the checkpoint: a process that dropped d records had read d elements
    past `global_position`, which the new layout reads again.
    """

    def __init__(self, build, *, process_count: int, num_workers: int, global_batch_size: int):
        self._build = build  # start (global position) -> grain iterator of this process's batches
        self._layout = {"process_count": process_count, "num_workers": num_workers,
                        "global_batch_size": global_batch_size}
        self._restart(0)
        self.num_dropped = 0

    def _restart(self, start: int) -> None:
        self._it, self._start, self._batches = self._build(start), start, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        if self._batches is not None:
            self._batches += 1
        n = int(batch.pop("_num_dropped"))
        ids = batch.pop("_dropped_ids")
        if n:
            self.num_dropped += n
            logging.warning("dropped %d undecodable record(s) (%d so far): %s", n,
                            self.num_dropped, str(ids).replace("\n", "; "))
        # Worker batches arrive as shared-memory ndarray subclasses; hand out plain ndarrays.
        return {k: np.asarray(v) for k, v in batch.items()}

    @property
    def global_position(self) -> int | None:
        """None after restoring a state saved before states had one (its run's batch count is unknown)."""
        if self._batches is None:
            return None
        return self._start + self._batches * self._layout["global_batch_size"]

    def get_state(self) -> dict:
        state = {"grain": self._it.get_state(), "num_dropped": self.num_dropped,
                 "layout": {"start": self._start, **self._layout}}
        if self.global_position is not None:
            state["global_position"] = self.global_position
        return state

    def set_state(self, state: Mapping) -> None:
        layout = dict(state.get("layout", {"start": 0, **self._layout}))  # before layouts: always ours
        start = int(layout.pop("start"))
        if layout == self._layout:
            self._restart(start)
            self._it.set_state(state["grain"])
            position = state.get("global_position")
            self._batches = None if position is None else (int(position) - start) // self._layout["global_batch_size"]
            self.num_dropped = int(state["num_dropped"])
        else:
            # Re-shard: another process or worker count. The drop count was another process's.
            if "global_position" not in state:
                raise ValueError(f"the data state was saved with {layout}, this iterator has {self._layout}, and "
                                 "the state has no global_position to re-shard from (it comes from a run resumed "
                                 "from a checkpoint of before global positions): resume with the saved layout")
            self._restart(int(state["global_position"]))
            self.num_dropped = 0
        if "global_position" in state and self.global_position != int(state["global_position"]):
            raise ValueError(f"data state {dict(state)}: global_position is not start + a whole number of "
                             "global batches")


class _ProcessBlocks(grain.MapDataset):
    """Process p's rows of every global batch, from global position `start` on: element i is row
    `i % B` of this process's block (B rows) of global batch `i // B`, i.e. element
    `start + (i // B) * G + p * B + i % B` of the global stream `parent` (G = global batch).

    Contiguous blocks, not every P-th element, so that the global batch (process p's rows are rows
    p*B ... of the global array, `sharding.make_global_batch`) is the same array for any process count.

    Worker slicing: grain's `mp_prefetch` hands worker w `ds.slice(w::W)` and interleaves the workers'
    batches round robin. Sliced that way, this dataset gives worker w whole blocks, those of global
    batches w, w+W, ..., not every W-th element: the interleaved batches are then the global batches in
    order, as without workers, and batch k is the same for any worker count.
    """

    def __init__(self, parent, *, start: int, global_batch: int, process_index: int, process_count: int,
                 first_batch: int = 0, batch_step: int = 1):
        super().__init__(parent)
        self._args = dict(start=start, global_batch=global_batch, process_index=process_index,
                          process_count=process_count)
        self._start, self._global_batch = start, global_batch
        self._block = global_batch // process_count
        self._offset = process_index * self._block
        self._first_batch, self._batch_step = first_batch, batch_step
        batches = (len(parent) - start) // global_batch
        self._length = max(0, -(-(batches - first_batch) // batch_step)) * self._block

    def __len__(self) -> int:
        return self._length

    def _global_index(self, i: int) -> int:
        batch, row = divmod(i, self._block)
        batch = self._first_batch + batch * self._batch_step
        return self._start + batch * self._global_batch + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def slice(self, sl: slice):
        start, stop, step = sl.start or 0, sl.stop, sl.step or 1
        if stop is not None or start < 0 or step < 1 or start >= step:
            return super().slice(sl)  # not a worker slice: plain element slicing
        return _ProcessBlocks(self._parent, **self._args, first_batch=self._first_batch + start * self._batch_step,
                              batch_step=self._batch_step * step)


def _process_slice(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return process_index, process_count


def _seed_for(seed: int, *path: int) -> int:
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def _image_kwargs(config) -> dict:
    return dict(min_scale=config.min_scale, max_scale=config.max_scale, hflip=config.hflip,
                randaugment=config.randaugment, randaug_num_ops=config.randaug_num_ops,
                randaug_magnitude=config.randaug_magnitude, draft=config.jpeg_draft,
                mean=tuple(config.image_mean), std=tuple(config.image_std))


def mixture_weights(config, sizes: list[tuple[str, int]]) -> list[float]:
    """Each train source's (unnormalised) mixing weight, in `sizes`' order ((name, records) pairs):
    `weight`, or with `source_weighting="sqrt_size"` sqrt(records) x `weight` (InstructBLIP's size-balanced
    sampling with its manual adjustment factor)."""
    how = config.get("source_weighting", "weights")
    if how not in config_sections.SOURCE_WEIGHTINGS:
        raise ValueError(f"data.source_weighting={how!r}: expected one of {config_sections.SOURCE_WEIGHTINGS}")
    weights = [float(config.train_sources[name].weight) for name, _ in sizes]
    if how == "sqrt_size":
        weights = [w * math.sqrt(n) for w, (_, n) in zip(weights, sizes)]
    return weights


def make_train_dataset(config, *, seed: int, process_index: int | None = None,
                       process_count: int | None = None, start: int = 0) -> grain.IterDataset:
    """The grain IterDataset behind `make_train_iterator` (batches still carry drop counters): this
    process's rows of the global batches from global position `start` (an element index of the global
    stream) on."""
    pi, pc = _process_slice(process_index, process_count)
    if start < 0:
        raise ValueError(f"start={start}: a global position is >= 0")
    if config.global_batch_size % pc:
        raise ValueError(f"global_batch_size={config.global_batch_size} is not divisible by "
                         f"process_count={pc}")
    opened = _parsers_and_sources(config.train_sources)
    datasets, offset = [], 0
    for k, (name, src, _) in enumerate(opened):
        if len(src) == 0:
            raise ValueError(f"train source {name!r} has no records")
        ds = grain.MapDataset.source(src).map_with_index(_Tag(offset, k, len(src)))
        offset += len(src)
        if config.shuffle:
            ds = ds.shuffle(seed=_seed_for(seed, 1, k))
        datasets.append(ds.repeat())
    weights = mixture_weights(config, [(name, len(src)) for name, src, _ in opened])
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    transform = _TrainTransform(tuple(p for _, _, p in opened), make_text_encoder(config),
                                _image_kwargs(config), config.image_size, config.max_words,
                                config.caption_index)
    # Random per element from (seed, global position): before the per-process slice on purpose.
    ds = ds.random_map(transform, seed=_seed_for(seed, 2))
    ds = _ProcessBlocks(ds, start=start, global_batch=config.global_batch_size, process_index=pi, process_count=pc)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.read_buffer_size))
    ds = _DropFailedBatch(ds, config.global_batch_size // pc)
    if config.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
    return ds


def make_train_iterator(config, *, seed: int, process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
    """Infinite per-process training batches (see the module docstring for the contract).

    With `config.num_workers > 0` outside `absl.app.run`, call `absl.flags.FLAGS.mark_as_parsed()`
    first (grain's worker processes read absl flags).
    """
    pi, pc = _process_slice(process_index, process_count)

    def build(start: int):
        return iter(make_train_dataset(config, seed=seed, process_index=pi, process_count=pc, start=start))

    return TrainIterator(build, process_count=pc, num_workers=int(config.num_workers),
                         global_batch_size=int(config.global_batch_size))


def train_factory(config, *, seed: int):
    """A zero-argument factory of `make_train_iterator(config, seed=seed)` (the loop's `make_data`)."""
    return lambda: make_train_iterator(config, seed=seed)


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class _EvalLoad:
    """Index (or -1 for padding) -> eval example with a `valid` flag."""

    source: Any
    parse: _Parse
    image_size: int
    draft: bool
    mean: tuple
    std: tuple

    def __call__(self, index: int):
        valid = index >= 0
        pixels = np.zeros((self.image_size, self.image_size, 3), np.float32)
        if valid:
            try:
                image, _, _ = self.parse(self.source[index])
                pixels = image_ops.eval_transform(image, self.image_size, draft=self.draft,
                                                  mean=self.mean, std=self.std)
            except Exception as e:
                logging.warning("eval record %d could not be decoded: %s", index, e)
                valid = False
        return {"image": pixels, "image_id": np.int32(max(index, 0)), "valid": np.bool_(valid)}


def make_eval_dataset(config, source, *, batch_size: int, process_index: int | None = None,
                      process_count: int | None = None) -> grain.IterDataset:
    """Deterministic eval batches of one source, in record order, padded to whole batches.

    Process p gets records p, p + P, p + 2P, ...; every process yields the same number of batches
    (padding rows have valid=False, image_id=0). Batch: "image" [B,H,W,3] float32 (eval transform),
    "image_id" int32 [B] (the record index, = the dense id in `read_captions`), "valid" bool [B].
    Iterate it once per evaluation (it restarts from the beginning each time).
    """
    pi, pc = _process_slice(process_index, process_count)
    src = _open_source(source)
    n = len(src)
    per_process = math.ceil(math.ceil(n / pc) / batch_size) * batch_size
    mine = list(range(pi, n, pc))
    indices = mine + [-1] * (per_process - len(mine))
    load = _EvalLoad(src, _Parse("eval", source.image_key, source.captions_key),
                     config.image_size, config.jpeg_draft, tuple(config.image_mean),
                     tuple(config.image_std))
    ds = grain.MapDataset.source(indices).map(load).batch(batch_size)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                prefetch_buffer_size=config.read_buffer_size))


def read_captions(source) -> list[list[str]]:
    """All captions of an (eval) source, indexed by record index (the eval `image_id`)."""
    src = _open_source(source)
    parse = _Parse("eval", source.image_key, source.captions_key)
    out = []
    for i in range(len(src)):
        raw = src[i]
        if isinstance(raw, (bytes, bytearray)):
            out.append(list(records.decode_header(raw)["captions"]))
        else:
            out.append(parse(raw)[1])
    return out


def read_questions(source) -> list[list[str]]:
    """The questions of every record of a source (instruction records; [] for a caption record), indexed
    by record index as `read_captions`."""
    src = _open_source(source)
    out = []
    for i in range(len(src)):
        raw = src[i]
        out.append(list(records.decode_header(raw).get("questions", ())) if isinstance(raw, (bytes, bytearray))
                   else [])
    return out
