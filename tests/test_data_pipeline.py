"""The grain train/eval pipeline: contract, caption choice, mixing, process slices, drops, resume."""
import json
import logging

import numpy as np
import pytest
from absl import flags

from blip2_jax import config_sections
from blip2_jax.data import image_ops, pipeline, records, testing, text, tfds_builder
from tests.helpers import image_bytes

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_data")
    a = [records.ImageText(image_bytes(i), (f"image {NUMBER_WORDS[i]} first", f"image {NUMBER_WORDS[i]} second"),
                           f"a{i}", "a") for i in range(12)]
    b = [records.ImageText(image_bytes(100 + i), (f"other {NUMBER_WORDS[i]}",), f"b{i}", "b")
         for i in range(4)]
    z = [records.ImageText(image_bytes(200), ("good zero",), "z0", "z"),
         records.ImageText(b"\x89PNG broken", ("bad one",), "bad", "z"),
         records.ImageText(image_bytes(202), ("good two",), "z2", "z")]
    for name, recs, shards in (("a", a, 2), ("b", b, 1), ("z", z, 1)):
        (root / name).mkdir()
        bounds = np.linspace(0, len(recs), shards + 1).astype(int)
        for k in range(shards):
            records.write_shard(str(root / name / records.shard_name("train", k, shards)),
                                recs[bounds[k]:bounds[k + 1]])
    return root


def _config(data, sources, **kw):
    c = config_sections.data_config()
    for name, weight in sources.items():
        c.train_sources[name] = config_sections.source_config(str(data / name), weight=weight)
    c.tokenizer_path = testing.bert_vocab_dir()
    c.image_size = 16
    c.global_batch_size = 4
    c.read_threads = 2
    c.read_buffer_size = 8
    c.update(kw)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _rows(batches, key):
    return np.concatenate([b[key] for b in batches])


def _captions(data, name):
    return [r.captions for f in records.find_shards(str(data / name)) for r in records.read_shard(f)]


def test_stage1_contract_caption_choice_and_epochs(data, bert_tokenizer):
    it = pipeline.make_train_iterator(_config(data, {"a": 1.0}), seed=3, process_index=0,
                                      process_count=1)
    batches = _take(it, 9)  # 36 elements = 3 epochs of 12
    b = batches[0]
    assert set(b) == {"image", "input_ids", "attention_mask", "image_id"}
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["input_ids"].shape == (4, 32) and b["input_ids"].dtype == np.int32
    assert b["attention_mask"].dtype == np.int32 and b["image_id"].dtype == np.int32
    ids = _rows(batches, "image_id")
    for epoch in range(3):  # Each epoch is a fresh permutation of all records.
        assert sorted(ids[12 * epoch:12 * epoch + 12]) == list(range(12))
    assert not np.array_equal(ids[:12], ids[12:24])
    caps = _captions(data, "a")
    chosen = {}
    for tokens, i in zip(_rows(batches, "input_ids"), ids):
        caption = bert_tokenizer.decode(tokens, skip_special_tokens=True)
        assert caption in caps[i]  # the caption belongs to the image it comes with
        chosen.setdefault(int(i), set()).add(caption)
    assert any(len(c) == 2 for c in chosen.values())  # different captions on different visits
    # Same seed: the same batches; another seed: another order.
    again = _take(pipeline.make_train_iterator(_config(data, {"a": 1.0}), seed=3,
                                               process_index=0, process_count=1), 2)
    for x, y in zip(again, batches):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = _take(pipeline.make_train_iterator(_config(data, {"a": 1.0}), seed=4,
                                               process_index=0, process_count=1), 3)
    assert not np.array_equal(_rows(other, "image_id"), ids[:12])


def test_mixture_weights_and_process_slices(data):
    cfg = _config(data, {"a": 3.0, "b": 1.0}, global_batch_size=8)
    full = _take(pipeline.make_train_iterator(cfg, seed=0, process_index=0, process_count=1), 4)
    ids = _rows(full, "image_id")
    assert (ids >= 12).sum() == 8  # weights 3:1 -> a quarter of the 32 elements from b (ids 12..15)
    # Each process reads its contiguous half of every global batch (rows 4p..4p+3 of the 8), with the
    # same augmentation and caption choice as a single process applies at that position.
    for p in range(2):
        mine = _take(pipeline.make_train_iterator(cfg, seed=0, process_index=p, process_count=2), 4)
        assert mine[0]["image"].shape[0] == 4
        for key in ("image_id", "image", "input_ids"):
            np.testing.assert_array_equal(_rows(mine, key), np.concatenate([b[key][4 * p:4 * p + 4] for b in full]))


