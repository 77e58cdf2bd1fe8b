"""Tiny randomly initialised Hugging Face models for parity tests (torch is the reference)."""
from __future__ import annotations

import torch

# Two shapes of the tiny retrieval model: cross-attention every 2nd layer (the default), and every layer
# with wider towers, more layers, queries and heads.
RETRIEVAL_SIZES = {
    "freq2": dict(),
    "freq1_wide": dict(vision_hidden=48, vision_layers=3, vision_heads=6, q_hidden=48, q_layers=3, q_heads=6,
                       cross_freq=1, num_queries=6, embed_dim=12),
}
# A BERT vocabulary for captions of coloured shapes (ids 0-4: BERT's special tokens).
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "a red blue green yellow small large circle circles square triangle diamond left of two objects".split()


def redraw_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Re-draw every parameter so that every layer matters (HF's vision init is ~1e-10).

    Norm scales get 1 + N(0, 0.1), everything else N(0, std); the EVA k bias stays zero as in real
    checkpoints (a k bias cannot change attention anyway).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if ("norm" in name.lower() or "LayerNorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)
            if name.endswith("self_attn.qkv.bias"):
                third = p.shape[0] // 3
                p[third:2 * third] = 0.0
    return model.eval()


def blip2_retrieval_config(*, vision_hidden=32, vision_layers=2, vision_heads=4, image_size=28, patch=14,
                           q_hidden=32, q_layers=2, q_heads=4, cross_freq=2, num_queries=4, vocab=99,
                           embed_dim=16, image_token_index=None):
    from transformers import Blip2Config
    cfg = Blip2Config(
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden + 8,
                           num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                           image_size=image_size, patch_size=patch, layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=q_hidden, num_hidden_layers=q_layers, num_attention_heads=q_heads,
                            intermediate_size=2 * q_hidden + 4, cross_attention_frequency=cross_freq,
                            vocab_size=vocab, max_position_embeddings=40, use_qformer_text_input=True),
        num_query_tokens=num_queries, image_text_hidden_size=embed_dim,
    )
    cfg.architectures = ["Blip2ForImageTextRetrieval"]
    if image_token_index is not None:
        cfg.image_token_index = image_token_index
    return cfg


def _conditional_generation(text, vocab, num_queries, cross_freq, vision, instruct=False):
    """A `Blip2ForConditionalGeneration` config: hf_tiny's retrieval towers (no Q-Former text input) + `text`;
    `instruct`: an `InstructBlipForConditionalGeneration` one (its Q-Former reads the instruction)."""
    from transformers import Blip2Config, InstructBlipConfig
    base = blip2_retrieval_config(num_queries=num_queries, cross_freq=cross_freq, **vision)
    kind, name = (InstructBlipConfig, "InstructBlip") if instruct else (Blip2Config, "Blip2")
    qformer = {k: v for k, v in base.qformer_config.to_dict().items() if k != "model_type"}
    if not instruct:
        qformer["use_qformer_text_input"] = False
    vision_dict = {k: v for k, v in base.vision_config.to_dict().items() if k != "model_type"}
    cfg = kind(vision_config=vision_dict, qformer_config=qformer, text_config=text.to_dict(),
               num_query_tokens=num_queries, image_token_index=vocab - 1)
    cfg.architectures = [f"{name}ForConditionalGeneration"]
    return cfg


def instructblip_config(text, *, num_queries=4, cross_freq=2, **vision):
    """An `InstructBlipForConditionalGeneration` config around the HF text config `text` (odd sizes via `vision`:
    any `blip2_retrieval_config` argument)."""
    return _conditional_generation(text, text.vocab_size, num_queries, cross_freq, vision, instruct=True)


def blip2_opt_config(*, vocab=120, hidden=32, layers=2, heads=4, num_queries=4, cross_freq=2, **vision):
    from transformers import OPTConfig
    text = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden + 4,
                     num_attention_heads=heads, max_position_embeddings=64, word_embed_proj_dim=hidden,
                     pad_token_id=1, bos_token_id=2, eos_token_id=3)
    return _conditional_generation(text, vocab, num_queries, cross_freq, vision)


def blip2_t5_config(*, vocab=120, d_model=32, layers=2, heads=4, num_queries=4, cross_freq=2, **vision):
    from transformers import T5Config
    text = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model + 4,
                    num_layers=layers, num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                    dense_act_fn="gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                    eos_token_id=1, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return _conditional_generation(text, vocab, num_queries, cross_freq, vision)


def torch_pixels(pixels) -> torch.Tensor:
    """NHWC numpy pixels as the NCHW tensor HF models take."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def retrieval_inputs(cfg, seed: int = 0):
    """Inputs for an HF retrieval `cfg`'s model: 3 random NHWC images and 3 texts of 7 random ids, the
    second padded after 5 tokens and the third after 3. Returns `(pixels, ids, mask)` as numpy."""
    import numpy as np
    rng = np.random.default_rng(seed)
    size = cfg.vision_config.image_size
    pixels = rng.normal(size=(3, size, size, 3)).astype(np.float32)
    ids = rng.integers(1, cfg.qformer_config.vocab_size, size=(3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return pixels, ids, mask


def hf_retrieval_scores(hf, vocab_dir: str, images, texts, k: int, max_len: int = 35):
    """The reference retrieval scores of an HF `Blip2ForImageTextRetrieval`, in torch: ITC similarities
    `[N_img, N_txt]` of CLIP-normalised uint8 HWC `images` (no resize) and `texts` (BERT `vocab.txt`
    in `vocab_dir`, padded to `max_len`), and LAVIS's re-ranking of each row's top `k` by ITM + ITC
    (`-100` elsewhere). Returns `(sims, score_i2t, score_t2i)` as numpy."""
    import os

    import numpy as np
    from transformers import BertTokenizerFast

    from blip2_jax.data.image_ops import CLIP_MEAN, CLIP_STD

    tok = BertTokenizerFast(vocab=os.path.join(vocab_dir, "vocab.txt"), do_lower_case=True)
    enc = tok(list(texts), padding="max_length", max_length=max_len, return_tensors="pt")
    x = np.stack(images).astype(np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    px = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        sims = hf(pixel_values=px, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                  use_image_text_matching_head=False).logits_per_image.numpy()
        ni, nt = sims.shape
        ii, tt = np.repeat(np.arange(ni), nt), np.tile(np.arange(nt), ni)
        itm = hf(pixel_values=px[ii], input_ids=enc.input_ids[tt], attention_mask=enc.attention_mask[tt],
                 use_image_text_matching_head=True).logits_per_image[:, 1].numpy().reshape(ni, nt)
    i2t, t2i = np.full((ni, nt), -100.0), np.full((nt, ni), -100.0)
    for i in range(ni):  # LAVIS: each image's top-k texts by ITC get itm + sim
        top = np.argsort(-sims[i], kind="stable")[:k]
        i2t[i, top] = itm[i, top] + sims[i, top]
    for t in range(nt):
        top = np.argsort(-sims[:, t], kind="stable")[:k]
        t2i[t, top] = itm[top, t] + sims[top, t]
    return sims, i2t, t2i
