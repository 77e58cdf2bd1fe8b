"""int8 weight-only frozen towers (`from_pretrained(..., frozen_dtype="int8")`): memory and accuracy.

    python benchmarks/quantization.py [--images=8] [--new_tokens=20]

1. Frozen-weight bytes (from shapes, nothing allocated) of the paper's EVA ViT-g + OPT-2.7B
   (`configs/stage2.py:opt2.7b`) and + FlanT5-XL (`flant5xl`): bfloat16 against int8.
2. On the decoding benchmark's BLIP-2 OPT (benchmarks/generate.py: ViT 4x192, Q-Former 2x192, OPT 6x256,
   weights spread so that decoding is not a run of near-ties), the same weights loaded in float32,
   bfloat16 and int8: max |logits - float32 logits| / max |float32 logits| over a batch, and greedy
   decoding's token agreement with float32 (the share of positions equal, and of captions equal).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import blip2_jax  # noqa: E402
from benchmarks.generate import build_hf  # noqa: E402
from blip2_jax.models import quant  # noqa: E402
from blip2_jax.models.blip2 import abstract_params  # noqa: E402
from blip2_jax.spec import model as spec_model  # noqa: E402

FROZEN = ("vision", "language_model")


def paper_frozen_bytes() -> dict:
    from tests.test_paper_scale_stage2 import FLAN_T5_XL, OPT_2_7B, paper_config

    out = {}
    for variant, text in (("opt2.7b", OPT_2_7B), ("flant5xl", FLAN_T5_XL)):
        params = abstract_params(spec_model.model_of(paper_config(variant, text)))
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                              {k: v for k, v in params.items() if k in FROZEN})
        bf16 = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(frozen))
        int8 = quant.quantized_nbytes(frozen)
        out[variant] = {"bfloat16_gib": round(bf16 / 2**30, 3), "int8_gib": round(int8 / 2**30, 3),
                        "ratio": round(int8 / bf16, 4)}
    return out


def accuracy(images: int, new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        build_hf().save_pretrained(d)
        models = {name: blip2_jax.from_pretrained(d, frozen_dtype=dt)
                  for name, dt in (("float32", None), ("bfloat16", jnp.bfloat16), ("int8", "int8"))}
    m32, p32 = models["float32"]
    size = m32.config.vision.image_size
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(images, size, size, 3)).astype(np.float32)
    ids = rng.integers(4, 1000, (images, 6))
    mask = np.ones_like(ids)
    ref = np.asarray(m32.apply({"params": p32}, pixels, ids, mask), np.float32)
    tokens_ref = np.asarray(blip2_jax.generate(m32, p32, pixels, max_new_tokens=new_tokens))
    out = {}
    for name in ("bfloat16", "int8"):
        model, params = models[name]
        logits = np.asarray(model.apply({"params": params}, pixels, ids, mask), np.float32)
        tokens = np.asarray(blip2_jax.generate(model, params, pixels, max_new_tokens=new_tokens))
        out[name] = {"logits_rel_err": float(np.abs(logits - ref).max() / np.abs(ref).max()),
                     "token_agreement": float(np.mean(tokens == tokens_ref)),
                     "captions_equal": float(np.mean(np.all(tokens == tokens_ref, axis=1))),
                     "frozen_bytes": quant.tree_nbytes({k: params[k] for k in FROZEN})}
    out["float32_frozen_bytes"] = quant.tree_nbytes({k: p32[k] for k in FROZEN})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=20)
    a = p.parse_args()
    print(json.dumps({"paper_frozen_bytes": paper_frozen_bytes(), "mid_size_model": accuracy(a.images, a.new_tokens)}))


if __name__ == "__main__":
    main()
