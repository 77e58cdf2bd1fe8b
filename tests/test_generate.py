"""`blip2_jax.generate` against Hugging Face `Blip2ForConditionalGeneration.generate` (transformers 5.x).

Tiny BLIP-2 models with re-drawn weights, OPT and T5. Every test function is one compilation of our
decoder (the float knobs are traced, so several penalties share it); each compares token ids with
HF's up to and including the first EOS. The EOS id is chosen per setting from HF's own output so
that some rows reach it early and others never do (asserted).
"""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

import blip2_jax
from tests.hf_tiny import torch_pixels

B = 4
MAX_NEW = 10
PAD = {"opt": 1, "t5": 0}


def _pick_eos(hf_rows: np.ndarray, exclude) -> int:
    """A token that some rows (not all) emit, at the earliest position: those rows stop early, others never."""
    best = None
    for tok in np.unique(hf_rows):
        if tok in exclude:
            continue
        rows = (hf_rows == tok).any(axis=1)
        if 0 < rows.sum() < len(hf_rows):
            first = min(int(np.argmax(r == tok)) for r in hf_rows[rows])
            if first >= 1 and (best is None or first < best[0]):
                best = (first, int(tok))
    assert best is not None, f"no token separates the rows of {hf_rows}"
    return best[1]


class Setup:
    """A tiny HF model, the same model loaded by us, images and prompts in both input formats."""

    def __init__(self, kind, hf_blip2):
        self.kind = kind
        self.hf, path, _ = hf_blip2(kind)
        self.model, self.params = blip2_jax.from_pretrained(path)
        self.cfg = cfg = self.hf.config
        rng = np.random.default_rng(5)
        size = cfg.vision_config.image_size
        self.pixels = rng.normal(size=(B, size, size, 3)).astype(np.float32)
        vocab = cfg.text_config.vocab_size
        self.ids = rng.integers(4, vocab - 1, size=(B, 4)).astype(np.int32)
        lengths = np.array([4, 2, 3, 1])
        self.mask = np.zeros((B, 4), np.int32)
        for i, n in enumerate(lengths):  # OPT prompts are left-padded, T5 prompts right-padded
            if kind == "opt":
                self.mask[i, 4 - n:] = 1
            else:
                self.mask[i, :n] = 1
        self.ids = np.where(self.mask == 1, self.ids, PAD[kind])

    def hf_inputs(self, with_prompt):
        """HF 5.x input ids: image placeholders, then the text (OPT: after the leading padding, as
        Blip2Processor lays out a left-padded batch; no prompt: BOS). T5 without prompt: placeholders only."""
        nq, img = self.cfg.num_query_tokens, self.cfg.image_token_index
        rows, masks = [], []
        for i in range(B):
            if not with_prompt:
                text = [self.cfg.text_config.bos_token_id] if self.kind == "opt" else []
                rows.append([img] * nq + text)
                masks.append([1] * len(rows[-1]))
                continue
            n = int(self.mask[i].sum())
            text = self.ids[i, 4 - n:] if self.kind == "opt" else self.ids[i, :n]
            pad = [PAD[self.kind]] * (4 - n)
            if self.kind == "opt":
                rows.append(pad + [img] * nq + list(text))
                masks.append([0] * len(pad) + [1] * (nq + n))
            else:
                rows.append([img] * nq + list(text) + pad)
                masks.append([1] * (nq + n) + [0] * len(pad))
        return torch.tensor(rows), torch.tensor(masks)

    def hf_generate(self, with_prompt, **kw):
        ids, mask = self.hf_inputs(with_prompt)
        kw = {"max_new_tokens": MAX_NEW, "pad_token_id": PAD[self.kind], "do_sample": False, **kw}
        with torch.no_grad():
            out = self.hf.generate(pixel_values=torch_pixels(self.pixels), input_ids=ids, attention_mask=mask,
                                   **kw).numpy()
        out = out[:, 1:] if self.kind == "t5" else out[:, ids.shape[1]:]  # T5: drop the decoder start
        return np.pad(out, ((0, 0), (0, MAX_NEW - out.shape[1])), constant_values=kw["pad_token_id"])

    def ours(self, with_prompt, **kw):
        text = dict(input_ids=self.ids, attention_mask=self.mask) if with_prompt else {}
        out = blip2_jax.generate(self.model, self.params, self.pixels, **text, max_new_tokens=MAX_NEW,
                                 pad_token_id=PAD[self.kind], **kw)
        assert out.shape == (B, MAX_NEW) and out.dtype == np.int32
        return np.asarray(out)

    def pick_eos(self, with_prompt, **kw) -> int:
        """The EOS for a setting: from HF's full-length output (an EOS the head cannot emit), a token
        that some rows produce early and other rows never."""
        full = self.hf_generate(with_prompt, **{**kw, "eos_token_id": self.cfg.text_config.vocab_size})
        return _pick_eos(full, exclude={PAD[self.kind], self.cfg.image_token_index})

    def check(self, with_prompt, **kw):
        """Ours equals HF up to and including each row's first EOS, padding after it; returns whether
        the EOS ended some rows but not all (the case the tests must see)."""
        kw.setdefault("eos_token_id", self.pick_eos(with_prompt, **kw))
        ours, ref = self.ours(with_prompt, **kw), self.hf_generate(with_prompt, **kw)
        eos = kw["eos_token_id"]
        ended = (ref == eos).any(axis=1)
        for i in range(B):
            stop = int(np.argmax(ref[i] == eos)) + 1 if ended[i] else MAX_NEW
            np.testing.assert_array_equal(ours[i, :stop], ref[i, :stop], err_msg=f"row {i}, {kw}")
            assert (ours[i, stop:] == PAD[self.kind]).all(), (i, ours[i])
        return 0 < ended.sum() < B


