"""Bundled demo data: coloured shapes with compositional captions, generated deterministically.

    python -m blip2_jax.data.shapes --out /tmp/shapes [--num_train 10000 --num_heldout 200 --size 64]

Each image shows two objects on a plain background; an object is a size (small, large), a colour
(red, green, blue, yellow, purple, orange) and a shape (circle, square, triangle, diamond), and the
two stand in a spatial relation. Every image has two captions describing the same scene from either
side, e.g. "a small red circle left of a large blue square" and "a large blue square right of a
small red circle". Learning them requires binding colour, shape and size to position.

`--shapes` draws a subset of the shapes. The README's demo uses `--shapes square` (264 combinations,
colour, size and position left to read): what a random frozen ViT with a 4-layer Q-Former tells
apart in a few CPU minutes. Shape is the attribute it cannot: a supervised probe (ViT -> Q-Former ->
linear heads, 600 steps) reads size 0.93, colour 0.99 and relation 0.87 on held-out scenes but circle
vs square at chance (0.52): shape needs a pretrained image encoder, or training far beyond this budget.

Zero-shot classification sets (`zero_shot/shape.jsonl`, `zero_shot/colour.jsonl`, 25 images per
class): scenes whose two objects share the labelled shape (colour), for `python -m blip2_jax.classify`.

Splits (same ArrayRecord format as `blip2_jax.data.build`, prefixes `train` and `heldout`):
- `heldout`: `num_heldout` scenes with pairwise different (object, relation, object) combinations,
  written canonically with "left of"/"above" (the second caption uses "right of"/"below"), so every
  held-out caption is unique to its image and image-text retrieval on the split is well posed.
- `train`: `num_train` scenes drawn from all combinations (held-out combinations included, with other
  placements: the held-out images are new, their captions may not be).
The output depends only on the arguments (byte-identical on re-run).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from blip2_jax.data import records

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.11, "large": 0.19}  # half-extent as a fraction of the canvas side
RELATIONS = {"left of": "right of", "above": "below"}
BACKGROUND = (235, 235, 235)


def object_text(obj) -> str:
    size, color, shape = obj
    return f"a {size} {color} {shape}"


def captions_for(a, relation: str, b) -> tuple[str, str]:
    """(canonical caption, the same scene described from the other object)."""
    return (f"{object_text(a)} {relation} {object_text(b)}",
            f"{object_text(b)} {RELATIONS[relation]} {object_text(a)}")


def objects(shapes: Sequence[str] = SHAPES) -> list[tuple]:
    """Every (size, colour, shape) object drawn from `shapes` (a subset of SHAPES)."""
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown or not shapes:
        raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {tuple(shapes)}")
    return list(itertools.product(SIZES, COLORS, [s for s in SHAPES if s in shapes]))


def all_combinations(shapes: Sequence[str] = SHAPES) -> list[tuple]:
    objs = objects(shapes)
    return [(a, rel, b) for a in objs for rel in RELATIONS for b in objs if a != b]


def _draw(draw: ImageDraw.ImageDraw, obj, cx: float, cy: float, canvas: int):
    size, color, shape = obj
    r = SIZES[size] * canvas
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def render(a, relation: str, b, rng: np.random.Generator, canvas: int = 64) -> Image.Image:
    """Draws object a `relation` object b, at random positions that make the relation clear."""
    ra, rb = SIZES[a[0]] * canvas, SIZES[b[0]] * canvas
    im = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(im)
    # Along the relation axis, a sits in the first half and b in the second, with a gap between
    # them; across it both share a band so that "left of" never looks like "above".
    mid = canvas / 2
    along_a = rng.uniform(ra + 1, mid - ra * 0.3)
    along_b = rng.uniform(mid + rb * 0.3, canvas - rb - 1)
    along_b = max(along_b, along_a + ra + rb + 2)
    if along_b > canvas - rb - 1:  # Too big to fit apart with that draw: pin both to the edges.
        along_a, along_b = ra + 1, canvas - rb - 1
    lo, hi = max(ra, rb) + 1, canvas - max(ra, rb) - 1
    across = rng.uniform(lo, hi)
    across_a = float(np.clip(across + rng.uniform(-0.05, 0.05) * canvas, ra + 1, canvas - ra - 1))
    across_b = float(np.clip(across + rng.uniform(-0.05, 0.05) * canvas, rb + 1, canvas - rb - 1))
    if relation == "left of":
        _draw(draw, a, along_a, across_a, canvas)
        _draw(draw, b, along_b, across_b, canvas)
    else:
        _draw(draw, a, across_a, along_a, canvas)
        _draw(draw, b, across_b, along_b, canvas)
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def heldout_combinations(num: int, seed: int, shapes: Sequence[str] = SHAPES) -> list[tuple]:
    combos = all_combinations(shapes)
    if num > len(combos):
        raise ValueError(f"num_heldout={num} exceeds the {len(combos)} distinct combinations")
    pick = np.random.default_rng([seed, 0]).permutation(len(combos))[:num]
    return [combos[i] for i in pick]


def scenes(split: str, num: int, seed: int, canvas: int,
           shapes: Sequence[str] = SHAPES) -> list[tuple[tuple, str, tuple, Image.Image]]:
    """`(a, relation, b, image)` of every scene of one split (object a `relation` object b); deterministic
    in (split, num, seed, canvas, shapes). The captions and the VQA records (`shapes_vqa.py`) both
    describe these scenes."""
    split_id = {"train": 1, "heldout": 2}[split]
    combos = all_combinations(shapes)
    chosen = heldout_combinations(num, seed, shapes) if split == "heldout" else None
    out = []
    for i in range(num):
        rng = np.random.default_rng([seed, split_id, i])
        if chosen is not None:
            a, rel, b = chosen[i]
        else:
            a, rel, b = combos[int(rng.integers(len(combos)))]
        out.append((a, rel, b, render(a, rel, b, rng, canvas)))
    return out


def make_split(split: str, num: int, seed: int, canvas: int,
               shapes: Sequence[str] = SHAPES) -> list[records.ImageText]:
    """Caption records of one split; deterministic in (split, num, seed, canvas, shapes)."""
    return [records.ImageText(png_bytes(im), captions_for(a, rel, b), f"{split}-{i:06d}", "shapes", "PNG")
            for i, (a, rel, b, im) in enumerate(scenes(split, num, seed, canvas, shapes))]


ZERO_SHOT_ATTRIBUTES = {"shape": 2, "colour": 1}  # attribute -> its index in an object tuple


def zero_shot_split(attribute: str, num_per_class: int, seed: int, canvas: int,
                    shapes: Sequence[str] = SHAPES) -> list[tuple[Image.Image, str]]:
    """`(image, label)` pairs for zero-shot classification by `attribute` ("shape" or "colour"): scenes
    whose two objects share that attribute's value (the label) and differ at random in the rest, so
    the label is the one thing both objects say; deterministic in the arguments."""
    index = ZERO_SHOT_ATTRIBUTES[attribute]
    objs = objects(shapes)
    values = sorted({o[index] for o in objs}, key=[o[index] for o in objs].index)
    out = []
    for v, value in enumerate(values):
        same = [o for o in objs if o[index] == value]
        for i in range(num_per_class):
            rng = np.random.default_rng([seed, 3, v, i])
            a, b = (same[j] for j in rng.choice(len(same), 2, replace=len(same) < 2))
            relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
            out.append((render(a, relation, b, rng, canvas), value))
    return out


def write_zero_shot(out_dir: str, *, num_per_class: int = 25, seed: int = 0, canvas: int = 64,
                    shapes: Sequence[str] = SHAPES) -> dict[str, str]:
    """Writes `out_dir/zero_shot/<attribute>.jsonl` (`{"image": path, "label": value}` per line, what
    `python -m blip2_jax.classify --data=` reads) and the images beside it, for shape and colour;
    returns the JSONL paths."""
    root = os.path.join(out_dir, "zero_shot")
    os.makedirs(root, exist_ok=True)
    written = {}
    for attribute in ZERO_SHOT_ATTRIBUTES:
        lines = []
        for i, (im, label) in enumerate(zero_shot_split(attribute, num_per_class, seed, canvas, shapes)):
            name = f"{attribute}-{i:04d}.png"
            im.save(os.path.join(root, name), format="PNG")
            lines.append(json.dumps({"image": name, "label": label}))
        written[attribute] = os.path.join(root, f"{attribute}.jsonl")
        with open(written[attribute], "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return written


def generate(out_dir: str, *, num_train: int = 10000, num_heldout: int = 200, size: int = 64,
             seed: int = 0, train_shards: int = 4, shapes: Sequence[str] = SHAPES) -> dict[str, list[str]]:
    """Writes `train-*` and `heldout-*` shards to out_dir, and `MANIFEST` (the arguments, so a
    caller can tell whether a directory holds what it asks for); returns the shard paths per split."""
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for split, num, shards in (("train", num_train, train_shards), ("heldout", num_heldout, 1)):
        recs = make_split(split, num, seed, size, shapes)
        bounds = [round(k * len(recs) / shards) for k in range(shards + 1)]
        paths = []
        for k in range(shards):
            path = os.path.join(out_dir, records.shard_name(split, k, shards))
            records.write_shard(path, recs[bounds[k]:bounds[k + 1]])
            paths.append(path)
        written[split] = paths
    write_zero_shot(out_dir, seed=seed, canvas=size, shapes=shapes)
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest(num_train, num_heldout, size, seed, train_shards, shapes), f, indent=1)
    return written


MANIFEST = "shapes.json"


def manifest(num_train, num_heldout, size, seed, train_shards, shapes) -> dict:
    """What `generate` wrote, as stored in `<out_dir>/shapes.json`."""
    return {"num_train": num_train, "num_heldout": num_heldout, "size": size, "seed": seed,
            "train_shards": train_shards, "shapes": [s for s in SHAPES if s in shapes]}


def read_manifest(out_dir: str) -> dict | None:
    """The manifest of a generated directory, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def caption_words() -> list[str]:
    """Every word any shapes caption can use, sorted."""
    words = {"a"} | set(SIZES) | set(COLORS) | set(SHAPES)
    for rel in list(RELATIONS) + list(RELATIONS.values()):
        words |= set(rel.split())
    return sorted(words)


