"""`blip2_jax.evaluate.run` on tiny random HF BLIP-2 models and tiny datasets written here.

References: captions from `blip2_jax.generate` + the processor called directly on the same pixels and
prompts, and `caption_metrics` on them; hand-computed VQA accuracies for forced answers; retrieval
scores from HF `Blip2ForImageTextRetrieval` (ITC for all pairs, ITM for all pairs, re-ranked here)
and `recall_at_k` on them.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from transformers import Blip2ForConditionalGeneration

import blip2_jax
from blip2_jax.data import records
from blip2_jax.data import text as data_text
from blip2_jax.data.image_ops import CLIP_MEAN, CLIP_STD
from blip2_jax.evaluate import captioning, retrieval, run, vqa_data
from blip2_jax.evaluate.load import load_config_file
from tests import hf_tiny, tiny_configs
from tests.helpers import image_bytes
from tests.helpers import subprocess_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 28  # the tiny models' image size: images are written at it, so resizing is the identity
CAPTIONS = [("a red circle", "a small red circle"), ("a blue square", "blue square left of a circle"),
            ("a green triangle", "a triangle"), ("two objects", "a large yellow diamond")]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


def _pixels(arrs):
    """CLIP-normalised NHWC float32, computed here (no resize: the images are SIZE x SIZE)."""
    x = np.stack(arrs).astype(np.float32) / 255.0
    return ((x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)).astype(np.float32)


def _config(variant, **overrides):
    c = load_config_file(os.path.join(REPO, "configs", "eval.py") + ":" + variant)
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def opt_dir(hf_captioner):
    """A tiny BLIP-2 OPT with a byte-level BPE tokenizer ("\\n" = EOS, as BLIP-2 OPT)."""
    return hf_captioner("opt")[2]


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory):
    """4 records: image, UNDECODABLE image, image, image (ids 101, 102, 103, 104)."""
    root = tmp_path_factory.mktemp("eval_caption_data")
    arrs = _images(3)
    blobs = [image_bytes(arrs[0]), b"not an image", image_bytes(arrs[1]), image_bytes(arrs[2])]
    recs = [records.ImageText(b, CAPTIONS[i], str(101 + i), "test", "PNG") for i, b in enumerate(blobs)]
    records.write_shard(str(root / records.shard_name("test", 0, 1)), recs)
    return str(root), arrs


def test_caption_cli_matches_generate_and_metrics(opt_dir, caption_shards, tmp_path):
    data, arrs = caption_shards
    out = tmp_path / "captions.json"
    gen = dict(num_beams=2, max_new_tokens=5, min_new_tokens=2)
    cmd = [sys.executable, "-m", "blip2_jax.evaluate.run", "--config=configs/eval.py:coco_caption",
           f"--config.model={opt_dir}", f"--config.data.source.path={data}", "--config.data.source.prefix=test",
           f"--config.image_size={SIZE}", "--config.batch_size=2", f"--out={out}"]
    cmd += [f"--config.generation.{k}={v}" for k, v in gen.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags()}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    results = json.loads(out.read_text())

    # Reference: the same batches (2 rows; the undecodable record is a zero image) through generate.
    model, params = blip2_jax.from_pretrained(opt_dir)
    processor = blip2_jax.load_processor(opt_dir)
    ids, mask = processor.tokenize(["a photo of"] * 2)
    batches = [np.concatenate([_pixels(arrs[:1]), np.zeros((1, SIZE, SIZE, 3), np.float32)]), _pixels(arrs[1:])]
    texts = []
    for px in batches:
        toks = blip2_jax.generate(model, params, px, ids, mask, length_penalty=1.0, repetition_penalty=1.0, **gen)
        texts += processor.decode(np.asarray(toks))
    want = {101: texts[0], 103: texts[2], 104: texts[3]}
    from blip2_jax.data.text import clean_caption
    assert any(want.values())  # the random model says something, so the comparison means something
    assert results == [{"image_id": k, "caption": clean_caption(v)} for k, v in want.items()]
    metrics = captioning.caption_metrics({k: list(CAPTIONS[k - 101]) for k in want},
                                         {k: clean_caption(v) for k, v in want.items()})
    assert summary["num_images"] == 3 and summary["num_skipped"] == 1 and summary["task"] == "caption"
    for k, v in metrics.items():
        assert summary["metrics"][k] == pytest.approx(v, abs=1e-12), k


@pytest.fixture(scope="module")
def vqa_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_vqa")
    arrs = _images(3, seed=1)
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(root / f"im{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    rows = [("im0.png", 1, 'What color is the "ball"?', ["2"] * 10),
            ("broken.png", 2, "Is it broken?", ["yes"] * 10),
            ("im1.png", 3, "How many: circles.", ["red", "red"] + ["blue"] * 8),
            ("im2.png", 4, "What (animal) is this?", ["cat"] * 10)]
    path = root / "questions.jsonl"
    path.write_text("\n".join(json.dumps({"image": im, "question_id": q, "question": t, "answers": a})
                              for im, q, t, a in rows) + "\n")
    return str(path), arrs


# blip_question by hand: lowercase, `.!"()*#:;~` deleted, "?" kept.
PROCESSED = {1: "what color is the ball?", 3: "how many circles", 4: "what animal is this?"}


def test_vqa_answers_match_generate(opt_dir, vqa_files, tmp_path):
    path, arrs = vqa_files
    c = _config("vqav2", model=opt_dir, image_size=SIZE, batch_size=2)
    c.vqa.questions = path
    c.generation.update(num_beams=2, max_new_tokens=3, prompt_pad_multiple=1)
    out = tmp_path / "answers.json"
    summary = run.evaluate(c, out=str(out))
    assert summary["num_questions"] == 3 and summary["num_skipped"] == 1  # broken.png skipped
    got = {r["question_id"]: r["answer"] for r in json.loads(out.read_text())}

    model, params = blip2_jax.from_pretrained(opt_dir)
    processor = blip2_jax.load_processor(opt_dir)
    prompts = [f"Question: {PROCESSED[q]} Short answer:" for q in (1, 3, 4, 4)]  # last batch padded with a copy
    want = []
    for rows, px in ((prompts[:2], _pixels(arrs[:2])), (prompts[2:], _pixels([arrs[2], arrs[2]]))):
        ids, mask = processor.tokenize(rows)
        toks = blip2_jax.generate(model, params, px, ids, mask, num_beams=2, max_new_tokens=3, min_new_tokens=1,
                                  length_penalty=0.0, repetition_penalty=1.0)  # OPT: LAVIS predict_answers lp 0
        want += processor.decode(np.asarray(toks))
    assert any(want[:3])
    assert got == {1: want[0], 3: want[1], 4: want[2]}


def test_vqa_accuracy_of_forced_answers(opt_dir, vqa_files, monkeypatch):
    path, _ = vqa_files
    forced = {PROCESSED[1]: "Two", PROCESSED[3]: "red", PROCESSED[4]: "the dog"}
    seen = []

    def fake_generate(loaded, processor, pixels, prompts, config):
        seen.extend(prompts)
        return [forced[p[len("Question: "):-len(" Short answer:")]] for p in prompts]

    monkeypatch.setattr(run, "generate_texts", fake_generate)
    c = _config("vqav2", model=opt_dir, image_size=SIZE, batch_size=4)
    c.vqa.questions = path
    summary = run.evaluate(c)
    # "Two" -> "2": 10/10 humans -> 1; "red": 2 of 10 humans -> (8 * 2/3 + 2 * 1/3) / 10 = 0.6; "dog": 0.
    assert summary["metrics"]["accuracy"] == pytest.approx((1.0 + 0.6 + 0.0) / 3, abs=1e-12)
    assert len(seen) == 4  # 3 readable questions, padded to the batch of 4

    forced.update({PROCESSED[1]: "The Dog.", PROCESSED[3]: "red"})  # GQA: normalised exact match
    gqa = os.path.join(os.path.dirname(path), "gqa.jsonl")
    with open(gqa, "w") as f:
        f.write(json.dumps({"image": "im0.png", "question_id": "a", "question": 'What color is the "ball"?',
                            "answers": ["dog"]}) + "\n")
        f.write(json.dumps({"image": "im1.png", "question_id": "b", "question": "How many: circles.",
                            "answers": ["blue"]}) + "\n")
    c = _config("gqa", model=opt_dir, image_size=SIZE, batch_size=2)
    c.vqa.questions = gqa
    assert run.evaluate(c)["metrics"]["accuracy"] == pytest.approx(0.5, abs=1e-12)


def test_bad_inputs_fail_with_clear_messages(vqa_files, tmp_path):
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        _config("nope")
    missing = str(tmp_path / "no_model")
    with pytest.raises(FileNotFoundError, match="no_model"):
        run.evaluate(_config("coco_caption", model=missing))
    path, _ = vqa_files
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"image": "gone.jpg", "question_id": 1, "question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        vqa_data.read_questions(str(bad))
    assert data_text.blip_question('What "is" THIS (thing)?!  ') == "what is this thing?"


# -- retrieval ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retrieval_setup(hf_retrieval, tmp_path_factory):
    hf, model_dir = hf_retrieval("freq2")  # its vocab.txt covers CAPTIONS
    root = tmp_path_factory.mktemp("eval_retrieval")
    arrs = _images(4, seed=2)
    recs = [records.ImageText(image_bytes(a), CAPTIONS[i], str(i), "test", "PNG") for i, a in enumerate(arrs)]
    records.write_shard(str(root / records.shard_name("test", 0, 1)), recs)
    return hf, model_dir, str(root), arrs


def _hf_scores(hf, model_dir, arrs, k):
    return hf_tiny.hf_retrieval_scores(hf, model_dir, arrs, [t for caps in CAPTIONS for t in caps], k)


def test_retrieval_matches_hf_itc_itm_rerank(retrieval_setup):
    hf, model_dir, data, arrs = retrieval_setup
    k = 3
    sims, ref_i2t, ref_t2i = _hf_scores(hf, model_dir, arrs, k)
    assert sims.shape == (4, 8)
    txt2img = [i for i, caps in enumerate(CAPTIONS) for _ in caps]
    img2txt = [[2 * i, 2 * i + 1] for i in range(4)]
    want = retrieval.recall_at_k(ref_i2t, ref_t2i, txt2img, img2txt)

    c = _config("coco_retrieval", model=model_dir, image_size=SIZE, batch_size=4)
    c.data.source.update(path=data, prefix="test")
    c.retrieval.k_test = k
    summary = run.evaluate(c)
    assert summary["num_images"] == 4 and summary["num_texts"] == 8 and summary["num_skipped"] == 0
    assert summary["metrics"] == pytest.approx(want, abs=1e-12)

    # The score matrices themselves, through the same shared code.
    from blip2_jax.evaluate import load, retrieval_eval
    loaded = load.load_model(model_dir)
    scorer = retrieval_eval.RetrievalScorer(loaded.model)
    feats, embeds, _ = scorer.image_features(loaded.params, [{"image": _pixels(arrs), "valid": np.ones(4, bool),
                                                              "image_id": np.arange(4)}])
    texts, _, _ = retrieval_eval.caption_texts(CAPTIONS, 50)
    ids, mask = retrieval_eval.encode_texts(loaded.tokenizer, texts, 35)
    i2t, t2i = scorer.scores(loaded.params, feats, embeds, ids, mask, k_test=k, batch_size=4)
    np.testing.assert_allclose(i2t, ref_i2t, atol=1e-4)
    np.testing.assert_allclose(t2i, ref_t2i, atol=1e-4)
    assert (i2t == -100).sum() == 4 * (8 - k) and (t2i == -100).sum() == 8 * (4 - k)


def test_stage2_workdir_gives_the_hf_directory_captions(opt_dir, caption_shards, tmp_path):
    """A workdir (newest checkpoint's trainable params + its train config) captions exactly as the HF
    directory holding the same weights (the frozen towers come from the config's checkpoints)."""
    from blip2_jax import checkpoint as checkpoint_lib
    from blip2_jax.models.blip2 import split_frozen

    hf = Blip2ForConditionalGeneration.from_pretrained(opt_dir)
    hf.language_model.save_pretrained(str(tmp_path / "llm"))
    tc = tiny_configs.stage2("opt")  # the sizes of opt_dir's model
    tc.init.update(vision_checkpoint=opt_dir, llm_checkpoint=str(tmp_path / "llm"))
    tc.data.tokenizer_path = opt_dir

    _, params = blip2_jax.from_pretrained(opt_dir)
    trainable, _ = split_frozen(params)
    trainable = {k: np.asarray(v) if not isinstance(v, dict) else v for k, v in trainable.items()}
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "workdir" / "checkpoints"), async_save=False)
    ckpt.save(3, {"step": np.int32(3), "params": trainable, "rng": np.zeros(2, np.uint32)}, {"index": 0})
    ckpt.close()

    data, _ = caption_shards
    c = _config("coco_caption", image_size=SIZE, batch_size=2)
    c.data.source.update(path=data, prefix="test")
    c.generation.update(num_beams=1, max_new_tokens=4, min_new_tokens=0)
    with pytest.raises(FileNotFoundError, match="run_config.json does not exist"):
        run.evaluate(_config("coco_caption", model=str(tmp_path / "workdir")))
    from_workdir = run.evaluate(_with_model(c, str(tmp_path / "workdir")), train_config=tc,
                                out=str(tmp_path / "a.json"))
    from_hf = run.evaluate(_with_model(c, opt_dir), out=str(tmp_path / "b.json"))
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a == b and len(a) == 3 and any(r["caption"] for r in a)
    assert from_workdir["metrics"] == from_hf["metrics"]

    # A run records its config (the train loop calls save_run_config): then neither the evaluation nor
    # the public `from_pretrained` needs to be told, and relative paths resolve from where it ran.
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        tc.init.llm_checkpoint = "llm"  # relative to the directory the run started in
        checkpoint_lib.save_run_config(str(tmp_path / "workdir"), tc)
    finally:
        os.chdir(here)
    recorded = run.evaluate(_with_model(c, str(tmp_path / "workdir")), out=str(tmp_path / "c.json"))
    assert recorded["metrics"] == from_hf["metrics"]
    model, params = blip2_jax.from_pretrained(str(tmp_path / "workdir"))
    _, hf_params = blip2_jax.from_pretrained(opt_dir)
    assert type(model).__name__ == "Blip2OPT"
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params),
                 jax.tree.map(np.asarray, hf_params))
    proc, hf_proc = blip2_jax.load_processor(str(tmp_path / "workdir")), blip2_jax.load_processor(opt_dir)
    assert (proc.image_size, proc.eos_token_ids) == (SIZE, hf_proc.eos_token_ids)
    for got, want in zip(proc.tokenize(["a photo of", "x"]), hf_proc.tokenize(["a photo of", "x"])):
        np.testing.assert_array_equal(got, want)


def _with_model(c, path):
    c = c.copy_and_resolve_references()
    c.model = path
    return c
