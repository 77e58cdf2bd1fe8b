"""Images/s and MFU of the PyTorch reference of a config's train step: the torch half of
benchmarks/accelerator.py, on the same device kind, at the same shapes, batch and FLOP count.

    python benchmarks/accelerator_torch.py --config=configs/stage2.py:opt2.7b --batch=N [--steps=10]
    python benchmarks/accelerator_torch.py --config=configs/stage1.py:vit_g --batch=N [--device=cuda|cpu]

The reference, with random weights at the config's shapes (our model config written as HF's,
`convert/blip2.config_to_hf`; no downloads), on `cuda` when torch sees a GPU, else the CPU:
- stage 2: Hugging Face's `Blip2ForConditionalGeneration` (OPT, T5, LLaMA & co.) forward with labels,
  backward, AdamW over the query tokens, the Q-Former and the language projection; the ViT (its
  `post_layernorm`, our trainable `ln_vision`, included: 2 x width parameters) and the LLM frozen;
- stage 1: `benchmarks/torch_stage1.py` (HF's retrieval model + the ITG head, the temperature and LAVIS's
  ITC + ITM + ITG losses), AdamW over everything but the ViT.
The frozen towers run in the config's `model.frozen_dtype` (bfloat16 for the paper configs: the ViT and
the LLM cast to bfloat16, the trainable parts in float32, as ours); dropout as the config says. The batch
is random, `--batch` examples (default: the config's `train.batch_size`; give the global batch
accelerator.py chose) of `data.max_text_len` tokens. MFU = images/s x our task's FLOPs per example (the
count accelerator.py uses, so the two MFUs compare the same work) / the device's dense bfloat16 peak (the
table in accelerator.py, or `--peak_flops`). A batch that does not fit the GPU prints `"fits": false`.
Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import accelerator, stage1_step, step_fns, torch_stage1, train_step  # noqa: E402
from blip2_jax.convert import blip2 as hf_blip2  # noqa: E402
from blip2_jax.plan import planning_config  # noqa: E402
from blip2_jax.spec import model as spec  # noqa: E402
from blip2_jax.train import stage1, stage2  # noqa: E402


def define_flags() -> dict:
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Experiment config (stage1 or stage2).",
                                                  lock_config=True),
        "batch": flags.DEFINE_integer("batch", 0, "Global batch (default: the config's train.batch_size)."),
        "steps": flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps)."),
        "device": flags.DEFINE_enum("device", "auto", ["auto", "cuda", "cpu"], "auto: cuda when available."),
        "threads": flags.DEFINE_integer("threads", 0, "torch intra-op threads on the CPU (0: torch's default)."),
        "peak_flops": flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s of the device (default: the table)."),
    }


def check_supported(config) -> None:
    """The configs whose step the reference can express; a clear error for the rest."""
    if config.model.get("train_vision"):
        raise ValueError("model.train_vision=True: the torch reference keeps the ViT frozen (stage-1 and stage-2 "
                         "pretraining steps only)")
    if config.model.get("instruction_aware"):
        raise ValueError("model.instruction_aware=True (InstructBLIP): no torch reference of that step here")
    if config.model.get("frozen_dtype") not in ("float32", "bfloat16"):
        raise ValueError(f"model.frozen_dtype={config.model.frozen_dtype!r}: the torch reference runs float32 or "
                         "bfloat16 frozen towers")


def build_stage1(model_cfg, device, frozen_dtype):
    """The stage-1 reference of our model config, on `device`, its ViT in `frozen_dtype`."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    ref = torch_stage1.Stage1Reference(Blip2ForImageTextRetrieval(Blip2Config(**hf_blip2.config_to_hf(model_cfg))),
                                       temperature_init=model_cfg.temperature_init)
    vision = ref.hf.vision_model
    vision.embeddings.to(frozen_dtype)
    vision.encoder.to(frozen_dtype)  # post_layernorm (ln_vision) trains: float32
    return ref.to(device)