def _same_batches(got, expected):
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _global(iterators, n):
    """n global batches: the processes' batches side by side, as `sharding.make_global_batch` lays them out."""
    per_process = [_take(it, n) for it in iterators]
    return [{k: np.concatenate([b[i][k] for b in per_process]) for k in per_process[0][i]} for i in range(n)]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_state_reshards_onto_another_process_count(data, before, after):
    """A checkpoint's data state from `before` processes resumes on `after`: the global batches go on
    exactly as the uninterrupted run's (no element repeated or skipped). Every new process is given
    process 0's saved state, as `checkpoint.Checkpointer.restore` does."""
    cfg = _config(data, {"a": 3.0, "b": 1.0}, global_batch_size=8)
    expected = _global([pipeline.make_train_iterator(cfg, seed=5, process_index=0, process_count=1)], 5)
    old = [pipeline.make_train_iterator(cfg, seed=5, process_index=p, process_count=before) for p in range(before)]
    _same_batches(_global(old, 2), expected[:2])
    state = json.loads(json.dumps(old[0].get_state()))
    assert state["global_position"] == 16
    new = [pipeline.make_train_iterator(cfg, seed=5, process_index=p, process_count=after) for p in range(after)]
    for it in new:
        it.set_state(state)
    _same_batches(_global(new, 3), expected[2:])
    # ... and the new layout's own checkpoints restore exactly in that layout.
    again = pipeline.make_train_iterator(cfg, seed=5, process_index=0, process_count=after)
    again.set_state(json.loads(json.dumps(new[0].get_state())))
    assert again.global_position == new[0].global_position == 40


def test_bad_record_is_dropped_counted_and_logged(data, caplog):
    it = pipeline.make_train_iterator(_config(data, {"z": 1.0}, global_batch_size=2, shuffle=False),
                                      seed=0, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING):
        batches = _take(it, 3)
    assert _rows(batches, "image_id").tolist() == [0, 2] * 3
    assert it.num_dropped == 3  # once per epoch
    assert "z:bad" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(data, workers):
    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    cfg = _config(data, {"a": 2.0, "z": 1.0}, num_workers=workers)
    it = pipeline.make_train_iterator(cfg, seed=7, process_index=0, process_count=1)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 4)
    dropped = it.num_dropped
    resumed = pipeline.make_train_iterator(cfg, seed=7, process_index=0, process_count=1)
    resumed.set_state(state)
    got = _take(resumed, 4)
    for x, y in zip(got, expected):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert resumed.num_dropped == dropped > 0


def test_state_of_the_earlier_format_still_resumes(data):
    """A data state saved before states had a global position and a layout (`{"grain", "num_dropped"}`)
    restores exactly, in the layout it was saved in; its run's later states have no global position (the
    batches before the restore are unknown), so they restore in that layout only."""
    cfg = _config(data, {"a": 2.0, "z": 1.0})
    it = pipeline.make_train_iterator(cfg, seed=7, process_index=0, process_count=1)
    _take(it, 3)
    old = {k: v for k, v in it.get_state().items() if k in ("grain", "num_dropped")}
    expected = _take(it, 2)
    resumed = pipeline.make_train_iterator(cfg, seed=7, process_index=0, process_count=1)
    resumed.set_state(json.loads(json.dumps(old)))
    _same_batches(_take(resumed, 2), expected)
    assert resumed.global_position is None and "global_position" not in resumed.get_state()


def test_worker_processes_yield_the_global_batches_in_order_and_their_state_reshards(data):
    """grain's workers each read whole global batches (w, w+W, ...): the batches equal the in-process
    pipeline's, and a state taken after an odd number of batches resumes on another worker count."""
    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    cfg = _config(data, {"a": 3.0, "b": 1.0}, global_batch_size=8)
    expected = _take(pipeline.make_train_iterator(cfg, seed=2, process_index=0, process_count=1), 5)
    cfg2 = _config(data, {"a": 3.0, "b": 1.0}, global_batch_size=8, num_workers=2)
    workers = pipeline.make_train_iterator(cfg2, seed=2, process_index=0, process_count=1)
    _same_batches(_take(workers, 3), expected[:3])
    state = json.loads(json.dumps(workers.get_state()))
    resumed = pipeline.make_train_iterator(cfg, seed=2, process_index=0, process_count=1)
    resumed.set_state(state)
    _same_batches(_take(resumed, 2), expected[3:])


def test_stage2_opt_and_t5_batches(data, tokenizer_dir):
    opt = _take(pipeline.make_train_iterator(
        _config(data, {"b": 1.0}, text_mode="opt", tokenizer_path=tokenizer_dir("opt")),
        seed=0, process_index=0, process_count=1), 1)[0]
    assert set(opt) == {"image", "input_ids", "attention_mask", "labels", "image_id"}
    assert (opt["input_ids"][:, 0] == 2).all()
    np.testing.assert_array_equal(opt["labels"],
                                  np.where(opt["attention_mask"] == 1, opt["input_ids"], -100))
    t5 = _take(pipeline.make_train_iterator(
        _config(data, {"b": 1.0}, text_mode="t5_prefix", tokenizer_path=tokenizer_dir("t5")),
        seed=0, process_index=0, process_count=1), 1)[0]
    assert set(t5) == {"image", "input_ids", "attention_mask", "decoder_input_ids",
                       "decoder_attention_mask", "labels", "image_id"}
    assert all(v.dtype in (np.int32, np.float32) for v in t5.values())
    tok = text.load_tokenizer(tokenizer_dir("t5"))
    caps = _captions(data, "b")
    for row in range(4):  # encoder prefix + decoder suffix = the record's caption
        enc = t5["input_ids"][row][t5["attention_mask"][row] == 1][:-1].tolist()
        dec = t5["labels"][row][t5["labels"][row] != -100][:-1].tolist()
        assert tok.decode(enc + dec) == caps[t5["image_id"][row] - 0][0]


