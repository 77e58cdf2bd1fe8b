"""Zero-shot image classification with a stage-1 (retrieval) model, CLIP's way on BLIP-2's heads.

Each class name is put into several prompt templates ("a photo of a {}."); the Q-Former's unimodal
text features of the prompts are averaged per class and re-normalised (CLIP's prompt ensembling).
An image's score for a class is the ITC similarity: the max over its query features of the cosine
with the class feature (no temperature, as `model.apply(..., method="itc")`). With `itm_top_k > 0`,
each image's `itm_top_k` best classes are re-ranked LAVIS's retrieval way: score = ITM
positive-class logit (averaged over the templates) + ITC similarity; the other classes get -100.

- `class_features`, `classify`: the scores `[N_images, N_classes]`;
- `accuracy` (top-1 / top-5), `confusion_matrix`, `confusion_png` (a picture where people would
  rather look than read);
- `read_labelled_images`: an image folder (`root/<class name>/*.png|jpg`) or a JSONL file
  (`{"image": path, "label": class name}` per line);
- `evaluator(config, model, tokenizer)`: what stage-1 training runs on `config.eval.zero_shot`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from blip2_jax.data import image_ops
from blip2_jax.evaluate import retrieval_eval

log = logging.getLogger(__name__)
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def class_features(scorer, params, tokenizer, classnames: Sequence[str], templates: Sequence[str], *,
                   max_len: int, batch_size: int):
    """`(features [C, E], ids [C, T, L], mask [C, T, L])`: the template-averaged, re-normalised ITC text
    features of every class, and the tokenised prompts (for ITM)."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    texts = [t.format(c) for c in classnames for t in templates]
    ids, mask = retrieval_eval.encode_texts(tokenizer, texts, max_len)
    feats = scorer.text_features(params, ids, mask, batch_size).reshape(len(classnames), len(templates), -1)
    mean = feats.mean(axis=1)
    mean = mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
    shape = (len(classnames), len(templates), ids.shape[1])
    return mean, ids.reshape(shape), mask.reshape(shape)


def classify(scorer, params, tokenizer, batches, classnames: Sequence[str], templates: Sequence[str] = TEMPLATES,
             *, itm_top_k: int = 0, max_len: int = 35, batch_size: int = 32):
    """`(scores [N, C], image ids [N])` for the valid images of eval `batches` (see the module docstring)."""
    image_feats, image_embeds, image_ids = scorer.image_features(params, batches)
    cls_feats, ids, mask = class_features(scorer, params, tokenizer, classnames, templates, max_len=max_len,
                                          batch_size=batch_size)
    sims = np.einsum("iqe,ce->icq", image_feats, cls_feats).max(-1)
    if itm_top_k <= 0:
        return sims, image_ids
    k = min(itm_top_k, len(classnames))
    scores = np.full_like(sims, -100.0)
    for i in range(len(sims)):
        top = np.argsort(-sims[i], kind="stable")[:k]
        itm = _itm_scores(scorer, params, image_embeds[i], ids[top], mask[top], batch_size)
        scores[i, top] = itm + sims[i, top]
    return scores, image_ids


def _itm_scores(scorer, params, image_embed, ids, mask, batch_size: int) -> np.ndarray:
    """ITM positive-class logits of one image with `ids [K, T, L]` (K classes x T templates), averaged over T."""
    k, t, length = ids.shape
    flat_ids, flat_mask = ids.reshape(k * t, length), mask.reshape(k * t, length)
    out = []
    for s in range(0, k * t, batch_size):  # fixed-size calls: one compilation
        n = min(batch_size, k * t - s)
        rows = np.pad(np.arange(s, s + n), (0, batch_size - n))
        embeds = np.repeat(image_embed[None], batch_size, axis=0)
        out.append(np.asarray(scorer.itm_fn(params, embeds, flat_ids[rows], flat_mask[rows]))[:n])
    return np.concatenate(out).reshape(k, t).mean(axis=1)


def accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict:
    """`{"top1": ..., "top5": ...}`: the fraction of images whose label is among their k best classes."""
    order = np.argsort(-scores, axis=1, kind="stable")
    labels = np.asarray(labels)
    return {f"top{k}": float(np.mean([labels[i] in order[i, :k] for i in range(len(labels))])) for k in ks}


def confusion_matrix(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """`[true class, predicted class]` counts of the top-1 predictions."""
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (np.asarray(labels), scores.argmax(axis=1)), 1)
    return out