def build_stage2(model_cfg, device, frozen_dtype):
    """HF's `Blip2ForConditionalGeneration` of our model config, on `device`, the ViT and LLM in `frozen_dtype`
    and frozen; the language projection takes the Q-Former's output in float32 (HF casts it to the ViT's dtype)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    hf = Blip2ForConditionalGeneration(Blip2Config(**hf_blip2.config_to_hf(model_cfg)))
    hf.vision_model.to(frozen_dtype)
    hf.language_model.to(frozen_dtype)
    projection = hf.language_projection
    projection.register_forward_pre_hook(lambda m, args: tuple(a.to(m.weight.dtype) for a in args))
    for name, p in hf.named_parameters():
        p.requires_grad_(not name.startswith(("vision_model.", "language_model.")))
    hf.vision_model.eval()
    return hf.to(device)


def step_fn(config, model_cfg, batch: int, device: str):
    """`(step, metrics, flops per example)` of the reference's step on a random batch of `batch` examples."""
    import torch

    text_len = int(config.data.max_text_len)
    frozen_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.model.frozen_dtype]
    if config.task == "stage1":
        ref = build_stage1(model_cfg, device, frozen_dtype)
        vocab = model_cfg.qformer.vocab_size
        data = stage1_step.make_batch(model_cfg.vision.image_size, vocab, batch, text_len)
        inputs = stage1_step.torch_inputs(data, device)
        ref.train()
        step, metrics = step_fns.torch_step_fn(lambda: ref(**inputs, dec_token_id=vocab - 1),
                                               ref.trainable_parameters())
        return step, metrics, stage1.flops_per_example(model_cfg, text_len)
    hf = build_stage2(model_cfg, device, frozen_dtype)
    llm = "t5" if type(model_cfg.text).__name__ == "T5Config" else "opt"  # the batch layout: encoder-decoder or not
    data = train_step.make_batch(hf.config, batch, llm, text_len=text_len)
    inputs = {k: v.to(device) for k, v in train_step.hf_inputs(hf.config, data, llm).items()}
    hf.train()
    hf.vision_model.eval()
    step, metrics = step_fns.torch_step_fn(lambda: {"loss": hf(**inputs).loss},
                                           [p for p in hf.parameters() if p.requires_grad])
    return step, metrics, stage2.flops_per_example(model_cfg, text_len)


def pick_device(flag: str) -> str:
    import torch

    if flag == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda: torch sees no GPU")
    return "cuda" if flag == "cuda" or (flag == "auto" and torch.cuda.is_available()) else "cpu"


def device_kind(device: str) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def run(config, batch: int = 0, steps: int = 10, device: str = "auto", peak: float = 0.0, threads: int = 0,
        name: str = "") -> dict:
    import torch

    config = planning_config(config)  # no checkpoints, no evaluation data: random weights, shapes only
    check_supported(config)
    model_cfg = spec.model_of(config, spec.tokenizer(config) if config.task == "stage1" else None).config
    device = pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    batch = batch or int(config.train.batch_size)
    peak = peak or accelerator.peak_flops_of(device_kind(device))
    report = {"config": name, "task": config.task, "implementation": "torch", "torch": torch.__version__,
              "device_kind": device_kind(device), "devices": 1, "global_batch": batch,
              "frozen_dtype": str(config.model.frozen_dtype), "steps": steps, "peak_flops_per_device": peak}
    try:
        step, metrics, flops = step_fn(config, model_cfg, batch, device)
        times = []
        for i in range(steps + 2):
            start = time.perf_counter()
            step()  # reads the loss back: waits for the step
            if i >= 2:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as e:
        return {**report, "fits": False, "error": str(e).splitlines()[0]}
    step_s = float(np.median(times))
    images_per_s = batch / step_s
    loss = metrics[-1]["loss"]
    return {**report, "fits": True, "step_seconds": step_s, "images_per_second": images_per_s,
            "flops_per_example": flops, "mfu": images_per_s * flops / peak if peak else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "loss": loss, "loss_finite": bool(np.isfinite(loss))}


def main(argv, cli: dict) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
    try:
        report = run(cli["config"].value, cli["batch"].value, cli["steps"].value, cli["device"].value,
                     cli["peak_flops"].value, cli["threads"].value, name=name)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    _cli = define_flags()
    app.run(lambda argv: main(argv, _cli))
