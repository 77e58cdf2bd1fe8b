"""VQA questions for evaluation: the JSONL format and OK-VQA lemmatisation.

LAVIS's question preprocessing is `blip2_jax.data.text.blip_question`.

One JSON object per line:

    {"image": "val2014/COCO_val2014_000000000042.jpg", "question_id": 42000, "question": "What is it?",
     "answers": ["pizza", "pizza", ...]}

`image` is relative to the JSONL file's directory (or absolute); `question_id` is any JSON scalar,
unique; `answers` holds the human answers (10 for VQAv2 / OK-VQA, one for GQA). Blank lines are
skipped.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Question:
    image: str          # absolute path
    question_id: object
    question: str       # raw, as in the file
    answers: tuple


def read_questions(path: str) -> list[Question]:
    """The questions of a JSONL file; errors name the file, the line and the field. Every image must
    exist (a missing one is an error naming it; an unreadable one is skipped later, at decode)."""
    if not path:
        raise ValueError("config.vqa.questions is empty: pass --config.vqa.questions=FILE.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQA questions file {path!r} does not exist")
    root = os.path.dirname(os.path.abspath(path))
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
            for key, kind in (("image", str), ("question", str), ("answers", list)):
                if not isinstance(row.get(key), kind):
                    raise ValueError(f"{path}:{n}: field {key!r} must be a {kind.__name__}, got {row.get(key)!r}")
            if "question_id" not in row:
                raise ValueError(f"{path}:{n}: field 'question_id' is missing")
            qid = row["question_id"]
            if qid in seen:
                raise ValueError(f"{path}:{n}: duplicate question_id {qid!r}")
            seen.add(qid)
            out.append(Question(os.path.join(root, row["image"]), qid, row["question"],
                                tuple(str(a) for a in row["answers"])))
    if not out:
        raise ValueError(f"{path}: no questions")
    missing = sorted({q.image for q in out if not os.path.isfile(q.image)})
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} image(s) do not exist, e.g. {missing[:3]}")
    return out


def lemmatize(answers: Sequence[str]) -> list[str]:
    """LAVIS `_lemmatize` (OK-VQA): spaCy `en_core_web_sm`, NOUN and VERB tokens -> their lemma."""
    try:
        import spacy
        nlp = spacy.load("en_core_web_sm")
    except (ImportError, OSError) as e:
        raise RuntimeError("vqa.apply_lemmatizer needs spaCy with en_core_web_sm (pip install spacy; "
                           "python -m spacy download en_core_web_sm), or set "
                           f"--config.vqa.apply_lemmatizer=False ({type(e).__name__}: {e})") from None
    out = []
    for answer in answers:
        doc = nlp(answer)
        out.append(" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in doc))
    return out