def confusion_png(matrix: np.ndarray, classnames: Sequence[str], path: str, cell: int = 28) -> str:
    """Draw the confusion matrix (rows: true class, columns: predicted; darker = more) as a PNG."""
    n = len(classnames)
    margin = 8 + 7 * max(len(c) for c in classnames)
    im = Image.new("RGB", (margin + n * cell + 8, margin + n * cell + 8), "white")
    draw = ImageDraw.Draw(im)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for r in range(n):
        draw.text((4, margin + r * cell + cell // 3), classnames[r], fill="black")
        draw.text((margin + r * cell + 2, 4), classnames[r][:cell // 7], fill="black")
        for c in range(n):
            shade = int(255 * (1 - rows[r, c]))
            box = (margin + c * cell, margin + r * cell, margin + (c + 1) * cell - 1, margin + (r + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            draw.text((box[0] + 4, box[1] + cell // 3), str(int(matrix[r, c])), fill="black" if shade > 128 else "white")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)
    return path


def read_labelled_images(path: str, classnames: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """`(image paths, their class names)` from an image folder (`path/<class>/*`) or a JSONL file of
    `{"image": ..., "label": ...}` (relative image paths resolve against the file's directory)."""
    if os.path.isdir(path):
        classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        images = [(os.path.join(path, c, f), c) for c in classes for f in sorted(os.listdir(os.path.join(path, c)))
                  if f.lower().endswith(IMAGE_SUFFIXES)]
    elif os.path.isfile(path):
        images = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    images.append((os.path.join(os.path.dirname(os.path.abspath(path)), rec["image"]),
                                   str(rec["label"])))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with 'image' and 'label' ({e})") from None
    else:
        raise FileNotFoundError(f"{path}: neither an image folder (<class>/<images>) nor a JSONL file")
    if not images:
        raise ValueError(f"{path}: no labelled images found")
    unknown = sorted({label for _, label in images} - set(classnames)) if classnames else []
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not among the classes {list(classnames)}")
    return [p for p, _ in images], [label for _, label in images]


def image_batches(paths: Sequence[str], image_size: int, batch_size: int, *, mean=image_ops.CLIP_MEAN,
                  std=image_ops.CLIP_STD):
    """Eval batches (`image`, `valid`, `image_id` = index into `paths`) of the readable images, normalised
    by the model's `mean` / `std`; an unreadable one is skipped (`valid` False) and logged, the others
    are still classified."""
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        images, valid = [], []
        for p in chunk + [chunk[0]] * (batch_size - len(chunk)):  # fixed shape: one compilation
            try:
                with open(p, "rb") as f:
                    images.append(image_ops.eval_transform(f.read(), image_size, draft=False, mean=mean, std=std))
                valid.append(True)
            except (OSError, ValueError, SyntaxError) as e:
                log.warning("skipping unreadable image %s (%s)", p, e)
                images.append(np.zeros((image_size, image_size, 3), np.float32))
                valid.append(False)
        valid[len(chunk):] = [False] * (batch_size - len(chunk))
        yield {"image": np.stack(images), "valid": np.asarray(valid),
               "image_id": np.arange(start, start + batch_size)}


def evaluate_folder(scorer, params, tokenizer, path: str, classnames: Sequence[str] = (), *,
                    templates: Sequence[str] = TEMPLATES, image_size: int, itm_top_k: int = 0,
                    max_len: int = 35, batch_size: int = 32, mean=image_ops.CLIP_MEAN,
                    std=image_ops.CLIP_STD) -> dict:
    """Top-1/top-5 accuracy, the confusion matrix and counts on a labelled image folder or JSONL file
    (pixels normalised by `mean` / `std`, the model's). `classnames` default: the labels found, sorted."""
    paths, labels = read_labelled_images(path, classnames)
    classnames = list(classnames) or sorted(set(labels))
    batches = image_batches(paths, image_size, batch_size, mean=tuple(mean), std=tuple(std))
    scores, ids = classify(scorer, params, tokenizer, batches, classnames,
                           templates, itm_top_k=itm_top_k, max_len=max_len, batch_size=batch_size)
    if not len(ids):
        raise ValueError(f"{path}: no image could be read")
    y = np.asarray([classnames.index(labels[int(i)]) for i in ids])
    return {"metrics": accuracy(scores, y), "confusion": confusion_matrix(scores, y, len(classnames)),
            "classnames": classnames, "num_images": int(len(ids)), "num_skipped": len(paths) - int(len(ids)),
            "chance_top1": 1.0 / len(classnames)}


def evaluator(config, model, tokenizer):
    """`(params, step) -> {"zero_shot_top1", "zero_shot_top5"}` on `config.eval.zero_shot.path` during
    stage-1 training (classes: `zero_shot.classes`, or the folder's / file's labels)."""
    zs = config.eval.zero_shot
    scorer = retrieval_eval.RetrievalScorer(model)
    classes = [c.strip() for c in zs.classes.split(",") if c.strip()]
    templates = tuple(zs.templates) or TEMPLATES

    def evaluate(params, step: int) -> dict:
        out = evaluate_folder(scorer, params, tokenizer, zs.path, classes, templates=templates,
                              image_size=config.data.image_size, itm_top_k=int(zs.itm_top_k),
                              max_len=int(config.data.max_text_len), batch_size=int(config.eval.batch_size),
                              mean=config.data.image_mean, std=config.data.image_std)
        return {f"zero_shot_{k}": v for k, v in out["metrics"].items()}

    return evaluate
