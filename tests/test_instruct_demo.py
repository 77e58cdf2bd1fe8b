"""The InstructBLIP demo (launch/demo_instruct.sh) at tiny sizes: shapes VQA records, the LLaMA text LM on
their instruction text, instruction tuning through `blip2_jax.main.run`, and the held-out VQA JSON.

- The records' answers are checked against the images themselves (the pixels of each palette colour: which
  square is left / on top, which is larger), not against the generator's own scene list.
- `vqa_scores` on predictions whose accuracy and majority share are known by hand.
- The whole path: data -> 8 text-LM steps of a tiny LLaMA (its HF export loads in transformers) -> 4 steps of
  `configs/stage2.py:demo_instruct` at tiny sizes -> the final metrics: `vqa_acc` in [0, 1] and
  `majority_baseline` equal to the majority share counted here from the held-out records.
"""
import collections
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from blip2_jax.data import records, shapes, shapes_vqa
from blip2_jax.evaluate import instruct_vqa
from tests import tiny_configs
from tests.toy_task import compile_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("compile_cache")
NUM_TRAIN, NUM_HELDOUT = 48, 10


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes_vqa"))
    shapes_vqa.main(["--out", out, "--num_train", str(NUM_TRAIN), "--num_heldout", str(NUM_HELDOUT),
                     "--shapes", "square", "--train_shards", "2"])
    return out


def _records(path, prefix):
    return [r for f in records.find_shards(path, prefix) for r in records.read_shard(f)]


def _objects(png: bytes):
    """`{colour: (pixel count, centre x, centre y)}` of the objects in a scene image, from its pixels."""
    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    out = {}
    for name, rgb in shapes.COLORS.items():
        ys, xs = np.nonzero(np.abs(im - np.asarray(rgb)).sum(-1) == 0)
        if len(xs):
            out[name] = (len(xs), xs.mean(), ys.mean())
    return out


def test_answers_agree_with_the_pixels(vqa_dir):
    checked = collections.Counter()
    for rec in _records(vqa_dir, "heldout") + _records(vqa_dir, "train")[:20]:
        assert len(rec.questions) == len(rec.captions) == 6  # squares only: no shape questions
        objs = _objects(rec.image)
        if len(objs) != 2:  # two squares of one colour (sizes differ): the pixels cannot tell them apart
            continue
        (c1, o1), (c2, o2) = objs.items()
        horizontal = abs(o1[1] - o2[1]) > abs(o1[2] - o2[2])
        axis = 1 if horizontal else 2
        first, second = (c1, c2) if o1[axis] < o2[axis] else (c2, c1)  # left / top one first
        where = dict(zip((first, second), ("left", "right") if horizontal else ("top", "bottom")))
        bigger = c1 if o1[0] > o2[0] else c2
        for q, a in zip(rec.questions, rec.captions):
            words = q.rstrip("?").split()
            if q.startswith("what colour is the "):
                assert a == {v: k for k, v in where.items()}[words[-2]], (q, a)
            elif q.startswith("where is the "):
                assert a == where[words[-2]], (q, a)
            elif q.startswith("what size is the "):
                colour = {v: k for k, v in where.items()}[words[-2]]
                # A large square covers ~3x a small one's pixels; two of one size differ only where they touch.
                if max(o1[0], o2[0]) > 1.5 * min(o1[0], o2[0]):
                    assert (a == "large") == (colour == bigger), (q, a)
            else:
                raise AssertionError(f"unexpected question {q!r}")
            checked[shapes_vqa.question_type(q)] += 1
    assert min(checked.values()) >= 20, checked


def test_generation_is_deterministic_and_heldout_scenes_are_new(vqa_dir, tmp_path):
    again = str(tmp_path / "again")
    shapes_vqa.main(["--out", again, "--num_train", str(NUM_TRAIN), "--num_heldout", str(NUM_HELDOUT),
                     "--shapes", "square", "--train_shards", "2"])
    for name in sorted(os.listdir(vqa_dir)):
        if name.endswith(".array_record"):
            with open(os.path.join(vqa_dir, name), "rb") as f, open(os.path.join(again, name), "rb") as g:
                assert f.read() == g.read(), name
    train = {r.image for r in _records(vqa_dir, "train")}
    assert not train & {r.image for r in _records(vqa_dir, "heldout")}
    with open(os.path.join(vqa_dir, "tokenizer", "vocab.txt")) as f:
        vocab = f.read().split()
    for word in ("colour", "where", "question", "answer", "?", ":", "provide", "red", "left"):
        assert word in vocab, word


