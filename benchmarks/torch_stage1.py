"""A PyTorch reference of the stage-1 step (ITC + ITM + ITG), which neither Hugging Face nor an installable
LAVIS provides.

Hugging Face's `Blip2ForImageTextRetrieval` holds the frozen ViT, `ln_vision` (`vision_model.post_layernorm`),
the queries, the Q-Former with its text embeddings and text FFNs, the ITC projections and the ITM head, but
no ITG head, no temperature and no losses. `Stage1Reference` wraps it and adds LAVIS's missing parts
(`blip2_qformer.py`, shared/reference/blip2-reference.md section 1):
- the learnable temperature (0.07, no clamp) and the ITG head (`BertLMPredictionHead`: dense + GELU +
  LayerNorm, the decoder tied to the word embeddings, its own bias);
- ITC: per-query image features against the [CLS] text feature, max over queries, `/ temp`, cross-entropy
  with label smoothing 0.1 both ways, halved;
- ITM: one hard negative per row drawn from the softmax of the similarities with the positives masked
  (`torch.multinomial`, as LAVIS; or given, for a step-0 comparison), the 3B batch `[pos, pos, neg]` texts
  against `[pos, neg, pos]` images through the bidirectional [queries; text] pass, plain cross-entropy;
- ITG: [DEC] replaces [CLS]; the text attends causally to itself and fully to the query pass's cached
  self-attention keys/values (not a second query pass: LAVIS reuses `past_key_values`); the LM head; the
  shifted cross-entropy with label smoothing 0.1 over the non-padding tokens.
HF's Q-Former has no key/value cache, so the query pass records its self-attention keys and values with
forward hooks on the `key` / `value` projections, and the ITG pass (`_itg_hidden`) runs HF's layer
modules by hand. The ViT runs under `no_grad` (frozen, as LAVIS freezes it); `ln_vision` trains. One
process: the ITC features are not gathered, and the gradient flows through both sides of every
similarity (blip2_jax's default, `loss.itc_detach_other_side=False`).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LAVIS_LN_VISION_EPS = 1e-5  # LAVIS's ln_vision: torch's default eps (HF configs say 1e-6)
ITC_SMOOTHING = ITG_SMOOTHING = 0.1


class ItgHead(nn.Module):
    """LAVIS's `cls.predictions`: dense + GELU + LayerNorm, then the word embeddings (tied) plus a bias."""

    def __init__(self, hidden: int, vocab: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(F.gelu(self.dense(hidden))) @ word_embeddings.t() + self.bias


class Stage1Reference(nn.Module):
    """`Blip2ForImageTextRetrieval` + temperature + ITG head; `forward` gives the three stage-1 losses."""

    def __init__(self, hf, temperature_init: float = 0.07):
        super().__init__()
        self.hf = hf
        q = hf.config.qformer_config
        self.temp = nn.Parameter(torch.tensor(float(temperature_init)))
        self.itg_head = ItgHead(q.hidden_size, q.vocab_size, q.layer_norm_eps)
        hf.vision_model.post_layernorm.eps = LAVIS_LN_VISION_EPS
        for name, p in self.named_parameters():  # frozen ViT; ln_vision (post_layernorm) trains
            p.requires_grad_(not (name.startswith("hf.vision_model.") and "post_layernorm" not in name))
        hf.vision_model.eval()

    def train(self, mode: bool = True):
        """As `nn.Module.train`, but the frozen ViT stays in eval mode (LAVIS's `disabled_train`)."""
        super().train(mode)
        self.hf.vision_model.eval()
        return self

    def trainable_parameters(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]

    # -- passes ----------------------------------------------------------------------------------
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`ln_vision(ViT(pixels))` in float32; no gradient reaches (or is computed for) the ViT."""
        vision = self.hf.vision_model
        with torch.no_grad():
            dtype = vision.embeddings.patch_embedding.weight.dtype
            hidden = vision.encoder(inputs_embeds=vision.embeddings(pixel_values.to(dtype))).last_hidden_state
        return vision.post_layernorm(hidden.float())

    def query_pass(self, image_embeds: torch.Tensor):
        """`(per-query ITC features [B, Q, E] (normalised), per-layer self-attention (k, v) of the queries)`."""
        queries = self.hf.query_tokens.expand(image_embeds.shape[0], -1, -1)
        with _record_self_attention_kv(self.hf.qformer) as kvs:
            hidden = self.hf.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
        return F.normalize(self.hf.vision_projection(hidden), dim=-1), kvs

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The unimodal (bidirectional) text pass: normalised [CLS] ITC feature `[B, E]`."""
        hidden = self.hf.qformer(query_embeds=self.hf.embeddings(input_ids=ids), query_length=0,
                                 attention_mask=mask).last_hidden_state
        return F.normalize(self.hf.text_projection(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The bidirectional [queries; text] pass with image cross-attention: ITM head averaged over queries."""
        nq = self.hf.config.num_query_tokens
        queries = self.hf.query_tokens.expand(ids.shape[0], -1, -1)
        hidden = self.hf.qformer(query_embeds=self.hf.embeddings(input_ids=ids, query_embeds=queries),
                                 query_length=nq, attention_mask=_with_queries(mask, nq),
                                 encoder_hidden_states=image_embeds).last_hidden_state
        return self.hf.itm_head(hidden[:, :nq]).mean(dim=1)

    def itg_logits(self, dec_ids: torch.Tensor, mask: torch.Tensor, query_kvs: list) -> torch.Tensor:
        """LM logits `[B, T, V]` of the text attending causally to itself and to the cached query K/V."""
        hidden = _itg_hidden(self.hf, dec_ids, mask, query_kvs)
        return self.itg_head(hidden, self.hf.embeddings.word_embeddings.weight)

    # -- the step's losses -----------------------------------------------------------------------------
    def forward(self, pixel_values, input_ids, attention_mask, dec_token_id: int, negatives=None) -> dict:
        """`{"loss", "loss_itc", "loss_itm", "loss_itg"}` of one batch. `negatives`: `(negative image per
        text, negative text per image)` index tensors; None draws them as LAVIS does."""
        image_embeds = self.image_embeds(pixel_values)
        image_feats, query_kvs = self.query_pass(image_embeds)
        text_feats = self.text_features(input_ids, attention_mask)
        sim_i2t = torch.einsum("iqe,te->itq", image_feats, text_feats).max(dim=-1).values
        batch = input_ids.shape[0]
        targets = torch.arange(batch, device=input_ids.device)
        itc = (F.cross_entropy(sim_i2t / self.temp, targets, label_smoothing=ITC_SMOOTHING)
               + F.cross_entropy(sim_i2t.t() / self.temp, targets, label_smoothing=ITC_SMOOTHING)) / 2
        neg_image, neg_text = negatives if negatives is not None else hard_negatives(sim_i2t / self.temp)
        ids3 = torch.cat([input_ids, input_ids, input_ids[neg_text]])
        mask3 = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])
        images3 = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(input_ids.device)
        itm = F.cross_entropy(self.itm_logits(images3, ids3, mask3), labels)
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = dec_token_id  # [DEC] replaces [CLS]
        logits = self.itg_logits(dec_ids, attention_mask, query_kvs)
        lm_labels = dec_ids.masked_fill(attention_mask == 0, -100)
        itg = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lm_labels[:, 1:].reshape(-1),
                              ignore_index=-100, label_smoothing=ITG_SMOOTHING)
        return {"loss": itc + itm + itg, "loss_itc": itc, "loss_itm": itm, "loss_itg": itg}


def hard_negatives(sim_i2t: torch.Tensor):
    """LAVIS's ITM negatives: for each text an image, for each image a text, drawn from the softmax of the
    (temperature-scaled) similarities with the positives (the diagonal) filled with -10000."""
    with torch.no_grad():
        diagonal = torch.eye(sim_i2t.shape[0], dtype=torch.bool, device=sim_i2t.device)
        weights_t2i = F.softmax(sim_i2t.t().float().masked_fill(diagonal, -10000), dim=1)
        weights_i2t = F.softmax(sim_i2t.float().masked_fill(diagonal, -10000), dim=1)
        return torch.multinomial(weights_t2i, 1)[:, 0], torch.multinomial(weights_i2t, 1)[:, 0]


def _with_queries(mask: torch.Tensor, nq: int) -> torch.Tensor:
    """The text mask `[B, T]` with `nq` query positions (always visible) in front."""
    return torch.cat([torch.ones(mask.shape[0], nq, dtype=mask.dtype, device=mask.device), mask], 1)


@contextlib.contextmanager
def _record_self_attention_kv(qformer):
    """Collects each layer's self-attention key and value projections (with their graph) during a pass:
    the cache LAVIS's ITG pass attends to."""
    kvs: list = []
    handles = []
    for layer in qformer.encoder.layer:
        attn = layer.attention.attention
        pair: list = []
        kvs.append(pair)
        for proj in (attn.key, attn.value):
            handles.append(proj.register_forward_hook(lambda _m, _i, out, pair=pair: pair.append(out)))
    try:
        yield kvs
    finally:
        for h in handles:
            h.remove()


def _itg_hidden(hf, dec_ids: torch.Tensor, mask: torch.Tensor, query_kvs: list) -> torch.Tensor:
    """HF's Q-Former layers run over the text alone with the queries' cached K/V in front: self-attention
    (causal over the text, full over the queries), no cross-attention, the text FFN (LAVIS's decoder pass)."""
    qformer = hf.qformer
    hidden = qformer.dropout(qformer.layernorm(hf.embeddings(input_ids=dec_ids)))
    length, nq = dec_ids.shape[1], query_kvs[0][0].shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=dec_ids.device))
    allowed = torch.cat([torch.ones(length, nq, dtype=torch.bool, device=dec_ids.device), causal], 1)
    allowed = allowed[None] & _with_queries(mask, nq).bool()[:, None, :]
    additive = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~allowed, -10000.0)
    for layer, (key, value) in zip(qformer.encoder.layer, query_kvs):
        attn = layer.attention.attention
        heads = lambda x: x.view(x.shape[0], x.shape[1], -1, attn.attention_head_size).transpose(1, 2)  # noqa: E731
        k = heads(torch.cat([key, attn.key(hidden)], 1))
        v = heads(torch.cat([value, attn.value(hidden)], 1))
        out = F.scaled_dot_product_attention(heads(attn.query(hidden)), k, v, attn_mask=additive[:, None],
                                             dropout_p=attn.attention_dropout if attn.training else 0.0)
        attended = layer.attention.output(out.transpose(1, 2).reshape(hidden.shape), hidden)
        hidden = layer.feed_forward_chunk(attended)
    return hidden


