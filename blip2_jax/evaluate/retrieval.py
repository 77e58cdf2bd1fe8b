"""Image-text retrieval metrics: Recall@K and LAVIS's top-k ITM re-ranking.

Host-side numpy (score matrices are gathered to the host first). Follows LAVIS
`tasks/retrieval.py: _report_metrics` and `blip2.py: compute_sim_matrix`
(shared/reference/blip2-reference.md, section 3), except that recalls are fractions, not percent.

Names: "tr" (text retrieval) = image-to-text = "i2t"; "ir" (image retrieval) = text-to-image = "t2i".
LAVIS calls them `txt_r*` and `img_r*`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

RERANK_FILL = -100.0


def _ranks(scores: np.ndarray, row: int, targets: Sequence[int]) -> int:
    """Best (smallest) 0-based rank among `targets` in `scores[row]`, sorted descending.

    Ties are ordered as LAVIS's `np.argsort(score)[::-1]` orders them with a stable sort: among equal
    scores the higher column index comes first. So rank(j) = #{s > s_j} + #{s == s_j, index > j}.
    """
    s = scores[row]
    idx = np.arange(s.shape[0])
    best = None
    for j in targets:
        r = int(np.sum(s > s[j]) + np.sum((s == s[j]) & (idx > j)))
        best = r if best is None else min(best, r)
    if best is None:
        raise ValueError(f"recall_at_k: row {row} has no ground-truth match")
    return best


def recall_at_k(
    score_i2t: np.ndarray,
    score_t2i: np.ndarray,
    txt2img: Sequence[int] | Mapping[int, int],
    img2txt: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K for both directions, as LAVIS `_report_metrics` (fractions in [0, 1]).

    Args:
      score_i2t: [N_img, N_txt] scores (higher = better) of every text for every image.
      score_t2i: [N_txt, N_img] scores of every image for every text.
      txt2img: for text t, the index of its image.
      img2txt: for image i, the indices of its texts (any of them counts as a hit).
      ks: the K values.

    Returns:
      {"tr_r{k}", "ir_r{k}" for k in ks, "tr_mean", "ir_mean", "r_mean"} plus the aliases
      "i2t_r{k}" (= tr) and "t2i_r{k}" (= ir). An image counts at K if any of its captions ranks
      within the top K; a text counts if its image does.
    """
    score_i2t = np.asarray(score_i2t, dtype=np.float64)
    score_t2i = np.asarray(score_t2i, dtype=np.float64)
    n_img, n_txt = score_i2t.shape
    if score_t2i.shape != (n_txt, n_img):
        raise ValueError(
            f"recall_at_k: score_t2i has shape {score_t2i.shape}, expected {(n_txt, n_img)} "
            f"(the transpose of score_i2t's {score_i2t.shape})")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(
            f"recall_at_k: img2txt has {len(img2txt)} entries for {n_img} images and txt2img "
            f"{len(txt2img)} for {n_txt} texts")
    tr_ranks = np.array([_ranks(score_i2t, i, img2txt[i]) for i in range(n_img)])
    ir_ranks = np.array([_ranks(score_t2i, t, [txt2img[t]]) for t in range(n_txt)])
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = float(np.mean(tr_ranks < k))
        out[f"ir_r{k}"] = float(np.mean(ir_ranks < k))
    out["tr_mean"] = float(np.mean([out[f"tr_r{k}"] for k in ks]))
    out["ir_mean"] = float(np.mean([out[f"ir_r{k}"] for k in ks]))
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    for k in ks:
        out[f"i2t_r{k}"] = out[f"tr_r{k}"]
        out[f"t2i_r{k}"] = out[f"ir_r{k}"]
    return out


def _topk(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries, largest first (ties: lower index first)."""
    return np.argsort(-row, kind="stable")[:k]


def rerank_with_itm(
    sims: np.ndarray,
    itm_score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    k_test: int,
    *,
    rows_per_call: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """LAVIS `compute_sim_matrix` re-ranking: ITM scores for the top-k ITC candidates.

    Args:
      sims: [N_img, N_txt] ITC similarities (raw cosine, max over queries, no temperature).
      itm_score_fn: `(image_indices [M], text_indices [M]) -> [M]` ITM positive-class logits
        (LAVIS: `itm_head(h[:, :Q])[:, :, 1].mean(1)`), for pairs given by dataset indices.
      k_test: candidates per row (LAVIS: 128); clipped to the number of columns.
      rows_per_call: how many query rows to score per `itm_score_fn` call (M = rows_per_call * k).

    Returns:
      (score_i2t [N_img, N_txt], score_t2i [N_txt, N_img]) float32: for each image, its top-k texts
      by sim get `itm_logit + sim`, all other entries -100; the same for each text over images.
    """
    sims = np.asarray(sims, dtype=np.float32)
    score_i2t = _rerank_rows(sims, itm_score_fn, k_test, rows_per_call, rows_are_images=True)
    score_t2i = _rerank_rows(sims.T, itm_score_fn, k_test, rows_per_call, rows_are_images=False)
    return score_i2t, score_t2i


def _rerank_rows(sims, itm_score_fn, k_test, rows_per_call, *, rows_are_images):
    n_rows, n_cols = sims.shape
    k = min(k_test, n_cols)
    out = np.full((n_rows, n_cols), RERANK_FILL, dtype=np.float32)
    for start in range(0, n_rows, rows_per_call):
        rows = np.arange(start, min(n_rows, start + rows_per_call))
        cand = np.stack([_topk(sims[r], k) for r in rows])  # [R, k]
        query = np.repeat(rows, k)
        cols = cand.reshape(-1)
        img_idx, txt_idx = (query, cols) if rows_are_images else (cols, query)
        logits = np.asarray(itm_score_fn(img_idx, txt_idx), dtype=np.float32).reshape(len(rows), k)
        out[rows[:, None], cand] = logits + sims[rows[:, None], cand]
    return out
