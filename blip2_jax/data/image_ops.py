"""Image decoding and the LAVIS train/eval image transforms, in PIL and numpy.

- `blip2_image_train`: RandomResizedCrop(size, scale=(0.5, 1.0), bicubic) -> horizontal flip (p=0.5)
  -> to float -> CLIP mean/std. `blip_image_train` adds `RandomAugment(2, 5, [Identity, AutoContrast,
  Brightness, Sharpness, Equalize, ShearX, ShearY, TranslateX, TranslateY, Rotate])` after the flip.
- `blip_image_eval`: bicubic resize to (size, size) -> to float -> CLIP mean/std.

RandomResizedCrop follows torchvision's parameter draw (10 tries, then a centre crop) and resizes the
crop with PIL's bicubic filter, as torchvision does for PIL images. RandomAugment follows LAVIS's
`lavis/processors/randaugment.py` (level M out of 10; fill 128; each of the N sampled ops applied
with probability 0.5); LAVIS implements the geometric ops with OpenCV, here PIL does them, which
differs only in sub-pixel sampling. Note that at M=5 Brightness and Sharpness have factor 1.0, i.e.
they are the identity in LAVIS too. All randomness comes from the `np.random.Generator` passed in.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

from blip2_jax.config_sections import CLIP_MEAN, CLIP_STD

RANDAUG_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX",
               "ShearY", "TranslateX", "TranslateY", "Rotate")
_FILL = (128, 128, 128)
_MAX_LEVEL = 10.0
_TRANSLATE_CONST = 10.0


def decode_image(data, draft_size: int = 0) -> Image.Image:
    """Decodes encoded bytes (or a uint8 HWC array) to an RGB PIL image.

    `draft_size > 0` lets the JPEG decoder downscale by a power of two while both sides stay
    >= draft_size, which makes big photos several times cheaper to decode.
    """
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        return Image.fromarray(data[..., :3] if data.shape[-1] != 1 else data[..., 0]).convert("RGB")
    im = Image.open(io.BytesIO(data))
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))
    return im.convert("RGB")


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params; returns (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(im: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.5, 1.0)) -> Image.Image:
    i, j, h, w = random_resized_crop_box(im.width, im.height, rng, scale)
    # Crop first, then resize (as torchvision): resize(box=...) would filter across the box edge.
    return im.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)


# ----------------------------------------------------------------------------- RandomAugment ops


def _brightness(im: Image.Image, factor: float) -> Image.Image:
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return Image.fromarray(table[np.asarray(im)])


def _sharpness(im: Image.Image, factor: float) -> Image.Image:
    """LAVIS's sharpness_func: blend with a 3x3 smoothing (centre 5, /13) inside the border."""
    if factor == 1.0:
        return im
    img = np.asarray(im).astype(np.float32)
    h, w = img.shape[:2]
    acc = sum(img[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
              for dy in (-1, 0, 1) for dx in (-1, 0, 1)) + 4 * img[1:-1, 1:-1]
    degenerate = np.rint(acc / 13.0).clip(0, 255)
    out = img.copy()
    out[1:-1, 1:-1] = degenerate + factor * (img[1:-1, 1:-1] - degenerate)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _affine(im: Image.Image, coeffs) -> Image.Image:
    # PIL maps output -> input pixel coordinates; OpenCV's warpAffine matrix in LAVIS maps
    # input -> output, hence the negated shear/offset terms below.
    return im.transform(im.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=_FILL)


def _signed(level: float, rng: np.random.Generator, negate_if_below: bool) -> float:
    u = rng.random()
    return -level if (u < 0.5 if negate_if_below else u > 0.5) else level


def apply_randaug_op(im: Image.Image, name: str, magnitude: float,
                     rng: np.random.Generator) -> Image.Image:
    """One LAVIS RandomAugment op at level `magnitude` (of 10)."""
    if name == "Identity":
        return im
    if name == "AutoContrast":
        return ImageOps.autocontrast(im)
    if name == "Equalize":
        return ImageOps.equalize(im)
    if name in ("Brightness", "Sharpness"):
        factor = (magnitude / _MAX_LEVEL) * 1.8 + 0.1
        return _brightness(im, factor) if name == "Brightness" else _sharpness(im, factor)
    if name in ("ShearX", "ShearY"):
        f = _signed((magnitude / _MAX_LEVEL) * 0.3, rng, negate_if_below=False)
        return _affine(im, (1, -f, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, -f, 1, 0))
    if name in ("TranslateX", "TranslateY"):
        off = _signed((magnitude / _MAX_LEVEL) * _TRANSLATE_CONST, rng, negate_if_below=False)
        return _affine(im, (1, 0, off, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, off))
    if name == "Rotate":
        deg = _signed((magnitude / _MAX_LEVEL) * 30, rng, negate_if_below=True)
        return im.rotate(deg, Image.BILINEAR, fillcolor=_FILL)
    raise ValueError(f"unknown RandomAugment op {name!r}; known: {RANDAUG_OPS}")


def random_augment(im: Image.Image, rng: np.random.Generator, num_ops: int = 2,
                   magnitude: float = 5, ops=RANDAUG_OPS) -> Image.Image:
    """LAVIS RandomAugment: N ops drawn with replacement, each applied with probability 0.5."""
    for name in rng.choice(list(ops), num_ops):
        if rng.random() > 0.5:
            continue
        im = apply_randaug_op(im, str(name), magnitude, rng)
    return im


# ----------------------------------------------------------------------------- full transforms


def normalize(im: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8 RGB -> float32 HWC, (x/255 - mean) / std."""
    x = np.array(im, dtype=np.float32)  # a fresh array, updated in place below
    x *= 1.0 / (255.0 * np.asarray(std, np.float32))
    x -= np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return x


def train_transform(data, size: int, rng: np.random.Generator, *, min_scale: float = 0.5,
                    max_scale: float = 1.0, hflip: bool = True, randaugment: bool = False,
                    randaug_num_ops: int = 2, randaug_magnitude: float = 5,
                    draft: bool = True, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """Decode + blip(2)_image_train; returns float32 [size, size, 3]."""
    # A crop keeps at least min_scale of the area (side ratio sqrt(min_scale)), so decoding at
    # size / sqrt(min_scale) or more keeps the crop at or above the output resolution.
    draft_size = int(math.ceil(size / math.sqrt(min_scale))) if draft else 0
    im = decode_image(data, draft_size)
    im = random_resized_crop(im, size, rng, (min_scale, max_scale))
    if hflip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if randaugment:
        im = random_augment(im, rng, randaug_num_ops, randaug_magnitude)
    return normalize(im, mean, std)


def eval_transform(data, size: int, *, draft: bool = True, mean=CLIP_MEAN,
                   std=CLIP_STD) -> np.ndarray:
    """Decode + blip_image_eval (bicubic resize to size x size); returns float32 [size, size, 3]."""
    im = decode_image(data, size if draft else 0)
    return normalize(im.resize((size, size), Image.BICUBIC), mean, std)
