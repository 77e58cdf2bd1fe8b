"""Caption images from the command line.

    python -m blip2_jax.caption --model=PATH [--prompt="a photo of"] [--num_beams=5] [--max_new_tokens=30] IMAGE...

`--model`: a BLIP-2 (OPT, FlanT5, LLaMA, Qwen2, ...) or InstructBLIP directory, or a stage-2 workdir.
`--prompt`: the text the LLM continues; for InstructBLIP the instruction (e.g. "What is unusual about
this image?"), which its Q-Former reads too.

Prints one line per image, `IMAGE<TAB>caption`, in the order given (line breaks inside a caption
become spaces). A file that cannot be read as an
image gets an error line naming it on stderr; the others are still captioned, and the exit status is
1 when any image failed (2 for bad arguments or a model that cannot be loaded). `--model` is checked
first: a path that is neither a BLIP-2 directory nor a training workdir is one error line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from blip2_jax import checkpoint, compilation_cache
from blip2_jax.decoding import generate
from blip2_jax.pretrained import from_pretrained
from blip2_jax.processor import load_processor


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blip2_jax.caption", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="BLIP-2 or InstructBLIP directory (HF Blip2ForConditionalGeneration "
                   "/ InstructBlipForConditionalGeneration + tokenizer) or a stage-2 workdir")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--prompt", default="", help='text the caption continues, e.g. "a photo of"; for InstructBLIP '
                   'the instruction, e.g. "What is in the picture?"')
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=30)
    p.add_argument("--min_new_tokens", type=int, default=1)
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=8, help="images per generate call (one compilation)")
    p.add_argument("--frozen_dtype", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="storage/compute dtype of the frozen ViT and LLM (int8: weight-only int8 storage, "
                        "bfloat16 compute)")
    p.add_argument("--compilation_cache", default=None,
                   help="persistent XLA cache directory (default: $BLIP2_JAX_COMPILATION_CACHE or "
                        f"{compilation_cache.DEFAULT_DIRECTORY}; empty = off)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    return p


def model_path_error(path: str) -> Optional[str]:
    """Why `path` cannot be a captioning `--model` (None when it looks like one): it must be a Hugging
    Face BLIP-2 directory (`config.json` with model_type "blip-2", not a retrieval-only checkpoint), an
    InstructBLIP one (model_type "instructblip") or a training workdir of this project (`checkpoints/`)."""
    expected = "expected a Hugging Face BLIP-2 / InstructBLIP directory or a training workdir of this project"
    if not os.path.isdir(path):
        return f"--model={path}: {'not a directory' if os.path.exists(path) else 'no such directory'} ({expected})"
    if checkpoint.is_workdir(path):
        return None
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return f"--model={path}: no config.json and no checkpoints/ ({expected})"
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        return f"--model={path}: cannot read config.json ({e})"
    if not isinstance(config, dict) or config.get("model_type") not in ("blip-2", "instructblip"):
        kind = config.get("model_type") if isinstance(config, dict) else None
        return (f"--model={path}: config.json describes a {kind!r} model, not BLIP-2 or InstructBLIP (model_type "
                "'blip-2' or 'instructblip')")
    if "Blip2ForImageTextRetrieval" in (config.get("architectures") or []):
        return (f"--model={path}: a Blip2ForImageTextRetrieval checkpoint has no language model; captioning "
                "needs Blip2ForConditionalGeneration")
    return None


def read_image(path: str) -> Image.Image:
    """The image at `path` as RGB; raises ValueError naming the file when it is not a readable image."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def caption_batches(model, params, processor, images, *, prompt: str, batch_size: int, **gen_kw) -> list[str]:
    """Captions for a list of PIL images, `batch_size` at a time; the last batch is padded with copies
    so that every call has the same shape (one compilation). InstructBLIP's Q-Former reads `prompt` as
    its instruction (an empty one too, `[CLS] [SEP]`); the LLM continues `prompt`, or its BOS without one."""
    text = {}
    if prompt:
        text["input_ids"], text["attention_mask"] = processor.tokenize([prompt])
    if processor.instruction_aware:
        text["qformer_input_ids"], text["qformer_attention_mask"] = processor.tokenize_instruction([prompt])
    text = {k: np.repeat(v, batch_size, 0) for k, v in text.items()}
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels = processor.preprocess(chunk + [chunk[0]] * (batch_size - len(chunk)))
        out = generate(model, params, pixels, **text, **gen_kw)
        captions += processor.decode(np.asarray(out)[:len(chunk)])
    return captions


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"error: --batch_size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    problem = model_path_error(args.model)
    if problem:  # before reading any image: a wrong --model would otherwise be reported last
        print(f"error: {problem}", file=sys.stderr)
        return 2
    images, names, failed = [], [], 0
    for path in args.images:
        try:
            images.append(read_image(path))
            names.append(path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1

    if images:
        compilation_cache.enable(args.compilation_cache)
        try:
            frozen = "int8" if args.frozen_dtype == "int8" else getattr(jnp, args.frozen_dtype)
            model, params = from_pretrained(args.model, frozen_dtype=frozen)
            processor = load_processor(args.model, tokenizer_path=args.tokenizer)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"error: cannot load the model from {args.model}: {e}", file=sys.stderr)
            return 2
        captions = caption_batches(
            model, params, processor, images, prompt=args.prompt, batch_size=min(args.batch_size, len(images)),
            max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, min_new_tokens=args.min_new_tokens,
            length_penalty=args.length_penalty, repetition_penalty=args.repetition_penalty)
        for name, text in zip(names, captions):
            print(f"{name}\t{' '.join(text.splitlines())}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
