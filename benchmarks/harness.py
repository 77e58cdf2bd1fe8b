"""Shared pieces of the speed benchmarks: the issue's mid-size BLIP-2 built in Hugging Face, and a timer
that records how much CPU other processes took during each timed call.

Contention biases a ratio: when another process takes a core, torch's threads slow down 3-9x and XLA's
about 2x. So every timed call also records the CPU seconds the rest of the machine used meanwhile
(`/proc/stat` busy time minus this process's own `/proc/self/stat` time), and a round counts as clean
only while that stayed under `CLEAN_CORES` of a core. Medians are over clean rounds when there are
enough of them, else over all rounds (the printout says which).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np

CLEAN_CORES = 0.25
_TICKS = os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclasses.dataclass
class Timing:
    seconds: float
    others_cores: float  # mean cores other processes used during the call

    @property
    def clean(self) -> bool:
        return self.others_cores < CLEAN_CORES


def timed(fn: Callable[[], object]) -> Timing:
    """Run `fn` once; its wall seconds and the cores other processes used meanwhile."""
    busy0, own0, t0 = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    others = (_machine_busy_seconds() - busy0) - (_own_cpu_seconds() - own0)
    return Timing(seconds, max(0.0, others) / seconds)


@dataclasses.dataclass
class Comparison:
    ours: list[Timing]
    theirs: list[Timing]

    def _pick(self, timings: list[Timing], min_clean: int) -> tuple[list[float], bool]:
        clean = [t.seconds for t in timings if t.clean]
        return (clean, True) if len(clean) >= min_clean else ([t.seconds for t in timings], False)

    def summary(self, min_clean: int = 3) -> dict:
        ours, ours_clean = self._pick(self.ours, min_clean)
        theirs, theirs_clean = self._pick(self.theirs, min_clean)
        others = [t.others_cores for t in self.ours + self.theirs]
        return {"ours_s": float(np.median(ours)), "theirs_s": float(np.median(theirs)),
                "ratio": float(np.median(theirs) / np.median(ours)),
                "clean_rounds": sum(t.clean for t in self.ours + self.theirs), "rounds": len(others),
                "medians_over_clean_rounds": ours_clean and theirs_clean,
                "others_cores_max": float(max(others)), "others_cores_median": float(np.median(others))}


def alternate(ours: Callable[[], object], theirs: Callable[[], object], rounds: int, warmup: int = 1) -> Comparison:
    """Time `ours` and `theirs` alternately, `rounds` times each after `warmup` untimed rounds each."""
    for _ in range(warmup):
        ours()
        theirs()
    result = Comparison([], [])
    for i in range(rounds):
        # Alternate which side goes first, so a slow drift in the machine's state hits both alike.
        pair = ((ours, result.ours), (theirs, result.theirs))
        for fn, out in (pair if i % 2 == 0 else pair[::-1]):
            out.append(timed(fn))
    return result


def spread_weights_(model, seed: int) -> None:
    """Redraw `model`'s weights spread out (norm scales near 1, the rest ~ 0.5 / sqrt(fan-in)), so that
    decoding is not a sequence of near-ties."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1))


# The mid-size BLIP-2: ViT 6x384 at 224 px, Q-Former 6x384 with 32 queries, an LLM of
# OPT-125m's shape (or a T5 of the same width), no dropout (so both sides compute the same loss).
MIDSIZE = dict(vit_layers=6, vit_width=384, image_size=224, qformer_layers=6, queries=32)
TINY = dict(vit_layers=1, vit_width=48, image_size=28, qformer_layers=2, queries=4)


def build_hf_blip2(llm: str = "opt", *, vit_layers: int, vit_width: int, image_size: int, qformer_layers: int,
                   queries: int, llm_layers: int = 12, llm_width: int = 768, vocab: int = 50272, seed: int = 0):
    """A randomly initialised HF `Blip2ForConditionalGeneration` (eval-free: dropout probabilities 0)."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config

    heads = max(1, llm_width // 64)
    if llm == "opt":
        text = OPTConfig(vocab_size=vocab, hidden_size=llm_width, num_hidden_layers=llm_layers, ffn_dim=4 * llm_width,
                         num_attention_heads=heads, max_position_embeddings=2048, word_embed_proj_dim=llm_width,
                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
                         bos_token_id=2, eos_token_id=2)
    elif llm == "t5":
        text = T5Config(vocab_size=vocab, d_model=llm_width, d_kv=64, d_ff=2 * llm_width, num_layers=llm_layers // 2,
                        num_decoder_layers=llm_layers // 2, num_heads=heads, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                        eos_token_id=1)
    else:
        raise ValueError(f"llm must be 'opt' or 't5', got {llm!r}")
    vit_heads = max(1, vit_width // 64)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=vit_width, intermediate_size=4 * vit_width, num_hidden_layers=vit_layers,
                           num_attention_heads=vit_heads, image_size=image_size, patch_size=14,
                           layer_norm_eps=1e-6, attention_dropout=0.0),
        qformer_config=dict(hidden_size=vit_width, num_hidden_layers=qformer_layers, num_attention_heads=vit_heads,
                            intermediate_size=4 * vit_width, cross_attention_frequency=2, vocab_size=30522,
                            encoder_hidden_size=vit_width, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0),
        text_config=text.to_dict(), num_query_tokens=queries, image_token_index=vocab - 1)
    torch.manual_seed(seed)
    return Blip2ForConditionalGeneration(cfg)
