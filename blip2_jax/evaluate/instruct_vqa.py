"""Held-out VQA accuracy of an instruction-tuned model on instruction records, against the majority answer.

What instruction tuning with `data.instruction_task = "vqa"` evaluates after training (and every
`train.eval_every` steps): every question of every record of `config.eval.source` (instruction records:
`records.ImageText.questions`, caption i answering question i) is asked of its image with
`EVAL_TEMPLATE`, answered by `generate` (greedy, or `eval.num_beams`), and scored by `vqa_scores`:
- `vqa_acc`: exact match after the official VQA answer normalisation (`vqa.normalize_answer`: case,
  punctuation, articles, number words) of the generated answer (cut at EOS) and the record's answer;
- `majority_baseline`: what answering every question with the most frequent answer of its question type
  scores on the same questions (the held-out split's own majority answers: the best any blind
  constant answer per type can do there);
- both per question type (`vqa_acc_<type>`, `majority_baseline_<type>`; the type is
  `shapes_vqa.question_type`, the question's first two words, spaces as "_"), and `num_questions`.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np

from blip2_jax import processor as processor_lib
from blip2_jax import sharding
from blip2_jax.data import instructions
from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import text as data_text
from blip2_jax.data.shapes_vqa import question_type
from blip2_jax.evaluate import caption_eval, vqa

log = logging.getLogger(__name__)
# The short-answer template of InstructBLIP's VQA templates (one of those training draws from).
EVAL_TEMPLATE = "Question: {question} Short answer:"
assert EVAL_TEMPLATE in instructions.TEMPLATES["vqa"]


def answer_split(model, params, processor, batches: Iterable[Mapping[str, np.ndarray]],
                 questions: Sequence[Sequence[str]], *, mesh=None, pad_multiple: int = 8,
                 **generate_kwargs) -> dict[tuple[int, int], str]:
    """`{(record index, question index): generated answer}` for every question of every valid row of
    eval `batches` (the pipeline's `make_eval_dataset`). Question k of each row in a batch is asked in
    one `generate` call; a row with fewer questions repeats its first (not recorded). With several
    processes each passes its own `batches` and the `mesh`; all get every answer."""
    out: dict[tuple[int, int], str] = {}
    for b in batches:
        pixels = sharding.eval_inputs(np.asarray(b["image"]), mesh)
        ids = [int(i) for i in sharding.eval_rows(b["image_id"], mesh)]
        valid = sharding.eval_rows(b["valid"], mesh)
        for k in range(max(len(questions[i]) for i in ids)):
            asked = [questions[i][k] if k < len(questions[i]) else questions[i][0] for i in ids]
            prompts = [EVAL_TEMPLATE.format(question=data_text.blip_question(q)) for q in asked]
            texts = caption_eval.generate_texts(model, params, processor, pixels, prompts,
                                                pad_multiple=pad_multiple, **generate_kwargs)
            for i, ok, t in zip(ids, valid, texts):
                if ok and k < len(questions[i]):
                    out[(i, k)] = t.strip()
        log.info("answered %d questions", len(out))
    return out


def vqa_scores(questions: Sequence[Sequence[str]], answers: Sequence[Sequence[str]],
               predictions: Mapping[tuple[int, int], str]) -> dict[str, float]:
    """Accuracy of `predictions[(i, k)]` against `answers[i][k]` and the majority-answer baseline, overall
    and per question type of `questions[i][k]` (see the module docstring)."""
    if not predictions:
        raise ValueError("vqa_scores: no predictions")
    by_type: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for (i, k), pred in predictions.items():
        by_type[question_type(questions[i][k])].append((vqa.normalize_answer(pred), vqa.normalize_answer(answers[i][k])))
    out, correct, majority = {}, 0, 0
    for kind in sorted(by_type):
        rows = by_type[kind]
        right = sum(p == a for p, a in rows)
        top = collections.Counter(a for _, a in rows).most_common(1)[0][1]
        name = kind.replace(" ", "_")
        out[f"vqa_acc_{name}"], out[f"majority_baseline_{name}"] = right / len(rows), top / len(rows)
        correct, majority = correct + right, majority + top
    n = len(predictions)
    return {"vqa_acc": correct / n, "majority_baseline": majority / n, "num_questions": float(n), **out}


def evaluator(config, model, tokenizer, mesh=None):
    """`(params, step) -> metrics`: `vqa_scores` of the answers to every question of `config.eval.source`."""
    ev, data_cfg = config.eval, config.data
    qformer_tokenizer = data_text.load_bert_tokenizer(data_cfg.qformer_tokenizer_path)
    processor = processor_lib.for_model(model, tokenizer, data_cfg.image_size, qformer_tokenizer)
    questions = data_pipeline.read_questions(ev.source)
    answers = data_pipeline.read_captions(ev.source)
    if not any(questions):
        raise ValueError(f"config.eval.source {ev.source.path!r} holds no instruction records (questions): VQA "
                         "evaluation needs them (python -m blip2_jax.data.shapes_vqa, data.build table --question_key)")

    def evaluate(params, step: int) -> dict:
        ds = data_pipeline.make_eval_dataset(data_cfg, ev.source, batch_size=ev.batch_size,
                                             process_index=jax.process_index(), process_count=jax.process_count())
        predictions = answer_split(model, params, processor, ds, questions, mesh=mesh,
                                   max_new_tokens=ev.max_new_tokens, num_beams=ev.num_beams)
        for i, k in sorted(predictions)[:ev.log_examples]:
            log.info("step %d, image %d: %r -> %r (answer %r)", step, i, questions[i][k], predictions[(i, k)],
                     answers[i][k])
        return vqa_scores(questions, answers, predictions)

    return evaluate