@pytest.fixture(scope="module")
def opt(hf_blip2):
    return Setup("opt", hf_blip2)


@pytest.fixture(scope="module")
def t5(hf_blip2):
    return Setup("t5", hf_blip2)


# -- OPT ---------------------------------------------------------------------------------------------------
def test_opt_greedy_without_prompt(opt):
    assert opt.check(False)


def test_opt_greedy_prompt_repetition_penalty_min_new_tokens(opt):
    # One compilation: the penalty values are traced (< 1 favours repeats).
    mixed = [opt.check(True, repetition_penalty=p, min_new_tokens=m) for p, m in ((1.6, 3), (0.7, 2))]
    assert any(mixed)


def test_opt_beam3_prompt_length_penalty(opt):
    assert any([opt.check(True, num_beams=3, length_penalty=lp) for lp in (1.0, 0.3, 2.5)])


def test_opt_beam5_without_prompt_all_processors(opt):
    assert opt.check(False, num_beams=5, repetition_penalty=1.4, min_new_tokens=3, length_penalty=0.6)


# -- T5 ----------------------------------------------------------------------------------------------------
def test_t5_greedy_prompt(t5):
    assert t5.check(True)


def test_t5_beam3_without_prompt_length_penalty(t5):
    assert any([t5.check(False, num_beams=3, length_penalty=lp) for lp in (1.0, -0.5, 2.0)])


def test_t5_beam5_prompt_repetition_penalty_min_new_tokens(t5):
    assert t5.check(True, num_beams=5, repetition_penalty=1.3, min_new_tokens=2, length_penalty=0.8)


