"""Stage-1 train step (ITC + ITM + ITG): blip2_jax's against a PyTorch reference of the same computation.

    python benchmarks/stage1_step.py [--batch=8] [--rounds=5] [--threads=2] [--size=midsize|tiny] [--vocab=N]

The model is the issue's mid-size stage-1 BLIP-2 (benchmarks/harness.py: ViT 6x384 at 224 px, frozen;
Q-Former 6x384 with 32 queries, cross-attention every 2 layers; ITC width 256) with BERT-base's vocabulary
plus [DEC] (30523 ids), captions of up to 32 tokens. It is built in torch (`benchmarks/torch_stage1.py`:
HF's `Blip2ForImageTextRetrieval` plus the temperature, the ITG head and LAVIS's three losses, which HF
lacks), its weights spread out, saved as a stage-1 directory and loaded by our converter
(`convert/lavis.load_stage1`, what `init.stage1_checkpoint` reads). One step on each side: ITC + ITM (hard
negatives) + ITG, backward, AdamW (lr 1e-4, weight decay 0.05) over the trainable parameters only
(`ln_vision`, queries, Q-Former, heads, temperature); the ViT is frozen. Ours is the train loop's own step
(`train/loop.make_train_step` around `train/stage1.stage1_losses`).

Dropout is off on both sides, and at step 0 the torch side takes the hard negatives our step 0 draws
(`our_negatives` redoes that draw), so the two step-0 losses, and each of ITC, ITM and ITG, must agree;
later steps draw their own (torch: `torch.multinomial`, as LAVIS). The sides alternate; the first round of
each is a warm-up (ours compiles there) and is dropped. torch gets `--threads` intra-op threads; XLA's CPU
backend uses one thread per core. Prints one JSON line.
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

SIZES = {  # model sizes, Q-Former vocabulary ([DEC] last), caption length
    "midsize": (harness.MIDSIZE, 30523, 32),
    "tiny": (harness.TINY, 67, 12),
}
PAD, CLS, SEP = 0, 1, 2  # stand-ins for BERT's [PAD], [CLS], [SEP]


def make_batch(image_size: int, vocab: int, batch: int, text_len: int, seed: int = 0) -> dict:
    """A stage-1 batch in the pipeline's layout (numpy, NHWC pixels): [CLS] caption [SEP], right-padded."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(text_len // 2, text_len + 1, size=batch)
    positions = np.arange(text_len)[None]
    mask = (positions < lengths[:, None]).astype(np.int32)
    ids = rng.integers(SEP + 1, vocab - 1, size=(batch, text_len))  # never [DEC] (the last id)
    ids = np.where(positions == lengths[:, None] - 1, SEP, ids)
    ids[:, 0] = CLS
    return {"image": rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
            "input_ids": np.where(mask == 1, ids, PAD).astype(np.int32), "attention_mask": mask}


def torch_inputs(batch: dict, device: str = "cpu") -> dict:
    """The same batch as the torch reference takes it: NCHW pixels, int64 ids."""
    import torch

    return {"pixel_values": torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device),
            "input_ids": torch.from_numpy(batch["input_ids"]).long().to(device),
            "attention_mask": torch.from_numpy(batch["attention_mask"]).long().to(device)}


def loss_config():
    """LAVIS pretraining's loss options: only the diagonal pairs are positives (no image ids here)."""
    from blip2_jax import config_sections

    cfg = config_sections.stage1_loss()
    cfg.itm_exclude_same_image = False
    return cfg


def our_negatives(model, params, batch: dict):
    """The hard negatives our step 0 draws (`stage1_losses`' own draw, with the key the loop hands it):
    `(negative image per text, negative text per image)` as numpy."""
    import jax

    from blip2_jax.train import losses

    rng_itm, _ = jax.random.split(step_fns.loss_key(0))  # as stage1_losses splits its key

    def features(m):
        image_feats, _, _ = m.image_features(m.image_embeds(m.vit_features(batch["image"])))
        return image_feats, m.text_features(batch["input_ids"], batch["attention_mask"]), m.temp

    image_feats, text_feats, temp = jax.jit(lambda p: model.apply({"params": p}, method=features))(params)
    sim_i2t, sim_t2i = losses.itc_similarities(image_feats, text_feats)
    return tuple(np.asarray(x) for x in losses.itm_hard_negatives(sim_i2t / temp, sim_t2i / temp, rng_itm))


def our_step_fn(model, params, batch: dict, dec_token_id: int):
    """The train loop's jitted step over the stage-1 losses, AdamW over the trainable tree only."""
    from blip2_jax.train import stage1

    frozen = {"vision": params["vision"]}
    trainable = {k: v for k, v in params.items() if k != "vision"}
    cfg = loss_config()

    def loss_fn(t, f, b, rng, train):
        return stage1.stage1_losses(model, {**t, **f}, b, rng, train=train, dec_token_id=dec_token_id, loss_cfg=cfg)

    return step_fns.loop_step_fn(loss_fn, trainable, frozen, batch, name="stage1")


def reference_step_fn(ref, inputs: dict, dec_token_id: int, first_negatives=None):
    """The torch reference's step; its first step takes `first_negatives` (numpy pair), later ones draw."""
    import torch

    calls = []

    def compute():
        negatives = None
        if first_negatives is not None and not calls:
            negatives = tuple(torch.from_numpy(np.array(n)).long().to(inputs["input_ids"].device) for n in first_negatives)
        calls.append(1)
        return ref(**inputs, dec_token_id=dec_token_id, negatives=negatives)

    ref.train()
    return step_fns.torch_step_fn(compute, ref.trainable_parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="midsize", choices=tuple(SIZES))
    ap.add_argument("--vocab", type=int, default=0, help="Q-Former vocabulary, [DEC] included (default: the size's)")
    args = ap.parse_args()

    import jax
    import torch

    from benchmarks import torch_stage1
    from blip2_jax.convert import lavis

    torch.set_num_threads(args.threads)
    dims, vocab, text_len = SIZES[args.size]
    vocab = args.vocab or vocab
    ref = torch_stage1.build(torch_stage1.hf_config(**dims, vocab=vocab))
    with tempfile.TemporaryDirectory() as d:
        torch_stage1.save_for_ours(ref, d)
        model, params = lavis.load_stage1(d)
    dec_token_id = vocab - 1
    batch = make_batch(dims["image_size"], vocab, args.batch, text_len)
    negatives = our_negatives(model, params, batch)
    ours, our_metrics = our_step_fn(model, params, batch, dec_token_id)
    theirs, their_metrics = reference_step_fn(ref, torch_inputs(batch), dec_token_id, negatives)
    comparison = harness.alternate(ours, theirs, rounds=args.rounds)
    parts = ("loss", "loss_itc", "loss_itm", "loss_itg")
    print(json.dumps({
        "benchmark": "stage1_train_step", "size": args.size, "batch": args.batch, "text_len": text_len,
        "vocab": vocab, "torch_threads": args.threads, "jax": jax.__version__, "torch": torch.__version__,
        "loss_step0": {"ours": {k: our_metrics[0][k] for k in parts}, "torch": {k: their_metrics[0][k] for k in parts}},
        **comparison.summary()}))


if __name__ == "__main__":
    main()
