"""Bundled demo data: the coloured-shapes dataset and the scikit-image photographs."""
import collections
import io
import os

import numpy as np
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


def test_photos_dataset(tmp_path):
    path = photos.generate(str(tmp_path))
    recs = records.read_shard(path)
    assert [r.image_id for r in recs] == list(photos.CAPTIONS)
    for r in recs:
        im = Image.open(io.BytesIO(r.image))
        assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) >= 256
        assert r.captions and all(len(c.split()) >= 5 for c in r.captions)
