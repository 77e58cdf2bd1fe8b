"""Start-up: seconds from process start to the first caption of `python -m blip2_jax.caption`, first run
(empty compilation cache) and second run (the cache the first one wrote).

    python benchmarks/startup.py [--runs=2] [--beams=5]

The model is the decoding benchmark's BLIP-2 OPT (benchmarks/generate.py: ViT 4x192 at 112 px,
Q-Former 2x192 with 16 queries, OPT 6x256) with a byte-level BPE tokenizer trained on the shapes
captions, saved as a Hugging Face directory; one image; a fresh cache directory. Prints one JSON
line: the seconds of each run, the cache entries, and whether every run printed the same caption.
The wall time includes Python and jax start-up (about 3-4 s on this 2-core CPU) and loading.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def caption_runs(model_dir: str, images, cache_dir: str, runs: int = 2, extra_args=()) -> list[dict]:
    """Run the caption CLI `runs` times with `--compilation_cache=cache_dir`: each run's wall seconds,
    stdout and the number of cache entries after it."""
    out = []
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}
    args = [sys.executable, "-m", "blip2_jax.caption", f"--model={model_dir}", f"--compilation_cache={cache_dir}",
            *extra_args, *images]
    for _ in range(runs):
        t0 = time.perf_counter()
        run = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        seconds = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"caption CLI failed ({run.returncode}): {run.stderr[-2000:]}")
        out.append({"seconds": seconds, "stdout": run.stdout,
                    "cache_entries": len(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else 0})
    return out


def build_model_dir(path: str) -> None:
    """The decoding benchmark's BLIP-2 OPT with a tokenizer of its vocabulary, saved at `path`."""
    sys.path.insert(0, REPO)
    from benchmarks.generate import build_hf
    from blip2_jax.data import caption_lm

    captions = [f"a photo of a {size} {colour} {shape} left of a {other} square"
                for size in ("small", "large") for colour in ("red", "green", "blue", "orange")
                for shape in ("square", "circle", "triangle") for other in ("red", "blue")]
    tok = caption_lm.build_tokenizer(captions, path, "opt", vocab_size=300)
    hf = build_hf(vocab=len(tok) + 1)  # + the image placeholder row
    hf.config.text_config.eos_token_id = tok.encode("\n", add_special_tokens=False)[0]
    hf.save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--beams", type=int, default=5)
    args = ap.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        model_dir, cache = os.path.join(d, "model"), os.path.join(d, "xla")
        build_model_dir(model_dir)
        image = os.path.join(d, "image.png")
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, "PNG")
        with open(image, "wb") as f:
            f.write(buf.getvalue())
        runs = caption_runs(model_dir, [image], cache, args.runs, (f"--num_beams={args.beams}", "--max_new_tokens=20"))
    print(json.dumps({"seconds": [round(r["seconds"], 2) for r in runs],
                      "cache_entries": [r["cache_entries"] for r in runs],
                      "same_caption": len({r["stdout"] for r in runs}) == 1}))


if __name__ == "__main__":
    main()