def write_bert_vocab(out_dir: str) -> str:
    """A WordPiece `vocab.txt` covering the shapes captions (BERT's special ids 0, 100-103 become
    0-4); the stage-1 demo's Q-Former tokenizer. Returns the directory."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(BERT_SPECIALS + tuple(caption_words())) + "\n")
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m blip2_jax.data.shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num_train", type=int, default=10000)
    p.add_argument("--num_heldout", type=int, default=200)
    p.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_shards", type=int, default=4)
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated subset of {','.join(SHAPES)} to draw (default: all)")
    p.add_argument("--if_changed", action="store_true",
                   help="do nothing when --out already holds data generated with these arguments")
    a = p.parse_args(argv)
    shape_list = a.shapes.split(",")
    objects(shape_list)  # a bad --shapes fails here, before anything is written
    wanted = manifest(a.num_train, a.num_heldout, a.size, a.seed, a.train_shards, shape_list)
    if a.if_changed and read_manifest(a.out) == wanted:
        print(f"{a.out} already holds the shapes data for these arguments")
        return
    written = generate(a.out, num_train=a.num_train, num_heldout=a.num_heldout, size=a.size,
                       seed=a.seed, train_shards=a.train_shards, shapes=shape_list)
    for split, paths in written.items():
        print(f"{split}: {len(paths)} shard(s) in {a.out}")
    print(f"stage-1 tokenizer: {write_bert_vocab(os.path.join(a.out, 'tokenizer'))}")


if __name__ == "__main__":
    main()