def test_tfds_source_eval_dataset_and_global_batch(data, bert_tokenizer, tmp_path):
    from blip2_jax import sharding

    tfds_builder.prepare_tfds({"train": str(data / "a")}, str(tmp_path), name="tiny_a")
    cfg = _config(data, {})
    cfg.train_sources.t = config_sections.source_config(tfds_name="tiny_a", tfds_data_dir=str(tmp_path))
    cfg.global_batch_size = 8
    batch = next(pipeline.make_train_iterator(cfg, seed=0, process_index=0, process_count=1))
    tfds_caps = pipeline.read_captions(cfg.train_sources.t)
    for tokens, i in zip(batch["input_ids"], batch["image_id"]):
        assert bert_tokenizer.decode(tokens, skip_special_tokens=True) in tfds_caps[i]
    # Global arrays on an 8-device mesh from the per-process batch.
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    glob = sharding.make_global_batch(batch, mesh)
    assert glob["image"].shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(glob["input_ids"]), batch["input_ids"])
    # Eval: record order, split over processes, padded to whole batches.
    src = config_sections.source_config(str(data / "a"))
    caps = _captions(data, "a")
    assert pipeline.read_captions(src) == [list(c) for c in caps]
    raw = [r.image for f in records.find_shards(str(data / "a")) for r in records.read_shard(f)]
    seen = []
    for p in range(2):
        batches = list(pipeline.make_eval_dataset(cfg, src, batch_size=4, process_index=p,
                                                  process_count=2))
        assert len(batches) == 2  # 6 records per process -> 2 batches of 4, 2 padding rows
        ids, valid = _rows(batches, "image_id"), _rows(batches, "valid")
        assert valid.tolist() == [True] * 6 + [False] * 2
        assert ids[:6].tolist() == list(range(p, 12, 2))
        for img, i in zip(_rows(batches, "image")[:6], ids[:6]):
            np.testing.assert_array_equal(img, image_ops.eval_transform(raw[i], 16))
        seen += ids[:6].tolist()
    assert sorted(seen) == list(range(12))


def test_caption_iterator_blocks_and_state_reshard():
    """The text LM's caption iterator: process p reads its contiguous block of each global batch, and its
    state (the global position) resumes on another process count with the uninterrupted batches."""
    from blip2_jax.data import caption_lm

    captions = [f"caption {i}" for i in range(10)]
    encode = lambda caption, rng: {"id": np.int32(caption.split()[1]), "draw": rng.random()}  # noqa: E731
    make = lambda p, n: caption_lm.CaptionIterator(captions, encode, 4, seed=1, process_index=p, process_count=n)  # noqa: E731
    expected = _global([make(0, 1)], 5)
    two = [make(p, 2) for p in range(2)]
    _same_batches(_global(two, 2), expected[:2])
    state = json.loads(json.dumps(two[1].get_state()))
    one = make(0, 1)
    one.set_state(state)
    _same_batches(_global([one], 3), expected[2:])
    legacy = make(0, 1)
    legacy.set_state({"index": 8})  # the state's name before it re-sharded
    _same_batches(_global([legacy], 3), expected[2:])


def test_size_balanced_mixing_weights_sources_by_the_square_root_of_their_size(data):
    """`data.source_weighting="sqrt_size"` (InstructBLIP's size-balanced sampling): sources a (12 records) and
    b (4 records) at equal `weight` mix as sqrt(12) : sqrt(4), and `weight` still scales each source."""
    cfg = _config(data, {"a": 1.0, "b": 1.0}, global_batch_size=8, source_weighting="sqrt_size")
    assert pipeline.mixture_weights(cfg, [("a", 12), ("b", 4)]) == pytest.approx([12 ** 0.5, 2.0])
    cfg.train_sources.b.weight = 3.0
    assert pipeline.mixture_weights(cfg, [("a", 12), ("b", 4)]) == pytest.approx([12 ** 0.5, 6.0])
    cfg.train_sources.b.weight = 1.0
    ids = _rows(_take(pipeline.make_train_iterator(cfg, seed=0, process_index=0, process_count=1), 8), "image_id")
    share_b = float((ids >= 12).mean())  # b's ids are 12..15
    assert share_b == pytest.approx(2 / (2 + 12 ** 0.5), abs=0.08)  # 0.366 of 64 elements
    cfg.source_weighting = "sizes"
    with pytest.raises(ValueError, match="data.source_weighting='sizes'"):
        pipeline.mixture_weights(cfg, [("a", 12), ("b", 4)])
