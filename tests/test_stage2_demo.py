"""The stage-2 demo chain (text_lm -> stage2 through `blip2_jax.main.run`) and its captioning eval.

- `caption_scores` and the eval hook on cases whose answer is known: the hook is fed known generated
  ids (a stand-in for `blip2_jax.generate` that records what it was called with), so the
  prompt, the EOS cut, the LAVIS cleaning and the scores can be checked by hand.
- A shortened demo: the session's text-LM run of a tiny OPT on the tiny shapes dataset (conftest.py
  `text_lm_run`), then a few stage-2 steps from its export, both through `main.run`; the final metrics
  carry the captioning scores, and a second `run` of the finished workdir trains nothing and reports the
  same scores.
"""
import json
import os

import numpy as np
import pytest

from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data.text import clean_caption, load_tokenizer
from blip2_jax.evaluate import caption_eval, captioning
from blip2_jax.train import stage2
from tests import tiny_configs
from tests.toy_task import compile_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("compile_cache")
NUM_HELDOUT = 12  # conftest.py's shapes_dir


# -- scores on hand-made captions -----------------------------------------------------------------
def test_caption_scores_by_hand():
    refs = [["a red circle", "a circle"], ["a blue square", "a square"], ["a green diamond", "x"],
            ["a small triangle", "y"]]
    hyps = {0: "a circle", 1: "a blue square", 2: "a red circle", 3: "a red circle"}
    out = caption_eval.caption_scores(refs, hyps)
    # 0 and 1 match a reference exactly (either one), 2 and 3 do not; "a red circle" is said twice.
    assert out["caption_exact"] == 0.5
    assert out["top_caption_share"] == 0.5
    assert out["num_images"] == 4
    ref = captioning.caption_metrics({i: refs[i] for i in hyps}, hyps)
    assert out["bleu_4"] == ref["bleu_4"] and out["cider"] == ref["cider"]
    with pytest.raises(ValueError, match="no generated captions"):
        caption_eval.caption_scores(refs, {})


def test_generation_prompt_follows_training():
    c = tiny_configs.load("stage2", "demo_opt")
    assert c.data.prompt == "a photo of "
    assert caption_eval.generation_prompt(c) == "a photo of"  # the trailing space belongs to the caption's "Ġa"
    c = tiny_configs.load("stage2", "demo_t5")
    assert caption_eval.generation_prompt(c) == "a photo of"
    c.data.text_mode = "t5_prefix"
    assert caption_eval.generation_prompt(c) == ""


# -- the shortened demo ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(shapes_dir, text_lm_run, tmp_path_factory):
    """The text LM's HF export, then 6 stage-2 steps of the tiny stage-2 config from it via main.run."""
    from blip2_jax import main
    lm, lm_out, lm_workdir = text_lm_run
    c = tiny_configs.stage2("opt")  # a fresh Q-Former (stage-1 loading: tests/test_stage2.py)
    c.init.llm_checkpoint = c.data.tokenizer_path = os.path.join(lm_workdir, "hf")
    c.data.train_sources.shapes.path = c.eval.source.path = shapes_dir
    c.train.update(total_steps=6, batch_size=16, log_every=3, checkpoint_every=0)
    c.data.global_batch_size = 16
    c.optimizer.warmup_steps = 2
    c.eval.batch_size = 8  # 12 images: the second batch is padded (valid=False rows are skipped)
    workdir = str(tmp_path_factory.mktemp("s2demo") / "stage2")
    out = main.run(c, workdir)
    return lm, lm_out, lm_workdir, c, out, workdir


def test_demo_chain_reports_captioning_metrics(demo):
    lm, lm_out, lm_workdir, c, out, workdir = demo
    assert lm_out["step"] == lm.train.total_steps
    assert os.path.exists(os.path.join(lm_workdir, "hf", "model.safetensors"))
    assert out["step"] == 6 and np.isfinite(out["loss"])
    assert out["num_images"] == NUM_HELDOUT  # every held-out image once, padding rows skipped
    assert 0.0 <= out["caption_exact"] <= 1.0 and 1 / NUM_HELDOUT <= out["top_caption_share"] <= 1.0
    assert np.isfinite(out["bleu_4"]) and np.isfinite(out["cider"])
    json.dumps(out)  # main.py prints it as the last line
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert any("eval/caption_exact" in r for r in logged)


