"""Image decode and the LAVIS train/eval transforms."""
import io

import numpy as np
import pytest
from PIL import Image

from blip2_jax.data import image_ops
from tests.helpers import image_bytes, random_image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def test_eval_transform_is_bicubic_resize_and_clip_normalisation():
    arr = random_image(0, 30, 40)
    out = image_ops.eval_transform(image_bytes(arr), 16)
    resized = np.asarray(Image.fromarray(arr).resize((16, 16), Image.BICUBIC), np.float64)
    np.testing.assert_allclose(out, (resized / 255.0 - MEAN) / STD, atol=1e-5)
    assert out.dtype == np.float32 and out.shape == (16, 16, 3)
    # A decoded uint8 array (TFDS image features) gives the same result as its encoded bytes.
    np.testing.assert_array_equal(image_ops.eval_transform(arr, 16), out)


def test_random_resized_crop_box_follows_torchvision_bounds():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        i, j, h, w = image_ops.random_resized_crop_box(200, 100, rng, scale=(0.5, 1.0))
        assert 0 <= i and i + h <= 100 and 0 <= j and j + w <= 200
        areas.append(h * w / 20000)
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert 0.49 <= min(areas) < 0.55 and max(areas) <= 1.0
    # Fallback for extreme aspect ratios: torchvision's centre crop clamped to ratio 4/3.
    assert image_ops.random_resized_crop_box(1000, 10, rng) == (0, 493, 10, 13)


def test_train_transform_flip_and_determinism():
    data = image_bytes(random_image(1, 48, 64))
    flipped_seen = plain_seen = 0
    for seed in range(12):
        a = image_ops.train_transform(data, 24, np.random.default_rng(seed))
        b = image_ops.train_transform(data, 24, np.random.default_rng(seed))
        np.testing.assert_array_equal(a, b)
        no_flip = image_ops.train_transform(data, 24, np.random.default_rng(seed), hflip=False)
        # Same crop (drawn first), then either mirrored or not.
        if np.array_equal(a, no_flip):
            plain_seen += 1
        else:
            np.testing.assert_array_equal(a, no_flip[:, ::-1])
            flipped_seen += 1
    assert flipped_seen and plain_seen
    # Crops are resized from the chosen box with PIL bicubic.
    rng = np.random.default_rng(3)
    i, j, h, w = image_ops.random_resized_crop_box(64, 48, np.random.default_rng(3))
    ref = Image.open(io.BytesIO(data)).convert("RGB").crop((j, i, j + w, i + h))
    ref = np.asarray(ref.resize((24, 24), Image.BICUBIC), np.float64)
    out = image_ops.train_transform(data, 24, rng, hflip=False)
    np.testing.assert_allclose(out, (ref / 255 - MEAN) / STD, atol=1e-5)


class _FixedRng:
    """Stands in for np.random.Generator where an op draws only its sign."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


@pytest.mark.parametrize("u,offset", [(0.9, -5), (0.1, 5)])
def test_randaug_translate_is_lavis_five_pixels_with_grey_fill(u, offset):
    arr = random_image(2, 20, 30)
    out = np.asarray(image_ops.apply_randaug_op(Image.fromarray(arr), "TranslateX", 5,
                                                _FixedRng(u)))
    # LAVIS: offset = 5/10 * 10 = 5 px, negated if u > 0.5; cv2 M=[[1,0,-offset],[0,1,0]]:
    # out[:, x] = in[:, x + offset], fill 128.
    ref = np.full_like(arr, 128)
    if offset > 0:
        ref[:, :-offset] = arr[:, offset:]
    else:
        ref[:, -offset:] = arr[:, :offset]
    np.testing.assert_array_equal(out, ref)


def test_randaug_colour_ops_match_lavis_formulas():
    arr = random_image(3, 12, 10) // 2 + 40  # values in [40, 167]
    im = Image.fromarray(arr)
    # M=5 gives factor 1.0 for Brightness and Sharpness: identity, as in LAVIS.
    for name in ("Brightness", "Sharpness", "Identity"):
        np.testing.assert_array_equal(
            np.asarray(image_ops.apply_randaug_op(im, name, 5, _FixedRng(0.0))), arr)
    # AutoContrast: per channel, (x - lo) * 255 / (hi - lo).
    lo, hi = arr.min(axis=(0, 1)).astype(int), arr.max(axis=(0, 1)).astype(int)
    table = [np.clip(np.arange(256) * (255 / (hi[c] - lo[c])) - lo[c] * 255 / (hi[c] - lo[c]),
                     0, 255).astype(np.uint8) for c in range(3)]
    ref = np.stack([table[c][arr[..., c]] for c in range(3)], -1)
    out = np.asarray(image_ops.apply_randaug_op(im, "AutoContrast", 5, _FixedRng(0.0)))
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    # Sharpness at M=10 (factor 1.9): LAVIS formula with a 3x3 (1,..,5,..,1)/13 kernel, border kept.
    sharp = np.asarray(image_ops.apply_randaug_op(im, "Sharpness", 10, _FixedRng(0.0)))
    x = arr.astype(np.float64)
    k = np.ones((3, 3)) / 13
    k[1, 1] = 5 / 13
    deg = sum(k[dy + 1, dx + 1] * x[1 + dy:11 + dy, 1 + dx:9 + dx]
              for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    ref = x.copy()
    ref[1:-1, 1:-1] = np.rint(deg) + 1.9 * (x[1:-1, 1:-1] - np.rint(deg))
    assert np.abs(sharp.astype(int) - np.clip(ref, 0, 255).astype(np.uint8).astype(int)).max() <= 1
    assert (sharp[0] == arr[0]).all()


def test_random_augment_applies_each_sampled_op_with_probability_half():
    arr = random_image(4, 32, 32)
    changed = 0
    for seed in range(40):
        out = image_ops.random_augment(Image.fromarray(arr), np.random.default_rng(seed),
                                       ops=("TranslateY",))
        changed += not np.array_equal(np.asarray(out), arr)
    # Two draws of p=0.5 each: unchanged with probability 1/4.
    assert 20 <= changed <= 38
    with pytest.raises(ValueError, match="unknown RandomAugment op"):
        image_ops.apply_randaug_op(Image.fromarray(arr), "Solarise", 5, _FixedRng(0.0))


def test_undecodable_bytes_raise():
    with pytest.raises(Exception):
        image_ops.train_transform(b"not an image", 16, np.random.default_rng(0))
