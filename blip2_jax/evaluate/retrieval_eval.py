"""Retrieval scores of a stage-1 model (`Blip2Stage1`) over an eval split, as LAVIS `compute_sim_matrix`.

ITC similarities of every image with every text (max over queries of the cosine, no temperature),
then, with `k_test > 0`, LAVIS's ITM re-ranking of each row's top k_test candidates
(`blip2_jax.evaluate.retrieval.rerank_with_itm`). `split_recall` is the one evaluation of a held-out
split: the evaluation CLI (`blip2_jax.evaluate.run`) and stage-1 training (`evaluator`) both call it.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax import sharding
from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import text as data_text
from blip2_jax.evaluate import retrieval

log = logging.getLogger(__name__)


def caption_texts(captions: Sequence[Sequence[str]], max_words: int):
    """Cleaned texts of every image's captions, with LAVIS's `txt2img` and `img2txt` index maps."""
    texts, txt2img, img2txt = [], [], []
    for img, caps in enumerate(captions):
        img2txt.append(list(range(len(texts), len(texts) + len(caps))))
        for c in caps:
            texts.append(data_text.clean_caption(c, max_words))
            txt2img.append(img)
    return texts, np.asarray(txt2img, np.int64), img2txt


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] text [SEP]` padded to `max_len` (LAVIS: padding="max_length", max_length=35)."""
    enc = data_text.Stage1Text(tokenizer, max_len)
    rows = [enc(t) for t in texts]
    return (np.stack([r["input_ids"] for r in rows]), np.stack([r["attention_mask"] for r in rows]))


class RetrievalScorer:
    """Jitted feature, similarity and ITM functions of one stage-1 model."""

    def __init__(self, model):
        self.model = model

        def image_fn(params, pixels):
            def f(m):
                embeds = m.image_embeds(m.vit_features(pixels))
                return m.image_features(embeds)[0], embeds
            return model.apply({"params": params}, method=f)

        self.image_fn = jax.jit(image_fn)
        self.text_fn = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, method="text_features"))
        self.itm_fn = jax.jit(lambda p, e, ids, mask: model.apply({"params": p}, e, ids, mask,
                                                                  method="itm_logits")[:, 1])

    def image_features(self, params, batches: Iterable[Mapping[str, np.ndarray]], mesh=None):
        """`(ITC features [N, Q, E], image embeds [N, P, D], image ids [N])` of the valid rows, by image id.

        With several processes each passes its own `batches` (as many on every process) and `mesh`;
        every process gets the features of all processes' images."""
        feats, embeds, ids = [], [], []
        for b in batches:
            images = b["image"] if jax.process_count() > 1 else jnp.asarray(b["image"])
            f, e = self.image_fn(params, sharding.eval_inputs(images, mesh))
            valid = sharding.eval_rows(b["valid"], mesh).astype(bool)
            feats.append(sharding.host_value(f)[valid])
            embeds.append(sharding.host_value(e)[valid])
            ids.append(sharding.eval_rows(b["image_id"], mesh)[valid])
        ids = np.concatenate(ids)
        order = np.argsort(ids, kind="stable")  # processes read interleaved records: back to record order
        return np.concatenate(feats)[order], np.concatenate(embeds)[order], ids[order]

    def text_features(self, params, ids: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
        return np.concatenate([sharding.host_value(self.text_fn(params, ids[i:i + batch_size], mask[i:i + batch_size]))
                               for i in range(0, len(ids), batch_size)])

    def scores(self, params, image_feats, image_embeds, ids, mask, *, k_test: int, batch_size: int):
        """`(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img])`: ITC, ITM-re-ranked when k_test > 0."""
        text_feats = self.text_features(params, ids, mask, batch_size)
        sims = np.einsum("iqe,te->itq", image_feats, text_feats).max(-1)
        if k_test <= 0:
            return sims, sims.T

        def itm_score(img_idx, txt_idx):
            out = []
            for s in range(0, len(img_idx), batch_size):  # fixed-size calls: one compilation
                i, t = img_idx[s:s + batch_size], txt_idx[s:s + batch_size]
                n = len(i)
                pad = batch_size - n
                i, t = np.pad(i, (0, pad)), np.pad(t, (0, pad))
                out.append(sharding.host_value(self.itm_fn(params, image_embeds[i], ids[t], mask[t]))[:n])
            return np.concatenate(out)

        k = max(1, min(k_test, max(sims.shape)))  # candidates per row (clipped per direction inside)
        return retrieval.rerank_with_itm(sims, itm_score, k_test, rows_per_call=max(1, batch_size // k))


def select(captions: Sequence[Sequence[str]], image_ids: np.ndarray) -> list[list[str]]:
    """The captions of the images kept (`image_ids`: record indices), in that order."""
    return [list(captions[int(i)]) for i in image_ids]


def split_recall(scorer: RetrievalScorer, params, tokenizer, batches, captions: Sequence[Sequence[str]], *,
                 max_words: int, max_text_len: int, k_test: int, batch_size: int, name: str, mesh=None) -> dict:
    """Recall@1/5/10 both ways over one split (`batches` of images, `captions[i]` those of record i).

    An undecodable image is dropped together with its captions (recall is over the decodable
    images; the count of dropped ones is `num_skipped`). Returns the metrics and `num_images`,
    `num_texts`, `num_skipped`.
    """
    image_feats, image_embeds, image_ids = scorer.image_features(params, batches, mesh)
    if not len(image_ids):
        raise ValueError(f"{name}: no image could be decoded")
    texts, txt2img, img2txt = caption_texts(select(captions, image_ids), max_words)
    ids, mask = encode_texts(tokenizer, texts, max_text_len)
    score_i2t, score_t2i = scorer.scores(params, image_feats, image_embeds, ids, mask, k_test=k_test,
                                         batch_size=batch_size)
    metrics = {k: float(v) for k, v in retrieval.recall_at_k(score_i2t, score_t2i, txt2img, img2txt).items()}
    return {"metrics": metrics, "num_images": int(len(image_ids)), "num_texts": len(texts),
            "num_skipped": len(captions) - int(len(image_ids))}


def evaluator(config, model, tokenizer, mesh=None):
    """`(params, step) -> metrics`: zero-shot retrieval on `config.eval.source` during stage-1 training
    (ITC, with ITM re-ranking of the top `eval.k_test` when > 0), images read as `config.data` says.
    With several processes, each reads its share of the images (`eval.batch_size` rows a batch, as many
    batches on every process) on the train `mesh`; the metrics are those of one process reading all."""
    ev, data_cfg = config.eval, config.data
    scorer = RetrievalScorer(model)

    def evaluate(params, step: int) -> dict:
        ds = data_pipeline.make_eval_dataset(data_cfg, ev.source, batch_size=ev.batch_size,
                                             process_index=jax.process_index(), process_count=jax.process_count())
        out = split_recall(scorer, params, tokenizer, ds, data_pipeline.read_captions(ev.source),
                           max_words=data_cfg.max_words, max_text_len=int(data_cfg.max_text_len),
                           k_test=int(ev.k_test), batch_size=int(ev.batch_size),
                           name=f"config.eval.source {ev.source.path or ev.source.tfds_name}", mesh=mesh)
        if out["num_skipped"]:
            log.warning("retrieval eval at step %d: %d held-out images could not be decoded; recall is over "
                        "the other %d", step, out["num_skipped"], out["num_images"])
        return out["metrics"]

    return evaluate