# -- building and saving ---------------------------------------------------------------------------------
def hf_config(*, vit_layers: int, vit_width: int, image_size: int, qformer_layers: int, queries: int, vocab: int,
              embed_dim: int = 256):
    """A `Blip2ForImageTextRetrieval` config of these sizes, dropout off (so both sides compute the same loss);
    `vocab` counts [DEC] (the last id)."""
    from transformers import Blip2Config

    heads = max(1, vit_width // 64)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=vit_width, intermediate_size=4 * vit_width, num_hidden_layers=vit_layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=14, layer_norm_eps=1e-6,
                           attention_dropout=0.0),
        qformer_config=dict(hidden_size=vit_width, num_hidden_layers=qformer_layers, num_attention_heads=heads,
                            intermediate_size=4 * vit_width, cross_attention_frequency=2, vocab_size=vocab,
                            encoder_hidden_size=vit_width, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            use_qformer_text_input=True),
        num_query_tokens=queries, image_text_hidden_size=embed_dim)
    cfg.architectures = ["Blip2ForImageTextRetrieval"]
    return cfg


def build(cfg, seed: int = 0) -> Stage1Reference:
    """A randomly initialised reference of `cfg`, its weights spread out (HF draws the ViT near zero)."""
    from transformers import Blip2ForImageTextRetrieval

    from benchmarks import harness

    torch.manual_seed(seed)
    ref = Stage1Reference(Blip2ForImageTextRetrieval(cfg))
    harness.spread_weights_(ref.hf, seed)
    harness.spread_weights_(ref.itg_head, seed + 1)
    return ref


def save_for_ours(ref: Stage1Reference, path: str) -> None:
    """The reference as a stage-1 directory blip2_jax reads (`convert/lavis.load_stage1`, what a stage-1 run's
    `init.stage1_checkpoint` reads): HF's retrieval layout plus `lavis_extra.safetensors` with the
    temperature and the ITG head under LAVIS's names (its decoder is the tied word embeddings)."""
    from blip2_jax.convert.hf_io import write_safetensors
    from blip2_jax.convert.lavis import EXTRA_FILE

    ref.hf.save_pretrained(path)
    head, p = ref.itg_head, "Qformer.cls.predictions."
    extra = {"temp": ref.temp.detach().reshape(1), p + "transform.dense.weight": head.dense.weight,
             p + "transform.dense.bias": head.dense.bias, p + "transform.LayerNorm.weight": head.layer_norm.weight,
             p + "transform.LayerNorm.bias": head.layer_norm.bias, p + "bias": head.bias}
    write_safetensors(os.path.join(path, EXTRA_FILE),
                      {k: np.ascontiguousarray(v.detach().float().numpy()) for k, v in extra.items()},
                      metadata={"format": "pt", "ln_vision_eps": str(LAVIS_LN_VISION_EPS)})