# -- sampling ----------------------------------------------------------------------------------------------
def test_sampling_seeded_nucleus(opt):
    eos = opt.pick_eos(False)
    kw = dict(do_sample=True, temperature=1.7, eos_token_id=eos)
    a = opt.ours(False, top_p=0.9, rng=jax.random.PRNGKey(0), **kw)
    b = opt.ours(False, top_p=0.9, rng=jax.random.PRNGKey(0), **kw)
    c = opt.ours(False, top_p=0.9, rng=jax.random.PRNGKey(1), **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # A tiny nucleus keeps only the most likely token: HF's greedy ids (same compilation as above).
    tiny = opt.ours(False, top_p=1e-6, rng=jax.random.PRNGKey(3), **kw)
    ref = opt.hf_generate(False, eos_token_id=eos)
    for i in range(B):
        stop = int(np.argmax(ref[i] == eos)) + 1 if (ref[i] == eos).any() else MAX_NEW
        np.testing.assert_array_equal(tiny[i, :stop], ref[i, :stop])

    # First tokens over many seeds follow HF's nucleus of softmax(logits / temperature).
    ids, mask = opt.hf_inputs(False)
    with torch.no_grad():
        logits = opt.hf(pixel_values=torch_pixels(opt.pixels), input_ids=ids, attention_mask=mask).logits[:, -1]
    probs = torch.softmax(logits / 1.7, -1).numpy().astype(np.float64)
    firsts = np.stack([opt.ours(False, top_p=0.9, rng=jax.random.PRNGKey(s), **kw)[:, 0] for s in range(60)])
    for i in range(B):
        order = np.argsort(probs[i])  # HF's rule: drop the ascending prefix with cumulative mass <= 0.1
        drop = order[np.cumsum(probs[i][order]) <= 0.1]
        nucleus = np.setdiff1d(np.arange(probs.shape[1]), drop)
        assert np.isin(firsts[:, i], nucleus).all(), (i, firsts[:, i], nucleus)
        p = probs[i, nucleus] / probs[i, nucleus].sum()
        freq = np.array([(firsts[:, i] == t).mean() for t in nucleus])
        assert np.abs(freq - p).max() < 0.2, (i, freq, p)


def test_top_k_mask_equals_hf_warper():
    """`_top_k_mask` against transformers' `TopKLogitsWarper` (top_k below, at and above min_keep, and
    larger than the vocabulary), with tied scores at the k-th place."""
    from transformers.generation.logits_process import TopKLogitsWarper

    from blip2_jax import decoding

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 23)).astype(np.float32)
    scores[1, :5] = scores[1, 5]  # ties at the cut
    for top_k, min_keep in [(1, 1), (3, 1), (1, 3), (5, 2), (40, 1)]:
        want = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(None, torch.from_numpy(scores.copy())).numpy()
        got = np.asarray(decoding._top_k_mask(jnp.asarray(scores), top_k, min_keep))
        np.testing.assert_array_equal(got, want)


def test_sampling_top_k(opt):
    """top_k=1 sampling is greedy (HF's ids); with top_k=3 every first token is one of the 3 most
    likely under HF's logits."""
    eos = opt.pick_eos(False)
    kw = dict(do_sample=True, temperature=1.3, eos_token_id=eos)
    one = opt.ours(False, top_k=1, rng=jax.random.PRNGKey(5), **kw)
    ref = opt.hf_generate(False, eos_token_id=eos)
    for i in range(B):
        stop = int(np.argmax(ref[i] == eos)) + 1 if (ref[i] == eos).any() else MAX_NEW
        np.testing.assert_array_equal(one[i, :stop], ref[i, :stop])
    ids, mask = opt.hf_inputs(False)
    with torch.no_grad():
        logits = opt.hf(pixel_values=torch_pixels(opt.pixels), input_ids=ids, attention_mask=mask).logits[:, -1]
    top3 = torch.topk(logits, 3, dim=-1).indices.numpy()
    firsts = np.stack([opt.ours(False, top_k=3, rng=jax.random.PRNGKey(s), **kw)[:, 0] for s in range(12)])
    for i in range(B):
        assert np.isin(firsts[:, i], top3[i]).all(), (i, firsts[:, i], top3[i])
    with pytest.raises(ValueError, match="top_k"):
        opt.ours(False, top_k=-1, rng=jax.random.PRNGKey(0), **kw)
