"""Caption metrics: corpus BLEU-1..4 and CIDEr(-D), re-implemented from pycocoevalcap.

Pure Python/numpy; no Java. The scores equal pycocoevalcap's `Bleu(4)` (effective reference
length "closest") and `Cider()` (n=4, sigma=6, document frequencies from the references of the
evaluated set, clipped tf-idf, Gaussian length penalty, x10) on the same tokenised strings.

Tokenisation: `ptb_tokenize` approximates the Stanford PTB tokenizer that COCO evaluation runs
(`-lowerCase`, then the punctuation tokens dropped) for ordinary captions: lowercase, split off
punctuation and the clitics 's n't 're 've 'll 'd 'm, drop punctuation tokens, keep hyphenated
words, decimals ("3.5") and thousands ("1,000") whole. Brackets and quotes are dropped.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Hashable, Mapping, Sequence

import numpy as np

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens removed after PTB tokenisation.
_PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                     ".", "?", "!", ",", ":", "-", "--", "...", ";"}
# PTB turns brackets into -LRB-/-RRB-/-LSB-/... and quotes into `` / ''; we drop them all.
_DROPPED = _PTB_PUNCTUATIONS | {"(", ")", "[", "]", "{", "}", '"'}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# Characters always split off as their own token (then dropped if punctuation).
_SPLIT_CHARS = re.compile(r"([?!;\"`()\[\]{}])")
# A comma not between two digits; a colon not between two digits.
_COMMA = re.compile(r"(?<!\d),|,(?!\d)")
_COLON = re.compile(r"(?<!\d):|:(?!\d)")
_ELLIPSIS = re.compile(r"\.\.+")


def ptb_tokenize(text: str) -> str:
    """Lowercased, punctuation-free, space-joined tokens of a caption (see module docstring)."""
    text = text.replace("\n", " ").lower()
    text = _ELLIPSIS.sub(" ... ", text)
    text = _SPLIT_CHARS.sub(r" \1 ", text)
    text = _COMMA.sub(" , ", text)
    text = _COLON.sub(" : ", text)
    text = re.sub(r"--+", " -- ", text)
    tokens: list[str] = []
    for tok in text.split():
        tokens.extend(_split_token(tok))
    return " ".join(t for t in tokens if t not in _DROPPED and t)


def _split_token(tok: str) -> list[str]:
    """Quotes, a sentence-final period, and clitics off one whitespace-free token."""
    lead: list[str] = []
    trail: list[str] = []
    while tok[:1] == "'" and len(tok) > 1:
        lead.append("'")
        tok = tok[1:]
    # Trailing period: a sentence end, unless the token is an abbreviation-like "u.s." word.
    while tok[-1:] in ("'", ".") and len(tok) > 1:
        if tok[-1] == "." and re.fullmatch(r"(?:[a-z]\.){2,}", tok):
            break
        if tok[-1] == "'" and tok.endswith("s'"):  # plural possessive: dogs' -> dogs '
            trail.insert(0, "'")
            tok = tok[:-1]
            continue
        trail.insert(0, tok[-1])
        tok = tok[:-1]
    m = _CLITIC.match(tok)
    core = [m.group(1), m.group(2)] if m else [tok]
    return lead + core + trail


# ----------------------------------------------------------------------------------------------
# n-gram counting
# ----------------------------------------------------------------------------------------------
def _ngrams(sentence: str, n: int) -> Counter:
    words = sentence.split()
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, str]) -> list:
    if set(refs) != set(hyps):
        missing, extra = set(refs) - set(hyps), set(hyps) - set(refs)
        raise ValueError(
            f"caption metrics: keys differ: {len(missing)} without a hypothesis (e.g. "
            f"{sorted(map(str, missing))[:3]}), {len(extra)} without references (e.g. "
            f"{sorted(map(str, extra))[:3]})")
    for key, r in refs.items():
        if isinstance(r, str) or len(r) == 0:
            raise ValueError(f"caption metrics: references of {key!r} must be a non-empty list of strings")
        if not isinstance(hyps[key], str):
            raise ValueError(f"caption metrics: hypothesis of {key!r} must be one string, got {type(hyps[key])}")
    return list(refs)


# ----------------------------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------------------------
def bleu(
    refs: Mapping[Hashable, Sequence[str]],
    hyps: Mapping[Hashable, str],
    *,
    n: int = 4,
) -> list[float]:
    """Corpus BLEU-1..n of pre-tokenised (space-separated) captions, as pycocoevalcap's `Bleu`.

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus; the effective
    reference length of each candidate is its closest reference length (ties: the shorter); the
    brevity penalty exp(1 - r/c) applies when c < r. The same 1e-15/1e-9 guards as pycocoevalcap.

    Returns:
      [BLEU-1, ..., BLEU-n] as fractions in [0, 1].
    """
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    guess = [0] * n
    testlen_total = reflen_total = 0
    for key in _check(refs, hyps):
        hyp = hyps[key]
        test_counts = _ngrams(hyp, n)
        testlen = len(hyp.split())
        max_ref: dict = {}
        reflens = []
        for ref in refs[key]:
            reflens.append(len(ref.split()))
            for gram, c in _ngrams(ref, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), c)
        testlen_total += testlen
        reflen_total += min((abs(rl - testlen), rl) for rl in reflens)[1]
        for k in range(1, n + 1):
            guess[k - 1] += max(0, testlen - k + 1)
        for gram, c in test_counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
    scores = []
    prod = 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen_total + tiny) / (reflen_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# ----------------------------------------------------------------------------------------------
# CIDEr
# ----------------------------------------------------------------------------------------------
def _tfidf(counts: Counter, df: Mapping, log_n: float, n: int):
    """tf-idf vectors per n-gram order, their norms, and pycocoevalcap's "length".

    pycocoevalcap counts the length as the number of BIGRAMS (its `if n == 1` tests the 0-based
    order); kept for exactness: it only matters through the length difference.
    """
    vec = [dict() for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        order = len(gram) - 1
        w = float(tf) * (log_n - np.log(max(1.0, df.get(gram, 0.0))))
        vec[order][gram] = w
        norm[order] += w * w
        if order == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider(
    refs: Mapping[Hashable, Sequence[str]],
    hyps: Mapping[Hashable, str],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, np.ndarray]:
    """CIDEr of pre-tokenised captions, as pycocoevalcap's `Cider` (COCO's "CIDEr", i.e. CIDEr-D).

    Document frequency of an n-gram = number of images whose references contain it, over the
    evaluated set; idf = log(N_images) - log(max(1, df)). Per image: for each order 1..n, the
    mean over references of the clipped cosine `Σ min(h, r)·r / (|h||r|)` times the Gaussian
    penalty exp(-(Δlen)²/(2σ²)); averaged over orders, x10.

    Returns:
      (corpus score = mean over images, per-image scores in key order).
    """
    keys = _check(refs, hyps)
    ref_counts = [[_ngrams(r, n) for r in refs[k]] for k in keys]
    df: defaultdict = defaultdict(float)
    for counts in ref_counts:
        for gram in set(g for c in counts for g in c):
            df[gram] += 1
    log_n = np.log(float(len(keys)))
    gauss_den = 2 * sigma ** 2
    scores = []
    for key, counts in zip(keys, ref_counts):
        vec_h, norm_h, len_h = _tfidf(_ngrams(hyps[key], n), df, log_n, n)
        total = np.zeros(n)
        for rc in counts:
            vec_r, norm_r, len_r = _tfidf(rc, df, log_n, n)
            penalty = math.exp(-float(len_h - len_r) ** 2 / gauss_den)
            for o in range(n):
                val = sum(min(w, vec_r[o].get(g, 0.0)) * vec_r[o].get(g, 0.0) for g, w in vec_h[o].items())
                if norm_h[o] != 0 and norm_r[o] != 0:
                    val /= norm_h[o] * norm_r[o]
                total[o] += val * penalty
        scores.append(float(np.mean(total)) / len(counts) * 10.0)
    scores_arr = np.array(scores)
    return float(np.mean(scores_arr)), scores_arr


def caption_metrics(
    refs: Mapping[Hashable, Sequence[str]],
    hyps: Mapping[Hashable, str],
    *,
    tokenize: bool = True,
) -> dict[str, float]:
    """BLEU-1..4 and CIDEr of raw captions (tokenised with `ptb_tokenize` unless `tokenize=False`).

    Returns {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"} (fractions; CIDEr on its usual scale,
    where COCO state of the art is ~1.4).
    """
    if tokenize:
        refs = {k: [ptb_tokenize(r) for r in v] for k, v in refs.items()}
        hyps = {k: ptb_tokenize(v) for k, v in hyps.items()}
    b = bleu(refs, hyps)
    out = {f"bleu_{i + 1}": s for i, s in enumerate(b)}
    out["cider"] = cider(refs, hyps)[0]
    return out
