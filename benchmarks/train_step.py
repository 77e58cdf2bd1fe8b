"""Stage-2 train step: blip2_jax's against Hugging Face's `Blip2ForConditionalGeneration`, same weights.

    python benchmarks/train_step.py [--llm=opt|t5] [--frozen_dtype=float32|bfloat16] [--batch=8]
                                    [--rounds=5] [--threads=2] [--size=midsize|tiny]

The model is the issue's mid-size BLIP-2 (benchmarks/harness.py: ViT 6x384 at 224 px, Q-Former 6x384
with 32 queries, an LLM of OPT-125m's shape; `--llm=t5`: a gated-GELU T5 of the same width, 6+6
layers), built with random weights in HF (torch, CPU), saved, and loaded by `blip2_jax.from_pretrained`.
One step on each side: the stage-2 LM loss (forward with labels), its backward and AdamW
(lr 1e-4, weight decay 0.05) over the trainable parameters only (ln_vision, queries, Q-Former,
projection); the ViT and the LLM are frozen (`requires_grad=False` / blip2_jax's frozen tree). Ours is
the train loop's own step (`train/loop.make_train_step` around `train/stage2.stage2_loss`). Dropout
is off on both sides, so the two losses at step 0 must agree. The sides alternate; the first round of
each is a warm-up (ours compiles there) and is dropped. Prints one JSON line.

`--frozen_dtype=bfloat16` runs our frozen towers in bfloat16 (the paper configs' default) against HF
in float32; `--baseline=ours_float32` times it against our own float32 step instead (is bfloat16 worth
it on this CPU?). torch gets `--threads` intra-op threads; XLA's CPU backend uses one thread per core.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness, step_fns  # noqa: E402

TEXT_LEN = 24  # prompt + caption tokens per example, right-padded as the data pipeline writes them
PROMPT_LEN = 4


def make_batch(cfg, batch: int, llm: str, seed: int = 0, text_len: int = TEXT_LEN) -> dict:
    """A stage-2 batch in the pipeline's layout (numpy, NHWC pixels): right-padded text, labels -100 on
    BOS, prompt and padding; for T5 the prompt goes to the encoder and the caption is the decoder's."""
    rng = np.random.default_rng(seed)
    size, vocab = cfg.vision_config.image_size, cfg.text_config.vocab_size
    lengths = rng.integers(text_len // 2, text_len + 1, size=batch)
    mask = (np.arange(text_len)[None] < lengths[:, None]).astype(np.int32)
    pad = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0  # LLaMA has none
    ids = np.where(mask == 1, rng.integers(4, vocab - 1, size=(batch, text_len)), pad)
    out = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32)}
    if llm == "opt":
        ids[:, 0] = cfg.text_config.bos_token_id
        labels = np.where(mask == 1, ids, -100)
        labels[:, :PROMPT_LEN] = -100
        out.update(input_ids=ids.astype(np.int32), attention_mask=mask, labels=labels.astype(np.int32))
    else:
        prompt = ids[:, :PROMPT_LEN].copy()
        labels = np.where(mask == 1, ids, -100).astype(np.int32)
        dec_in = np.concatenate([np.zeros((batch, 1), np.int32), np.where(labels == -100, 0, labels)[:, :-1]], 1)
        out.update(input_ids=prompt.astype(np.int32), attention_mask=np.ones_like(prompt, np.int32),
                   decoder_input_ids=dec_in.astype(np.int32), decoder_attention_mask=mask, labels=labels)
    return out


def hf_inputs(cfg, batch: dict, llm: str) -> dict:
    """The same batch as HF's forward takes it: NCHW pixels, image tokens in front of the text."""
    import torch

    b, nq, img = batch["input_ids"].shape[0], cfg.num_query_tokens, cfg.image_token_index
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).long()  # noqa: E731
    out = {"pixel_values": torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous(),
           "input_ids": t(np.concatenate([np.full((b, nq), img), batch["input_ids"]], 1)),
           "attention_mask": t(np.concatenate([np.ones((b, nq), np.int32), batch["attention_mask"]], 1))}
    if llm == "opt":
        out["labels"] = t(np.concatenate([np.full((b, nq), -100), batch["labels"]], 1))
    else:
        out.update(labels=t(batch["labels"]), decoder_attention_mask=t(batch["decoder_attention_mask"]))
    return out


def hf_step_fn(hf, inputs: dict):
    """HF's step: forward with labels, backward, AdamW over the parameters outside ViT and LLM."""
    for name, p in hf.named_parameters():
        p.requires_grad_(not name.startswith(("vision_model.", "language_model.")))
    hf.train()
    step, metrics = step_fns.torch_step_fn(lambda: {"loss": hf(**inputs).loss},
                                           [p for p in hf.parameters() if p.requires_grad])
    return step, metrics


def our_step_fn(model, params, batch: dict):
    """The train loop's jitted step over the stage-2 loss, AdamW over the trainable tree only."""
    from blip2_jax.models.blip2 import FROZEN_KEYS
    from blip2_jax.train import stage2

    frozen = {k: v for k, v in params.items() if k in FROZEN_KEYS}
    trainable = {k: v for k, v in params.items() if k not in FROZEN_KEYS}
    loss_fn = lambda t, f, b, rng, train: stage2.stage2_loss(model, {**t, **f}, b, rng, train=train)  # noqa: E731
    return step_fns.loop_step_fn(loss_fn, trainable, frozen, batch, name="stage2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm", default="opt", choices=("opt", "t5"))
    ap.add_argument("--frozen_dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="midsize", choices=("midsize", "tiny"))
    ap.add_argument("--baseline", default="hf", choices=("hf", "ours_float32"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    import blip2_jax

    torch.set_num_threads(args.threads)
    dims = harness.MIDSIZE if args.size == "midsize" else {**harness.TINY, "llm_layers": 2, "llm_width": 64,
                                                             "vocab": 512}
    hf = harness.build_hf_blip2(args.llm, **dims)
    cfg = hf.config
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = blip2_jax.from_pretrained(d, frozen_dtype=getattr(jnp, args.frozen_dtype))
        if args.baseline == "ours_float32":
            model32, params32 = blip2_jax.from_pretrained(d, frozen_dtype=jnp.float32)
    batch = make_batch(cfg, args.batch, args.llm)
    ours, our_losses = our_step_fn(model, params, batch)
    if args.baseline == "hf":
        theirs, their_losses = hf_step_fn(hf, hf_inputs(cfg, batch, args.llm))
    else:
        theirs, their_losses = our_step_fn(model32, params32, batch)
    comparison = harness.alternate(ours, theirs, rounds=args.rounds)
    print(json.dumps({
        "benchmark": "stage2_train_step", "llm": args.llm, "size": args.size, "batch": args.batch,
        "frozen_dtype": args.frozen_dtype, "baseline": args.baseline, "torch_threads": args.threads,
        "jax": jax.__version__, "torch": torch.__version__,
        "loss_step0": {"ours": our_losses[0]["loss"], args.baseline: their_losses[0]["loss"]}, **comparison.summary()}))


if __name__ == "__main__":
    main()
