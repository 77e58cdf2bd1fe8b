"""Evaluate a BLIP-2 model as the paper reports it: captioning, image-text retrieval, zero-shot VQA.

    python -m blip2_jax.evaluate.run --config=configs/eval.py:VARIANT --config.model=PATH \\
        [--train_config=configs/stage2.py:demo_opt] [--out=results.json] [--config.x=y ...]

Prints progress on stderr and, as the last stdout line, one JSON object: `task`, `variant`, `model`,
`metrics`, counts (`num_images` / `num_questions`, `num_skipped`) and `results` (the file written).
Results files: captioning `[{"image_id", "caption"}]` (COCO results format; `image_id` is the record's
source id, an int when it is numeric), VQA `[{"question_id", "answer"}]`, retrieval the metrics.

Settings (configs/eval.py): LAVIS's eval configs; docs/evaluation.md has the table and formats.
Single-process: every record is evaluated by this process (multi-host evaluation is not supported).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Iterable, Mapping, Optional, Sequence

import grain
import numpy as np
from PIL import Image

from blip2_jax import compilation_cache, config_sections, flag_errors
from blip2_jax import processor as processor_lib
from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import records
from blip2_jax.data import text as data_text
from blip2_jax.evaluate import caption_eval, captioning, retrieval_eval, vqa, vqa_data
from blip2_jax.evaluate import load as load_lib

log = logging.getLogger(__name__)
TASKS = ("caption", "retrieval", "vqa")


# -- shared --------------------------------------------------------------------------------------
def data_config(config):
    """The pipeline fields `make_eval_dataset` reads, from the eval config."""
    d = config_sections.data_config()
    d.image_size = int(config.image_size)
    d.jpeg_draft = bool(config.jpeg_draft)
    d.read_threads = 4
    d.read_buffer_size = 2 * int(config.batch_size)
    return d


def limited_batches(ds: Iterable[Mapping[str, np.ndarray]], limit: int):
    """Eval batches with rows of record index >= `limit` marked invalid (limit <= 0: all); stops early."""
    for b in ds:
        if limit > 0:
            ids = np.asarray(b["image_id"])
            b = dict(b, valid=np.asarray(b["valid"]) & (ids < limit))
            yield b
            if (ids >= limit - 1).any():  # records come in index order: the last wanted one is done
                return
        else:
            yield b


def eval_split(config):
    """`(captions of every record, n, batches)` of `config.data.source`: the first `n` records
    (`max_examples`, 0 = all) as eval batches."""
    captions = data_pipeline.read_captions(config.data.source)
    n = len(captions) if config.max_examples <= 0 else min(len(captions), int(config.max_examples))
    ds = data_pipeline.make_eval_dataset(data_config(config), config.data.source,
                                         batch_size=int(config.batch_size), process_index=0, process_count=1)
    return captions, n, limited_batches(ds, n)


def record_ids(source, n: int) -> list:
    """The source ids of the first `n` records (COCO image ids); the record index for TFDS sources."""
    if source.tfds_name:
        return list(range(n))
    src = grain.sources.ArrayRecordDataSource(records.find_shards(source.path, source.prefix or None))
    out = []
    for i in range(min(n, len(src))):
        raw = records.decode_header(src[i])["image_id"]
        out.append(int(raw) if str(raw).isdigit() else raw)
    return out


def generation_kwargs(config, llm: str) -> dict:
    """`generate` settings of `config.generation` for this LLM (prompt padding included); a decoder-only
    LLM without its own `length_penalty` entry (LLaMA, Qwen2, ...) takes OPT's."""
    g = config.generation
    length_penalty = g.length_penalty[llm if llm in g.length_penalty or llm == "t5" else "opt"]
    return dict(num_beams=int(g.num_beams), max_new_tokens=int(g.max_new_tokens),
                min_new_tokens=int(g.min_new_tokens), repetition_penalty=float(g.repetition_penalty),
                length_penalty=float(length_penalty), pad_multiple=int(g.prompt_pad_multiple))


def generate_texts(loaded, processor, pixels: np.ndarray, prompts: Optional[Sequence[str]], config) -> list[str]:
    """Decoded generations for a batch of images and (optional) prompts, with `config.generation`."""
    return caption_eval.generate_texts(loaded.model, loaded.params, processor, pixels, prompts,
                                       **generation_kwargs(config, loaded.llm))


def make_processor(loaded: load_lib.Loaded, image_size: int):
    return processor_lib.for_model(loaded.model, loaded.tokenizer, image_size)


def _need_generative(loaded, config):
    if not loaded.llm:
        raise ValueError(f"config.task={config.task!r} needs a Blip2ForConditionalGeneration (OPT / FlanT5) "
                         f"model; {config.model} is a stage-1 (retrieval) model")


# -- captioning ----------------------------------------------------------------------------------
def evaluate_captions(config, loaded) -> tuple[dict, list]:
    """Captions of every image of `config.data.source` and their BLEU/CIDEr against its captions."""
    _need_generative(loaded, config)
    source = config.data.source
    references, n, batches = eval_split(config)
    generated = caption_eval.caption_split(
        loaded.model, loaded.params, make_processor(loaded, config.image_size), batches,
        prompt=config.generation.prompt, max_words=config.data.max_words, **generation_kwargs(config, loaded.llm))
    if not generated:
        raise ValueError(f"no image of {source.path or source.tfds_name} could be decoded")
    keys = sorted(generated)
    metrics = captioning.caption_metrics({k: references[k] for k in keys}, {k: generated[k] for k in keys})
    ids = record_ids(source, n)
    results = [{"image_id": ids[k], "caption": generated[k]} for k in keys]
    return {"metrics": metrics, "num_images": len(keys), "num_skipped": n - len(keys)}, results


