"""Input pipeline speed: decoded-and-augmented images per second per CPU core.

    python benchmarks/data_pipeline.py [--num_images 64] [--size 224] [--seconds 10]

1. Per core: one thread decodes COCO-sized JPEGs (640x480, quality 90, made from the scikit-image
   photographs, or smooth synthetic pictures without scikit-image) and applies the train transform at
   `--size` (blip2_image_train: RandomResizedCrop + flip + normalise; and blip_image_train, which adds
   RandAugment), plus the stage-1 tokenisation of a caption.
2. The whole grain pipeline (ArrayRecord read -> transform -> batch) over all cores with threads.
3. The demo: the coloured-shapes dataset at 64 px, batch 64: milliseconds per batch, to set
   against a demo training step.
Prints one line per measurement and a final JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from blip2_jax import config_sections  # noqa: E402
from blip2_jax.data import image_ops, pipeline, records, shapes, testing, text  # noqa: E402


def _source_pictures() -> list[np.ndarray]:
    try:
        import skimage.data

        pics = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
                skimage.data.rocket(), skimage.data.stereo_motorcycle()[0]]
    except ImportError:
        y, x = np.mgrid[0:480, 0:640]
        pics = [np.stack([(x * k) % 256, (y * k) % 256, (x + y) % 256], -1).astype(np.uint8)
                for k in (1, 2, 3)]
    return pics


def coco_like_jpegs(n: int) -> list[bytes]:
    pics = [Image.fromarray(p).convert("RGB").resize((640, 480), Image.BICUBIC)
            for p in _source_pictures()]
    out = []
    for i in range(n):
        im = pics[i % len(pics)]
        if (i // len(pics)) % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90 - (i % 7))
        out.append(buf.getvalue())
    return out


def per_core(jpegs, size: int, seconds: float, randaugment: bool, encoder) -> float:
    rng = np.random.default_rng(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        image_ops.train_transform(jpegs[n % len(jpegs)], size, rng, randaugment=randaugment)
        encoder("a cat sitting on a wooden table next to a cup of coffee", rng)
        n += 1
    return n / (time.perf_counter() - start)


def pipeline_rate(cfg, seconds: float) -> tuple[float, float]:
    """(images/s, ms per batch) of the whole pipeline after a warm-up batch."""
    it = pipeline.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
    next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    dt = time.perf_counter() - start
    return n * cfg.global_batch_size / dt, 1000 * dt / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch_size", type=int, default=32)
    a = p.parse_args()
    cores = os.cpu_count() or 1
    jpegs = coco_like_jpegs(a.num_images)
    encoder = text.Stage1Text(text.load_bert_tokenizer(testing.bert_vocab_dir()))
    result = {"cores": cores, "size": a.size}
    for name, ra in (("blip2_image_train", False), ("blip_image_train", True)):
        rate = per_core(jpegs, a.size, a.seconds, ra, encoder)
        result[f"{name}_images_per_s_per_core"] = round(rate, 1)
        print(f"{name} @ {a.size}px, 640x480 JPEG, 1 thread: {rate:.1f} images/s per core")
    with tempfile.TemporaryDirectory() as d:
        records.write_shard(os.path.join(d, records.shard_name("train", 0, 1)),
                            [records.ImageText(j, ("a picture",), str(i), "bench")
                             for i, j in enumerate(jpegs)])
        cfg = config_sections.data_config()
        cfg.train_sources.bench = config_sections.source_config(d)
        cfg.tokenizer_path = testing.bert_vocab_dir()
        cfg.image_size, cfg.global_batch_size, cfg.read_threads = a.size, a.batch_size, cores
        rate, _ = pipeline_rate(cfg, a.seconds)
        result["pipeline_images_per_s"] = round(rate, 1)
        result["pipeline_images_per_s_per_core"] = round(rate / cores, 1)
        print(f"grain pipeline, {cores} threads: {rate:.1f} images/s ({rate / cores:.1f} per core)")
        shapes.generate(os.path.join(d, "shapes"), num_train=512, num_heldout=100)
        cfg.train_sources = {"shapes": config_sections.source_config(os.path.join(d, "shapes"),
                                                              prefix="train")}
        cfg.image_size, cfg.global_batch_size = 64, 64
        rate, ms = pipeline_rate(cfg, a.seconds)
        result["demo_shapes_64px_b64_ms_per_batch"] = round(ms, 1)
        print(f"demo shapes @ 64px, batch 64, {cores} threads: {ms:.1f} ms per batch "
              f"({rate:.0f} images/s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