def test_finished_demo_restarts_nothing(demo):
    """The loop resumes from the last checkpoint: at total_steps it only re-evaluates (deterministic)."""
    from blip2_jax import main
    *_, c, out, workdir = demo
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    again = main.run(c, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert again["step"] == 6
    for k in ("caption_exact", "top_caption_share", "bleu_4", "cider", "num_images"):
        assert again[k] == out[k], k


# -- the hook on known generated ids ----------------------------------------------------------------
def test_eval_hook_on_known_generated_ids(demo, monkeypatch):
    """Feed the hook known ids: the right caption for images 0, 3, 4 (one of them capitalised, with a
    period, which LAVIS cleaning removes, one the second reference), a wrong caption for the rest; junk
    after the EOS must be cut. Expected: caption_exact = 3/12; the wrong caption is given to 9 images."""
    c = demo[3]
    tok = load_tokenizer(c.data.tokenizer_path)
    eos = tok.encode("\n", add_special_tokens=False)[0]
    refs = data_pipeline.read_captions(c.eval.source)
    right = {0: refs[0][0].capitalize() + ".", 3: refs[3][1], 4: refs[4][0]}
    wrong = "a large purple diamond above a large purple diamond"
    calls = []

    def fake_generate(model, params, pixels, input_ids, attention_mask, *, max_new_tokens, num_beams):
        start = sum(len(p) for p, _ in calls)
        calls.append((np.asarray(pixels), np.asarray(input_ids)))
        rows = []
        for i in range(start, start + pixels.shape[0]):
            ids = tok.encode(" " + right.get(i, wrong), add_special_tokens=False) + [eos] + tok.encode(" junk")
            rows.append((ids + [tok.pad_token_id] * max_new_tokens)[:max_new_tokens])
        return np.asarray(rows, np.int32)

    monkeypatch.setattr(caption_eval, "generate", fake_generate)
    c = c.copy_and_resolve_references()
    c.eval.max_new_tokens = 40
    mesh = None
    task = stage2.make_task(c, mesh)
    out = task.evaluate({}, {}, 6)
    assert out["caption_exact"] == 3 / NUM_HELDOUT
    assert out["top_caption_share"] == 9 / NUM_HELDOUT
    assert out["num_images"] == NUM_HELDOUT
    hyps = {i: clean_caption(right.get(i, wrong)) for i in range(NUM_HELDOUT)}
    expected = captioning.caption_metrics({i: [clean_caption(r) for r in refs[i]] for i in hyps}, hyps)
    assert out["bleu_4"] == pytest.approx(expected["bleu_4"]) and out["cider"] == pytest.approx(expected["cider"])
    # Two calls of 8 images (the second padded); every row prompted with "</s> a photo of", left-padded.
    assert [p.shape[0] for p, _ in calls] == [8, 8]
    prompt = [tok.bos_token_id] + tok.encode("a photo of", add_special_tokens=False)
    for _, ids in calls:
        np.testing.assert_array_equal(ids, np.tile(prompt, (8, 1)))


def test_text_lm_context_encoder(tmp_path):
    """`WithContext`: the context (content words of the caption or its sibling) goes in front, out of
    the OPT loss; the rest of the sequence is the plain encoding, shifted; T5 keeps its decoder side."""
    from blip2_jax.data import caption_lm
    cap, other = "a small red circle left of a large blue square", "a large blue square right of a small red circle"
    tok = caption_lm.build_tokenizer([cap, other], str(tmp_path / "opt"), "opt", vocab_size=300)
    lm = tiny_configs.text_lm(tokenizer_path=str(tmp_path / "opt"))
    lm.data.max_text_len = 64
    base = data_pipeline.make_text_encoder(lm.data)
    enc = caption_lm.WithContext(base, tok, 1.0, 64, is_opt=True, drop_words=("a", "of"),
                              siblings={cap: (cap, other)})
    seen = set()
    for seed in range(8):
        out, plain = enc(cap, np.random.default_rng(seed)), base(cap, np.random.default_rng(seed))
        n = int(out["attention_mask"].sum())
        k = n - int(plain["attention_mask"].sum())
        seen.add(tok.decode(out["input_ids"][:k]))
        np.testing.assert_array_equal(out["input_ids"][k:n], plain["input_ids"][plain["attention_mask"] == 1])
        assert (out["labels"][:k] == -100).all()
        np.testing.assert_array_equal(out["labels"][k:n], plain["labels"][:n - k])
    assert seen == {"small red circle left large blue square\n", "large blue square right small red circle\n"}
    # Probability 0: the plain encoding.
    enc0 = caption_lm.WithContext(base, tok, 0.0, 64, is_opt=True)
    np.testing.assert_array_equal(enc0(cap, np.random.default_rng(0))["input_ids"], base(cap)["input_ids"])