# -- VQA -----------------------------------------------------------------------------------------
def _read_image(path: str):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # an unreadable image is skipped and counted, not fatal
        log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
        return None


def answer_questions(config, loaded, questions) -> tuple[dict, list]:
    """`({qid: answer}, skipped question ids)`: answers generated with the formatted prompt."""
    processor = make_processor(loaded, config.image_size)
    batch_size = int(config.batch_size)
    answers, skipped, pending = {}, [], []
    cache: dict[str, object] = {}

    def flush():
        pad = batch_size - len(pending)  # fixed batch shape: one compilation
        rows = pending + [pending[0]] * pad
        pixels = processor.preprocess([cache[q.image] for q in rows])
        prompts = [config.generation.prompt.format(data_text.blip_question(q.question)) for q in rows]
        texts = generate_texts(loaded, processor, pixels, prompts, config)
        for q, t in zip(pending, texts):
            answers[q.question_id] = t
        pending.clear()
        cache.clear()
        log.info("answered %d / %d questions", len(answers), len(questions))

    for q in questions:
        if q.image not in cache:
            cache[q.image] = _read_image(q.image)
        if cache[q.image] is None:
            skipped.append(q.question_id)
            continue
        pending.append(q)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return answers, skipped


def evaluate_vqa(config, loaded) -> tuple[dict, list]:
    """Zero-shot VQA accuracy (VQAv2 metric or exact match) on `config.vqa.questions`."""
    _need_generative(loaded, config)
    if config.vqa.metric not in ("vqa", "exact"):
        raise ValueError(f"config.vqa.metric={config.vqa.metric!r}: expected 'vqa' or 'exact'")
    questions = vqa_data.read_questions(config.vqa.questions)
    if config.max_examples > 0:
        questions = questions[:int(config.max_examples)]
    answers, skipped = answer_questions(config, loaded, questions)
    kept = [q for q in questions if q.question_id in answers]
    if not kept:
        raise ValueError(f"{config.vqa.questions}: no question has a readable image")
    preds = [answers[q.question_id] for q in kept]
    if config.vqa.apply_lemmatizer:
        preds = vqa_data.lemmatize(preds)
    if config.vqa.metric == "vqa":
        acc = vqa.vqa_accuracy_corpus(preds, [q.answers for q in kept])
    else:  # GQA (LAVIS GQATask): normalised prediction == the answer
        acc = float(np.mean([vqa.normalize_answer(p) in q.answers for p, q in zip(preds, kept)]))
    results = [{"question_id": q.question_id, "answer": p} for q, p in zip(kept, preds)]
    return ({"metrics": {"accuracy": acc}, "num_questions": len(kept), "num_skipped": len(skipped)},
            results)


# -- retrieval -----------------------------------------------------------------------------------
def evaluate_retrieval(config, loaded) -> tuple[dict, dict]:
    """R@1/5/10 both ways: ITC, then ITM re-ranking of the top `retrieval.k_test` (LAVIS)."""
    if loaded.llm:
        raise ValueError(f"config.task='retrieval' needs a stage-1 model (HF Blip2ForImageTextRetrieval or a "
                         f"stage-1 workdir); {config.model} is a {loaded.llm.upper()} generation model")
    source = config.data.source
    captions, n, batches = eval_split(config)
    summary = retrieval_eval.split_recall(
        retrieval_eval.RetrievalScorer(loaded.model), loaded.params, loaded.tokenizer, batches,
        captions[:n], max_words=config.data.max_words, max_text_len=int(config.data.max_text_len),
        k_test=int(config.retrieval.k_test), batch_size=int(config.batch_size),
        name=f"{source.path or source.tfds_name}")
    return summary, dict(summary)


# -- entry points --------------------------------------------------------------------------------
def evaluate(config, *, train_config=None, out: Optional[str] = None) -> dict:
    """Runs the evaluation `config.task` names; writes the results to `out` (if given); returns the summary."""
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r}: expected one of {TASKS}")
    if train_config is None and config.get("train_config"):
        train_config = load_lib.load_config_file(config.train_config)
    loaded = load_lib.load_model(config.model, train_config=train_config, tokenizer=config.tokenizer,
                                 frozen_dtype=config.frozen_dtype)
    fn = {"caption": evaluate_captions, "vqa": evaluate_vqa, "retrieval": evaluate_retrieval}[config.task]
    summary, results = fn(config, loaded)
    summary = {"task": config.task, "variant": config.get("name", ""), "model": config.model, **summary}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False)
        summary["results"] = out
    return summary


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "configs/eval.py:VARIANT; override fields with --config.x=y", lock_config=True)
    train_flag = config_flags.DEFINE_config_file(
        "train_config", None, "for a workdir model: the config that trained it (configs/stage2.py:demo_opt)")
    out_flag = flags.DEFINE_string("out", None, "results file (default: eval_<variant>.json)")
    cache_flag = flags.DEFINE_string("compilation_cache", None, "persistent XLA cache directory (default: "
                                     f"$BLIP2_JAX_COMPILATION_CACHE or {compilation_cache.DEFAULT_DIRECTORY}); "
                                     "empty = off")

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        config = config_flag.value
        if config is None:
            raise app.UsageError("--config=configs/eval.py:VARIANT is required")
        out = out_flag.value or f"eval_{config.get('name', config.task)}.json"
        compilation_cache.enable(cache_flag.value)
        try:
            summary = evaluate(config, train_config=train_flag.value, out=out)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.stderr.flush()
        print(json.dumps(summary), flush=True)

    # A bad flag or --config.x=y override: one `error: ...` line and exit status 2, no traceback.
    app.run(_main, argv=argv, flags_parser=lambda a: flag_errors.parse_flags(a, example="configs/eval.py:demo_caption"))


if __name__ == "__main__":
    main()
