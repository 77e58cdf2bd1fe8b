"""Caption cleaning and the stage-1 / OPT / FlanT5 text encodings."""
import os

import numpy as np
import pytest

from blip2_jax.data import testing, text


def test_clean_caption_matches_lavis_pre_caption():
    assert text.clean_caption("A Dog, (sitting) on the MAT!!  ") == "a dog, sitting on the mat"
    assert text.clean_caption('He said: "hi"; ~ok* #1.') == "he said hi ok 1"
    # LAVIS strips only spaces and a trailing newline: a leading tab survives.
    assert text.clean_caption("\tTabs\tand  spaces\n") == "\ttabs\tand spaces"
    long = " ".join(f"w{i}" for i in range(60))
    assert text.clean_caption(long).split(" ") == [f"w{i}" for i in range(50)]
    assert text.clean_caption(long, max_words=3) == "w0 w1 w2"


def test_stage1_bert_tokens_against_vocab_file(bert_tokenizer):
    bert = bert_tokenizer
    with open(os.path.join(testing.bert_vocab_dir(), "vocab.txt"), encoding="utf-8") as f:
        vocab = {w.rstrip("\n"): i for i, w in enumerate(f)}
    assert len(vocab) == 30522
    assert bert.bos_token == "[DEC]" and bert.bos_token_id == 30522 and len(bert) == 30523
    out = text.Stage1Text(bert, 32)("a dog sitting on the mat")
    words = "a dog sitting on the mat".split()
    expected = [vocab["[CLS]"]] + [vocab[w] for w in words] + [vocab["[SEP]"]]
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (32,)
    assert out["input_ids"][:8].tolist() == expected and expected[0] == 101 and expected[-1] == 102
    assert (out["input_ids"][8:] == 0).all()
    assert out["attention_mask"].tolist() == [1] * 8 + [0] * 24
    # Truncation keeps [CLS] ... [SEP] at exactly max length.
    long = text.Stage1Text(bert, 32)(" ".join(["dog"] * 40))
    assert long["input_ids"][0] == 101 and long["input_ids"][-1] == 102
    assert (long["input_ids"][1:-1] == vocab["dog"]).all() and long["attention_mask"].all()


@pytest.fixture(scope="module")
def opt_tok(tokenizer_dir):
    return text.load_tokenizer(tokenizer_dir("opt"))


@pytest.fixture(scope="module")
def t5_tok(tokenizer_dir):
    return text.load_tokenizer(tokenizer_dir("t5"))


@pytest.mark.parametrize("prompt", ["", "a photo of "])
@pytest.mark.parametrize("caption", ["a small red circle", "a large blue square above " * 6])
def test_opt_text_matches_lavis_recipe(opt_tok, prompt, caption):
    L = 16
    out = text.OPTText(opt_tok, L, prompt)(caption)
    # LAVIS: tokenizer(prompt + caption + "\n", padding, truncation, max_length) (it adds </s>),
    # targets = ids with pad -> -100, and the first len(tokenizer(prompt)) targets -> -100.
    ref = opt_tok(prompt + caption + "\n", padding="max_length", truncation=True, max_length=L)
    assert ref["input_ids"][0] == 2  # The tokenizer itself prepends OPT's BOS </s>.
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])
    labels = np.where(np.asarray(ref["attention_mask"]) == 0, -100, ref["input_ids"])
    if prompt:
        labels[: sum(opt_tok(prompt)["attention_mask"])] = -100
    np.testing.assert_array_equal(out["labels"], labels)
    assert out["labels"].dtype == np.int32


def test_exact_prompt_mask_trains_the_captions_first_token(opt_tok):
    """LAVIS counts "a photo of " as its own tokens, one more than it covers in "a photo of a small ..."
    (the space joins "a"): the caption's first token is masked. `prompt_mask="exact"` keeps it a target."""
    prompt, caption = "a photo of ", "a small red circle"
    joint = opt_tok(prompt + caption + "\n")["input_ids"]  # with </s>
    covered = len(opt_tok(prompt.rstrip())["input_ids"])  # </s> + the prompt's words
    assert len(opt_tok(prompt)["input_ids"]) == covered + 1  # LAVIS's count: one more
    lavis = text.OPTText(opt_tok, 16, prompt)(caption)["labels"]
    exact = text.OPTText(opt_tok, 16, prompt, prompt_mask="exact")(caption)["labels"]
    assert lavis[covered] == -100 and exact[covered] == joint[covered]
    np.testing.assert_array_equal(lavis[covered + 1:], exact[covered + 1:])
    assert (exact[:covered] == -100).all()
    with pytest.raises(ValueError, match="data.prompt_mask='loose'"):
        text.OPTText(opt_tok, 16, prompt, prompt_mask="loose")


def test_t5_prefix_split_and_prompt_mode(t5_tok):
    caption = "a small red circle left of a large blue square"
    ids = t5_tok.encode(caption, add_special_tokens=False)
    n = len(ids)
    enc = text.T5Text(t5_tok, 32, mode="prefix")
    seen = set()
    for seed in range(60):
        out = enc(caption, np.random.default_rng(seed))
        prefix = out["input_ids"][out["attention_mask"] == 1].tolist()
        target = out["labels"][out["labels"] != -100].tolist()
        assert prefix[-1] == 1 and target[-1] == 1  # both end with </s>
        k = len(prefix) - 1
        assert 1 <= k <= n // 2
        assert prefix[:-1] + target[:-1] == ids  # prefix + suffix = the caption
        seen.add(k)
        # decoder inputs = HF's shift_right(labels): start token 0, -100 -> pad.
        shifted = np.concatenate([[0], np.where(out["labels"] == -100, 0, out["labels"])[:-1]])
        np.testing.assert_array_equal(out["decoder_input_ids"], shifted)
        np.testing.assert_array_equal(out["decoder_attention_mask"], out["labels"] != -100)
    assert seen == set(range(1, n // 2 + 1))  # uniform over 1..middle: every point gets drawn
    out = text.T5Text(t5_tok, 32, mode="prompt", prompt="a photo of")(caption)
    ref_in = t5_tok("a photo of", padding="max_length", max_length=32)
    ref_out = t5_tok(caption, padding="max_length", max_length=32)
    np.testing.assert_array_equal(out["input_ids"], ref_in["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ref_in["attention_mask"])
    np.testing.assert_array_equal(
        out["labels"], np.where(np.asarray(ref_out["attention_mask"]) == 1, ref_out["input_ids"], -100))
    # Truncation keeps </s> last, as HF's truncation does.
    out = text.T5Text(t5_tok, 8, mode="prompt")(caption)
    ref = t5_tok(caption, truncation=True, max_length=8)["input_ids"]
    assert out["labels"].tolist() == ref
