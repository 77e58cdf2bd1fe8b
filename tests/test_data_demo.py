"""Bundled demo data: the coloured-shapes dataset and the scikit-image photographs."""
import collections
import io
import os

import numpy as np
import pytest
from PIL import Image

from blip2_jax.data import photos, records, shapes


def _colour_centroid(arr, rgb):
    ys, xs = np.nonzero((arr == np.array(rgb, np.uint8)).all(-1))
    return (xs.mean(), ys.mean()) if len(xs) else None


def test_shapes_is_deterministic_distinct_and_faithful(tmp_path):
    a = shapes.generate(str(tmp_path / "a"), num_train=40, num_heldout=120, size=64, train_shards=2)
    b = shapes.generate(str(tmp_path / "b"), num_train=40, num_heldout=120, size=64, train_shards=2)
    for split in ("train", "heldout"):
        for pa, pb in zip(a[split], b[split]):
            assert open(pa, "rb").read() == open(pb, "rb").read(), os.path.basename(pa)
    held = records.read_shard(a["heldout"][0])
    train = [r for p in a["train"] for r in records.read_shard(p)]
    assert len(held) == 120 and len(train) == 40
    caps = [c for r in held for c in r.captions]
    assert len(set(caps)) == len(caps) == 240  # every held-out caption names one image only
    assert max(collections.Counter(caps).values()) / len(held) <= 0.1
    checked = 0
    for r in held + train:
        im = Image.open(io.BytesIO(r.image))
        assert im.size == (64, 64) and r.image_format == "PNG"
        arr = np.asarray(im.convert("RGB"))
        words = r.captions[0].split()
        # "a SIZE COLOUR SHAPE REL a SIZE COLOUR SHAPE", REL one or two words.
        col_a, rel, col_b = words[2], " ".join(words[4:-4]), words[-2]
        assert rel in ("left of", "above")
        ca, cb = _colour_centroid(arr, shapes.COLORS[col_a]), _colour_centroid(arr, shapes.COLORS[col_b])
        assert ca is not None and cb is not None  # both named colours are drawn
        if col_a != col_b:  # the named relation holds between the two colours' centroids
            axis = 0 if rel == "left of" else 1
            assert ca[axis] < cb[axis], (r.captions[0], ca, cb)
            checked += 1
        assert r.captions[1].endswith(" ".join(words[:4][1:]))  # mirrored wording of the scene
    assert checked > 100


def test_shapes_subset_draws_only_those_shapes_and_if_changed_regenerates_only_on_new_arguments(tmp_path):
    out = str(tmp_path / "squares")
    args = ["--out", out, "--num_train", "12", "--num_heldout", "30", "--size", "48", "--train_shards", "1",
            "--shapes", "square"]
    shapes.main(args)
    assert len(shapes.all_combinations(["square"])) == 12 * 2 * 11  # 2 sizes x 6 colours, 2 relations
    held = records.read_shard(os.path.join(out, records.shard_name("heldout", 0, 1)))
    assert len({r.captions[0] for r in held}) == 30
    for r in held:
        words = r.captions[0].split()
        assert words[3] == words[-1] == "square", r.captions[0]
        arr = np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB"))
        for colour in {words[2], words[-2]}:  # a square fills its bounding box exactly
            ys, xs = np.nonzero((arr == np.array(shapes.COLORS[colour], np.uint8)).all(-1))
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            assert len(ys) == box or words[2] == words[-2], (r.captions[0], len(ys), box)
    assert shapes.read_manifest(out)["shapes"] == ["square"]

    shard = os.path.join(out, records.shard_name("train", 0, 1))
    before = os.stat(shard).st_mtime_ns
    shapes.main(args + ["--if_changed"])  # same arguments: nothing rewritten
    assert os.stat(shard).st_mtime_ns == before
    shapes.main(args[:-1] + ["square,circle", "--if_changed"])  # new arguments: regenerated
    assert shapes.read_manifest(out)["shapes"] == ["circle", "square"]
    assert os.stat(shard).st_mtime_ns != before
    with pytest.raises(ValueError, match="hexagon"):
        shapes.main(args[:-1] + ["hexagon"])


def test_photos_dataset(tmp_path):
    path = photos.generate(str(tmp_path))
    recs = records.read_shard(path)
    assert [r.image_id for r in recs] == list(photos.CAPTIONS)
    for r in recs:
        im = Image.open(io.BytesIO(r.image))
        assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) >= 256
        assert r.captions and all(len(c.split()) >= 5 for c in r.captions)
