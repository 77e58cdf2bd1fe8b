"""Captions per second: `blip2_jax.generate` vs Hugging Face `Blip2ForConditionalGeneration.generate`.

    python benchmarks/generate.py [--size=small|midsize] [--batch=8] [--max_new_tokens=20] [--beams=5]
                                  [--repeats=3] [--threads=2]

`--size=small` (default): a tiny-but-not-trivial BLIP-2 OPT (ViT 4x192 at 112 px, Q-Former 2x192 with 16
queries, OPT 6 layers of width 256, vocabulary 8192); `--size=midsize`: the performance issue's model
(benchmarks/harness.py: ViT 6x384 at 224 px, Q-Former 6x384 with 32 queries, OPT-125m's shape). Built
with random, spread weights in HF (torch, CPU), saved, loaded by `blip2_jax.from_pretrained` (float32).
Both sides decode the same batch with the same settings; EOS is masked for the whole budget
(`min_new_tokens = max_new_tokens`), so every row decodes `max_new_tokens` tokens on both sides. Prints,
for greedy and for beam search, one JSON line: token agreement, our first call (compilation), the
median seconds per call of each side (alternated, with the other processes' CPU use recorded:
benchmarks/harness.py), captions/s and the ratio. No downloads; torch is only the reference here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # noqa: E402
from benchmarks.harness import spread_weights_  # noqa: E402


def build_hf(seed: int = 0, vocab: int = 8192):
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    text = OPTConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=6, ffn_dim=1024, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=256, pad_token_id=1, bos_token_id=2,
                     eos_token_id=3)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                           image_size=112, patch_size=14, layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                            cross_attention_frequency=2, vocab_size=vocab, encoder_hidden_size=192),
        text_config=text.to_dict(), num_query_tokens=16, image_token_index=vocab - 1)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg)
    spread_weights_(model, seed)
    return model.eval()


def build_model(size: str):
    if size == "small":
        return build_hf()
    hf = harness.build_hf_blip2("opt", **harness.MIDSIZE)
    spread_weights_(hf, 0)
    return hf.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", choices=("small", "midsize"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=20)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import jax
    import torch

    import blip2_jax

    torch.set_num_threads(args.threads)
    hf = build_model(args.size)
    cfg = hf.config
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = blip2_jax.from_pretrained(d)
    rng = np.random.default_rng(0)
    size, b, n = cfg.vision_config.image_size, args.batch, args.max_new_tokens
    pixels = rng.normal(size=(b, size, size, 3)).astype(np.float32)
    prompt = rng.integers(4, cfg.text_config.vocab_size - 1, size=(b, 4)).astype(np.int32)
    prompt[:, 0] = cfg.text_config.bos_token_id
    hf_ids = torch.from_numpy(np.concatenate([np.full((b, cfg.num_query_tokens), cfg.image_token_index), prompt], 1))
    hf_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    for name, beams in (("greedy", 1), (f"beam{args.beams}", args.beams)):
        kw = dict(max_new_tokens=n, min_new_tokens=n, num_beams=beams)

        def ours():
            return np.asarray(blip2_jax.generate(model, params, pixels, prompt, **kw))

        def theirs():
            with torch.no_grad():
                return hf.generate(pixel_values=hf_pixels, input_ids=hf_ids, do_sample=False, **kw)

        t0 = time.perf_counter()
        got = ours()
        compile_s = time.perf_counter() - t0
        want = theirs()[:, hf_ids.shape[1]:].numpy()
        summary = harness.alternate(ours, theirs, rounds=args.repeats).summary()
        print(json.dumps({
            "benchmark": "generate", "decoding": name, "size": args.size, "batch": b, "new_tokens": n,
            "token_agreement": float((got == want).mean()), "ours_first_call_s": compile_s,
            "ours_captions_per_s": b / summary["ours_s"], "hf_captions_per_s": b / summary["theirs_s"],
            "torch_threads": args.threads, "jax": jax.__version__, "torch": torch.__version__, **summary}))


if __name__ == "__main__":
    main()