def test_vqa_scores_by_hand():
    questions = [["what colour is the left square?", "what size is the left square?"],
                 ["what colour is the top square?", "what size is the top square?"],
                 ["what colour is the left square?", "what size is the left square?"]]
    answers = [["red", "small"], ["blue", "small"], ["red", "large"]]
    predictions = {(0, 0): "Red.", (0, 1): "large", (1, 0): "the blue", (1, 1): "small", (2, 0): "green",
                   (2, 1): "large"}
    out = instruct_vqa.vqa_scores(questions, answers, predictions)
    # colour: "Red." and "the blue" normalise to the answers, "green" is wrong; size: 2 of 3.
    assert out["vqa_acc_what_colour"] == pytest.approx(2 / 3) and out["vqa_acc_what_size"] == pytest.approx(2 / 3)
    assert out["vqa_acc"] == pytest.approx(4 / 6)
    # majority answers: colour "red" 2 of 3, size "small" 2 of 3.
    assert out["majority_baseline"] == pytest.approx(4 / 6)
    assert out["num_questions"] == 6
    with pytest.raises(ValueError, match="no predictions"):
        instruct_vqa.vqa_scores(questions, answers, {})


def _majority_share(recs) -> float:
    """The held-out majority-answer share, counted per question type from the records."""
    by_type = collections.defaultdict(list)
    for r in recs:
        for q, a in zip(r.questions, r.captions):
            by_type[" ".join(q.split()[:2])].append(a)
    total = sum(len(v) for v in by_type.values())
    return sum(collections.Counter(v).most_common(1)[0][1] for v in by_type.values()) / total


def test_whole_path_reports_accuracy_and_the_majority_baseline(vqa_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from blip2_jax import main
    lm = tiny_configs.load("text_lm", "demo_instruct_llama")
    lm.model.text.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    lm.data.train_sources.shapes.path = lm.eval_source.path = vqa_dir
    lm.data.tokenizer_path = str(tmp_path / "tokenizer")
    lm.data.qformer_tokenizer_path = os.path.join(vqa_dir, "tokenizer")
    lm.optimizer.warmup_steps = 2
    lm.train.update(total_steps=8, batch_size=16, log_every=4, async_checkpointing=False)
    lm_out = main.run(lm, str(tmp_path / "text_lm"))
    assert lm_out["step"] == 8 and np.isfinite(lm_out["heldout_lm_loss"])
    hf_dir = str(tmp_path / "text_lm" / "hf")
    assert LlamaForCausalLM.from_pretrained(hf_dir).config.num_key_value_heads == 1

    c = tiny_configs.stage2("opt")  # tiny towers; the variant's own settings below
    demo = tiny_configs.load("stage2", "demo_instruct")
    c.model.llm, c.model.instruction_aware = demo.model.llm, True
    c.model.qformer_text.update(demo.model.qformer_text)
    c.data.update({k: demo.data[k] for k in ("instruction_task", "caption_index", "prompt", "max_text_len",
                                             "max_instruction_len", "text_mode")})
    c.init.llm_checkpoint = c.data.tokenizer_path = hf_dir
    c.data.qformer_tokenizer_path = os.path.join(vqa_dir, "tokenizer")
    c.data.train_sources.shapes.update(path=vqa_dir, prefix="train")
    c.eval.source.update(path=vqa_dir, prefix="heldout")
    c.eval.update(batch_size=8, max_new_tokens=demo.eval.max_new_tokens)
    c.train.update(total_steps=4, batch_size=8, log_every=2)
    c.data.global_batch_size = 8
    out = main.run(c, str(tmp_path / "instruct"))
    json.dumps(out)  # main.py prints it as the last line
    assert out["step"] == 4 and np.isfinite(out["loss"])
    assert out["num_questions"] == NUM_HELDOUT * 6  # every question of every held-out image, padding skipped
    assert 0.0 <= out["vqa_acc"] <= 1.0
    assert out["majority_baseline"] == pytest.approx(_majority_share(_records(vqa_dir, "heldout")))
    for kind in ("what_colour", "what_size", "where_is"):
        assert 0.0 <= out[f"vqa_acc_{kind}"] <= 1.0 and 0.0 < out[f"majority_baseline_{kind}"] <= 1.0
