"""Zero-shot image classification from the command line (and `classify_folder` from Python).

    python -m blip2_jax.classify --model=PATH --data=FOLDER_OR_JSONL [--classes=cat,dog,...]
        [--template="a photo of a {}." ...] [--itm_top_k=0] [--confusion=confusion.png]

`--model`: a stage-1 model (HF `Blip2ForImageTextRetrieval` directory with its BERT tokenizer files,
or a stage-1 workdir). `--data`: a folder of `<class name>/<images>` or a JSONL file of
`{"image": path, "label": class name}`. Classes default to the labels found. Prints top-1/top-5
accuracy, chance and counts as one JSON object on the last line of stdout, and writes the confusion
matrix as a PNG when `--confusion` is given. The method: `blip2_jax/evaluate/zero_shot.py`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from blip2_jax import compilation_cache
from blip2_jax.data import image_ops
from blip2_jax.evaluate import load as load_lib
from blip2_jax.evaluate import retrieval_eval, zero_shot


def classify_folder(model_path: str, data: str, classnames: Sequence[str] = (), *,
                    templates: Sequence[str] = zero_shot.TEMPLATES, itm_top_k: int = 0, batch_size: int = 32,
                    image_size: Optional[int] = None, confusion: str = "") -> dict:
    """Zero-shot accuracy of the stage-1 model at `model_path` on the labelled images at `data` (see the
    module docstring); `confusion`: where to write the confusion-matrix PNG ("" = none)."""
    loaded = load_lib.load_model(model_path)
    if loaded.llm:
        raise ValueError(f"{model_path}: a {loaded.llm.upper()} generation model; zero-shot classification "
                         "needs a stage-1 (retrieval) model with ITC/ITM heads")
    size = image_size or loaded.model.config.vision.image_size
    # A workdir's pixels are normalised as it trained (e.g. EfficientNet's); an HF directory's as CLIP's.
    trained = loaded.config.data if loaded.config is not None else {}
    mean, std = trained.get("image_mean", image_ops.CLIP_MEAN), trained.get("image_std", image_ops.CLIP_STD)
    out = zero_shot.evaluate_folder(retrieval_eval.RetrievalScorer(loaded.model), loaded.params, loaded.tokenizer,
                                    data, classnames, templates=templates, image_size=size, itm_top_k=itm_top_k,
                                    batch_size=batch_size, mean=mean, std=std, max_len=_max_len(loaded))
    if confusion:
        out["confusion_png"] = zero_shot.confusion_png(out["confusion"], out["classnames"], confusion)
    out["confusion"] = out["confusion"].tolist()
    return out


def _max_len(loaded) -> int:
    """Prompt length in tokens: the run's `data.max_text_len` (35, LAVIS's, for an HF directory), never
    beyond the Q-Former's position embeddings (a longer prompt would read past them: NaN scores)."""
    trained = loaded.config.data.get("max_text_len", 35) if loaded.config is not None else 35
    return min(int(trained), loaded.model.config.qformer.max_position_embeddings)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blip2_jax.classify", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="stage-1 model: HF Blip2ForImageTextRetrieval dir or a workdir")
    p.add_argument("--data", required=True, help="folder of <class>/<images>, or JSONL of {image, label}")
    p.add_argument("--classes", default="", help="comma-separated class names (default: the labels found)")
    p.add_argument("--template", action="append", default=None,
                   help=f"prompt template with {{}} (repeatable; default: {list(zero_shot.TEMPLATES)})")
    p.add_argument("--itm_top_k", type=int, default=0, help="re-rank each image's top k classes by ITM (default 0)")
    p.add_argument("--batch_size", type=int, default=32, help="images per call (default 32)")
    p.add_argument("--image_size", type=int, default=None, help="default: the model's")
    p.add_argument("--confusion", default="", help="write the confusion matrix to this PNG")
    p.add_argument("--compilation_cache", default=None,
                   help="persistent XLA cache directory (default: $BLIP2_JAX_COMPILATION_CACHE or "
                        f"{compilation_cache.DEFAULT_DIRECTORY}; empty = off)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    compilation_cache.enable(args.compilation_cache)
    try:
        out = classify_folder(args.model, args.data, classes, templates=tuple(args.template or zero_shot.TEMPLATES),
                              itm_top_k=args.itm_top_k, batch_size=args.batch_size, image_size=args.image_size,
                              confusion=args.confusion)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
