"""Stage-1 retrieval eval (`retrieval_eval.evaluator`, what stage-1 training runs) on a held-out split with an undecodable image.

A tiny random HF `Blip2ForImageTextRetrieval` is loaded as our stage-1 model; the held-out shard has
five records, the second one's image bytes corrupt. Reference: HF ITC similarities and ITM logits of
the four decodable images against their own captions only, LAVIS's top-k re-ranking done here, and
`recall_at_k` on those scores.
"""
import numpy as np
import pytest

from blip2_jax.data import records
from blip2_jax.evaluate import load, retrieval, retrieval_eval
from tests import hf_tiny, tiny_configs
from tests.helpers import image_bytes

SIZE = 28  # the tiny model's image size: images are written at it, so resizing is the identity
K_TEST = 3
BAD = 1    # the record whose image bytes are corrupt
CAPTIONS = [("a red circle", "a small red circle"), ("a blue square", "blue square left of a circle"),
            ("a green triangle", "a triangle"), ("two objects", "a large yellow diamond"),
            ("a yellow square", "two circles left of a square")]


@pytest.fixture(scope="module")
def setup(hf_retrieval, tmp_path_factory):
    hf, model_dir = hf_retrieval("freq2")  # its vocab.txt covers CAPTIONS
    root = tmp_path_factory.mktemp("stage1_retrieval")
    rng = np.random.default_rng(3)
    arrs = [rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8) for _ in CAPTIONS]
    blobs = [b"\x89PNG not really" if i == BAD else image_bytes(a) for i, a in enumerate(arrs)]
    recs = [records.ImageText(b, CAPTIONS[i], str(i), "heldout", "PNG") for i, b in enumerate(blobs)]
    records.write_shard(str(root / records.shard_name("heldout", 0, 1)), recs)
    return hf, model_dir, str(root), arrs


def _reference_recall(hf, model_dir, arrs, captions, k):
    """HF scores of `arrs` x their captions, LAVIS's ITM re-ranking of the top k, then recall@K."""
    _, i2t, t2i = hf_tiny.hf_retrieval_scores(hf, model_dir, arrs, [t for caps in captions for t in caps], k)
    txt2img = [i for i, caps in enumerate(captions) for _ in caps]
    img2txt, n = [], 0
    for caps in captions:
        img2txt.append(list(range(n, n + len(caps))))
        n += len(caps)
    return retrieval.recall_at_k(i2t, t2i, txt2img, img2txt)


def test_stage1_eval_skips_an_undecodable_image_and_matches_hf(setup):
    hf, model_dir, data, arrs = setup
    good = [i for i in range(len(CAPTIONS)) if i != BAD]
    want = _reference_recall(hf, model_dir, [arrs[i] for i in good], [CAPTIONS[i] for i in good], K_TEST)

    c = tiny_configs.stage1()
    assert c.data.image_size == SIZE
    c.data.max_text_len = 35
    c.eval.source.update(path=data, prefix="heldout")
    c.eval.batch_size = 2  # 3 batches: the corrupt row and the padding row are both invalid
    c.eval.k_test = K_TEST
    loaded = load.load_model(model_dir)
    evaluate = retrieval_eval.evaluator(c, loaded.model, loaded.tokenizer)
    got = evaluate(loaded.params, 0)
    assert got == pytest.approx(want, abs=1e-12)
    # Over 4 images: every recall is a multiple of 1/4 (images) or 1/8 (texts).
    assert got["tr_r1"] * 4 == pytest.approx(round(got["tr_r1"] * 4))
    assert got["ir_r1"] * 8 == pytest.approx(round(got["ir_r1"] * 8))
