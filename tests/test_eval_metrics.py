"""Evaluation metrics (retrieval, captioning, VQA) against hand computations and brute-force or
reference implementations."""
import math

import numpy as np
import pytest

from blip2_jax.evaluate import captioning, retrieval, vqa


# ------------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------------
def _lavis_report_metrics(scores_i2t, scores_t2i, txt2img, img2txt):
    """LAVIS `_report_metrics`, literally (stable argsort so ties are deterministic), as fractions."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score, kind="stable")[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [np.mean(ranks < k) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score, kind="stable")[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [np.mean(ranks < k) for k in (1, 5, 10)]
    return tr, ir


def test_recall_hand_constructed():
    # 3 images, 2 captions each: image i owns texts 2i, 2i+1.
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    s_i2t = np.array([
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # image 0: text 0 first -> rank 0
        [0.9, 0.8, 0.1, 0.7, 0.0, 0.0],  # image 1: best own text 3 at rank 2
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],  # image 2: best own text 4 at rank 4
    ])
    s_t2i = np.array([
        [1.0, 0.0, 0.0],  # text 0 -> image 0 rank 0
        [0.0, 1.0, 0.5],  # text 1 -> image 0 rank 2
        [0.0, 1.0, 0.0],  # text 2 -> rank 0
        [0.5, 0.2, 0.1],  # text 3 -> image 1 rank 1
        [0.0, 0.0, 1.0],  # text 4 -> rank 0
        [0.3, 0.2, 0.1],  # text 5 -> image 2 rank 2
    ])
    r = retrieval.recall_at_k(s_i2t, s_t2i, txt2img, img2txt, ks=(1, 2, 5))
    assert r["tr_r1"] == pytest.approx(1 / 3)
    assert r["tr_r2"] == pytest.approx(1 / 3)
    assert r["tr_r5"] == pytest.approx(1.0)
    assert r["ir_r1"] == pytest.approx(3 / 6)
    assert r["ir_r2"] == pytest.approx(4 / 6)
    assert r["ir_r5"] == pytest.approx(1.0)
    assert r["tr_mean"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert r["r_mean"] == pytest.approx((r["tr_mean"] + r["ir_mean"]) / 2)
    assert r["t2i_r1"] == r["ir_r1"] and r["i2t_r5"] == r["tr_r5"]


def test_recall_matches_brute_force_lavis_with_ties():
    rng = np.random.default_rng(0)
    n_img, per = 12, 3
    n_txt = n_img * per
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_txt)]
    for trial in range(5):
        # Small integer scores make many ties: exercises the tie order.
        s_i2t = rng.integers(0, 4, (n_img, n_txt)).astype(float)
        s_t2i = rng.integers(0, 4, (n_txt, n_img)).astype(float)
        got = retrieval.recall_at_k(s_i2t, s_t2i, txt2img, img2txt)
        tr, ir = _lavis_report_metrics(s_i2t, s_t2i, txt2img, img2txt)
        for k, want_tr, want_ir in zip((1, 5, 10), tr, ir):
            assert got[f"tr_r{k}"] == pytest.approx(want_tr), (trial, k)
            assert got[f"ir_r{k}"] == pytest.approx(want_ir), (trial, k)


def test_recall_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="score_t2i"):
        retrieval.recall_at_k(np.zeros((2, 3)), np.zeros((2, 3)), [0, 1, 1], [[0], [1, 2]])


def _brute_rerank(sims, itm, k):
    n_img, n_txt = sims.shape
    i2t = np.full((n_img, n_txt), -100.0)
    for i in range(n_img):
        top = sorted(range(n_txt), key=lambda t: (-sims[i, t], t))[:k]
        for t in top:
            i2t[i, t] = itm[i, t] + sims[i, t]
    t2i = np.full((n_txt, n_img), -100.0)
    for t in range(n_txt):
        top = sorted(range(n_img), key=lambda i: (-sims[i, t], i))[:k]
        for i in top:
            t2i[t, i] = itm[i, t] + sims[i, t]
    return i2t, t2i


@pytest.mark.parametrize("rows_per_call", [1, 3, 100])
def test_rerank_with_itm_matches_brute_force(rows_per_call):
    rng = np.random.default_rng(1)
    sims = rng.uniform(-1, 1, (5, 9)).astype(np.float32)
    itm = rng.normal(0, 3, (5, 9)).astype(np.float32)
    calls = []

    def score_fn(img_idx, txt_idx):
        calls.append(len(img_idx))
        return itm[img_idx, txt_idx]

    i2t, t2i = retrieval.rerank_with_itm(sims, score_fn, k_test=4, rows_per_call=rows_per_call)
    want_i2t, want_t2i = _brute_rerank(sims, itm, 4)
    np.testing.assert_allclose(i2t, want_i2t, rtol=1e-6)
    np.testing.assert_allclose(t2i, want_t2i, rtol=1e-6)
    assert sum(calls) == 5 * 4 + 9 * 4  # exactly k candidates per row, nothing else scored
    assert np.sum(i2t == -100) == 5 * (9 - 4) and np.sum(t2i == -100) == 9 * (5 - 4)


def test_rerank_hand_case_and_k_clipping():
    sims = np.array([[0.9, 0.1, 0.5],
                     [0.2, 0.8, 0.3]], np.float32)
    itm = np.array([[-5.0, 1.0, 2.0],
                    [0.0, -3.0, 4.0]], np.float32)
    i2t, t2i = retrieval.rerank_with_itm(sims, lambda i, t: itm[i, t], k_test=2)
    # image 0: top-2 texts by sim are 0 (0.9) and 2 (0.5) -> -4.1 and 2.5; image 1: texts 1, 2.
    np.testing.assert_allclose(i2t, [[-4.1, -100, 2.5], [-100, -2.2, 4.3]], rtol=1e-6)
    # k_test larger than the number of images: every image is scored.
    np.testing.assert_allclose(t2i, (itm + sims).T, rtol=1e-6)
    # After re-ranking, the ITM overturns ITC for image 0: text 2 now first.
    r = retrieval.recall_at_k(i2t, t2i, [0, 1, 0], [[2], [1]], ks=(1,))
    assert r["tr_r1"] == pytest.approx(0.5)  # image 0 -> text 2 correct; image 1 -> text 2 wrong


# ------------------------------------------------------------------------------------------------
# Captioning: tokenizer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, want", [
    ("A man's dog, running.", "a man 's dog running"),
    ("Don't stop!", "do n't stop"),
    ("A black-and-white photo of 3.5 cats (two)", "a black-and-white photo of 3.5 cats two"),
    ('1,000 people: "hello"', "1,000 people hello"),
    ("The U.S. flag .", "the u.s. flag"),
    ("Two dogs' toys; a ball - red...", "two dogs toys a ball red"),
    ("  A   Cat\nsits  ", "a cat sits"),
])
def test_ptb_tokenize_hand_cases(raw, want):
    assert captioning.ptb_tokenize(raw) == want


# ------------------------------------------------------------------------------------------------
# Captioning: BLEU and CIDEr by hand
# ------------------------------------------------------------------------------------------------
def test_bleu_hand_computed():
    # Perfect match.
    b = captioning.bleu({1: ["a b c d"]}, {1: "a b c d"})
    np.testing.assert_allclose(b, [1, 1, 1, 1], rtol=1e-8)
    # Short hypothesis: precisions 1, 1, then no 3/4-grams; brevity penalty exp(1 - 4/2).
    b = captioning.bleu({1: ["a b c d"]}, {1: "a b"})
    bp = math.exp(1 - 4 / 2)
    np.testing.assert_allclose(b[:2], [bp, bp], rtol=1e-8)
    np.testing.assert_allclose(b[2], (1e-15 / 1e-9) ** (1 / 3) * bp, rtol=1e-6)
    # Clipping and closest reference length: hyp "the the the" vs refs "the cat" / "a the the x y".
    # Unigram clip = max count of "the" in a ref = 2 -> p1 = 2/3; bigram "the the" clipped 1/2.
    # Closest ref length to 3 is 2 (|2-3| = 1 < |5-3| = 2); c = 3 >= r = 2, so no brevity penalty.
    b = captioning.bleu({1: ["the cat", "a the the x y"]}, {1: "the the the"})
    np.testing.assert_allclose(b[0], 2 / 3, rtol=1e-8)
    np.testing.assert_allclose(b[1], math.sqrt(2 / 3 * 1 / 2), rtol=1e-8)
    # Corpus level: counts are summed before dividing (not an average of sentence BLEUs).
    b = captioning.bleu({1: ["a b"], 2: ["c d e f"]}, {1: "a b", 2: "c x e f"})
    np.testing.assert_allclose(b[0], (2 + 3) / (2 + 4), rtol=1e-8)
    np.testing.assert_allclose(b[1], math.sqrt(5 / 6 * (1 + 1) / (1 + 3)), rtol=1e-8)


def test_cider_hand_computed():
    # idf: "a" is in both images' refs -> idf 0; "cat", "dog", "a cat", "a dog" -> log 2.
    # Perfect: orders 1 and 2 have cosine 1, orders 3 and 4 are empty -> mean 0.5, x10 = 5.
    score, per = captioning.cider({"A": ["a cat"], "B": ["a dog"]}, {"A": "a cat", "B": "a dog"})
    np.testing.assert_allclose(per, [5.0, 5.0], rtol=1e-9)
    assert score == pytest.approx(5.0)
    # Wrong noun: the only shared n-gram "a" has weight 0 -> 0.
    score, per = captioning.cider({"A": ["a cat"], "B": ["a dog"]}, {"A": "a dog", "B": "a dog"})
    np.testing.assert_allclose(per, [0.0, 5.0], atol=1e-12)
    # Length penalty: hyp "a cat cat" has 2 bigrams vs 1 -> factor exp(-1/72). Unigram vector
    # (a:0, cat:2 log2) vs (a:0, cat:log2): clipped dot min(2l, l)*l = l^2, norms 2l and l -> 1/2.
    # Bigrams: "a cat" (l) and "cat cat" (l, df 0 -> log 2) vs "a cat": min(l,l)*l / (sqrt2 l * l).
    score, per = captioning.cider({"A": ["a cat"], "B": ["a dog"]}, {"A": "a cat cat", "B": "a dog"})
    want = (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72) * 10
    np.testing.assert_allclose(per[0], want, rtol=1e-9)


def test_caption_metrics_tokenizes_and_checks_keys():
    refs = {1: ["A cat sits on a mat.", "A cat is on the mat!"], 2: ["Two dogs play."]}
    hyps = {1: "a cat sits on a mat", 2: "two dogs play"}
    m = captioning.caption_metrics(refs, hyps)
    tok_refs = {k: [captioning.ptb_tokenize(r) for r in v] for k, v in refs.items()}
    assert m["bleu_4"] == pytest.approx(captioning.bleu(tok_refs, hyps)[3])
    assert m["bleu_1"] == pytest.approx(1.0)
    assert m["cider"] == pytest.approx(captioning.cider(tok_refs, hyps)[0])
    with pytest.raises(ValueError, match="keys differ"):
        captioning.caption_metrics(refs, {1: "a cat"})


# ------------------------------------------------------------------------------------------------
# Captioning: against pycocoevalcap (a test-only dependency; pure Python for BLEU and CIDEr)
# ------------------------------------------------------------------------------------------------
def _random_corpus(seed, n_img=40):
    rng = np.random.default_rng(seed)
    vocab = "a the man woman dog cat on in with red blue sits runs plays ball table grass".split()

    def sent():
        return " ".join(rng.choice(vocab, size=rng.integers(1, 12)))

    refs = {f"img{i}": [sent() for _ in range(rng.integers(1, 6))] for i in range(n_img)}
    hyps = {k: sent() if rng.random() > 0.2 else v[0] for k, v in refs.items()}
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_and_cider_equal_pycocoevalcap(seed):
    import pycocoevalcap.bleu.bleu as bleu_mod  # test requirement: must not skip silently
    import pycocoevalcap.cider.cider as cider_mod
    refs, hyps = _random_corpus(seed)
    res = {k: [v] for k, v in hyps.items()}
    want_bleu, _ = bleu_mod.Bleu(4).compute_score(refs, res, verbose=0)
    want_cider, want_per = cider_mod.Cider().compute_score(refs, res)
    np.testing.assert_allclose(captioning.bleu(refs, hyps), want_bleu, rtol=1e-12)
    got_cider, got_per = captioning.cider(refs, hyps)
    np.testing.assert_allclose(got_cider, want_cider, rtol=1e-10)
    np.testing.assert_allclose(got_per, want_per, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# VQA
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, want", [
    ("A Dog.", "dog"),
    ("the dogs!", "dogs"),
    ("Yes, it is", "yes it is"),
    ("10,000", "10000"),
    ("3.5", "3.5"),
    ("dont", "don't"),
    ("None", "0"),
    ("Two", "2"),
    ("x-ray", "x ray"),
    ("  an apple \n", "apple"),
])
def test_vqa_normalize_answer(raw, want):
    assert vqa.normalize_answer(raw) == want


def test_vqa_accuracy_hand_cases():
    # All humans said "2": every 9-subset has 9 matches -> 1.
    assert vqa.vqa_accuracy("two", ["2"] * 10) == pytest.approx(1.0)
    # 3 of 10 said it: leaving one of those 3 out leaves 2 -> 2/3; else 3 -> 1.
    assert vqa.vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # 1 of 10: 9 subsets contain it -> 1/3 each, one subset 0 -> 0.3.
    assert vqa.vqa_accuracy("Yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10.
    assert vqa.vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx((2 / 3 + 16 / 3) / 10)
    assert vqa.vqa_accuracy("green", ["red"] * 10) == 0.0
    # Human answers get the punctuation step when they disagree: "t-shirt" -> "t shirt".
    assert vqa.vqa_accuracy("T shirt", ["t-shirt"] * 4 + ["shirt"] * 6) == pytest.approx(1.0)
    # ...but not when they all agree (official quirk): the raw "t-shirt" does not match "t shirt".
    assert vqa.vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0


def test_vqa_accuracy_corpus_mean():
    preds = ["two", "Yes", "green"]
    gts = [["2"] * 10, ["yes"] + ["no"] * 9, ["red"] * 10]
    assert vqa.vqa_accuracy_corpus(preds, gts) == pytest.approx((1.0 + 0.3 + 0.0) / 3)
    with pytest.raises(ValueError, match="2 predictions for 3 questions"):
        vqa.vqa_accuracy_corpus(preds[:2], gts)
