"""BLIP-2 with a LLaMA, Qwen2, Mistral or Gemma LLM against Hugging Face `Blip2ForConditionalGeneration`
(float32): text logits, `generate` (greedy and beam) token for token up to EOS, the stage-2 loss against
HF's `labels=` loss, and `save_pretrained`.

As in tests/test_generate.py: HF 5.x scatters the query outputs into `num_query_tokens` image
placeholders (`image_token_index`) in front of the text; a left-padded HF batch puts the padding
before the placeholders, ours between the queries and the text (positions come from the mask, so
both give every token the same position). The EOS of a setting is chosen from HF's own output so
that some rows stop early and others never do.
"""
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig, Qwen2Config

import blip2_jax
from blip2_jax.models.blip2 import Blip2DecoderOnly, Blip2OPT
from blip2_jax.models.decoder import DecoderConfig
from blip2_jax.train import stage2
from tests import hf_tiny
from tests.test_blip2_retrieval import assert_close, torch_pixels

B, T, MAX_NEW, PAD, VOCAB = 4, 4, 10, 0, 120
TEXT = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                 num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=64,
                                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                 rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                      low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_position_embeddings=16)),
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                 num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=64,
                                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # Mistral's window (the default 4096) spans the sequence: with left padding between the queries and the
    # text ours would count the padding (README, "Not done yet").
    "mistral": lambda: transformers.MistralConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=72,
                                                  num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
                                                  max_position_embeddings=64, tie_word_embeddings=False,
                                                  bos_token_id=1, eos_token_id=2),
    "gemma": lambda: transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=72,
                                              num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
                                              head_dim=12, hidden_act="gelu_pytorch_tanh", max_position_embeddings=64,
                                              tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def blip2_config(kind: str):
    base = hf_tiny.blip2_retrieval_config()
    cfg = Blip2Config(vision_config=base.vision_config.to_dict(),
                      qformer_config={**base.qformer_config.to_dict(), "use_qformer_text_input": False},
                      text_config=TEXT[kind]().to_dict(), num_query_tokens=4,
                      image_token_index=VOCAB - 1)
    cfg.architectures = ["Blip2ForConditionalGeneration"]
    return cfg


class Setup:
    """A tiny HF BLIP-2 with this LLM, the same model loaded by us, images and left-padded prompts."""

    def __init__(self, kind, tmp_path_factory):
        self.cfg = blip2_config(kind)
        torch.manual_seed(0)
        self.hf = hf_tiny.redraw_(Blip2ForConditionalGeneration(self.cfg), seed=4, std=0.25)
        self.path = str(tmp_path_factory.mktemp(f"blip2_{kind}"))
        self.hf.save_pretrained(self.path)
        self.model, self.params = blip2_jax.from_pretrained(self.path)
        rng = np.random.default_rng(5)
        size = self.cfg.vision_config.image_size
        self.pixels = rng.normal(size=(B, size, size, 3)).astype(np.float32)
        self.mask = np.zeros((B, T), np.int32)
        for i, n in enumerate([4, 2, 3, 1]):
            self.mask[i, T - n:] = 1
        self.ids = np.where(self.mask == 1, rng.integers(4, VOCAB - 1, size=(B, T)), PAD).astype(np.int32)

    def hf_inputs(self, with_prompt=True, ids=None, mask=None):
        """HF 5.x inputs: [padding] image placeholders, then the text (no prompt: BOS)."""
        ids, mask = (self.ids, self.mask) if ids is None else (ids, mask)
        nq, img = self.cfg.num_query_tokens, self.cfg.image_token_index
        rows, masks = [], []
        for i in range(ids.shape[0]):
            n = int(mask[i].sum()) if with_prompt else 1
            text = list(ids[i, ids.shape[1] - n:]) if with_prompt else [self.cfg.text_config.bos_token_id]
            pad = ids.shape[1] - n if with_prompt else 0
            rows.append([PAD] * pad + [img] * nq + text)
            masks.append([0] * pad + [1] * (nq + n))
        return torch.tensor(rows), torch.tensor(masks)

    def hf_logits(self, hf=None):
        ids, mask = self.hf_inputs()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what HF `generate` uses
        with torch.no_grad():
            out = (hf or self.hf)(pixel_values=torch_pixels(self.pixels), input_ids=ids, attention_mask=mask,
                                  position_ids=positions).logits.numpy()
        return out[:, -T:]  # the text positions (left padding: the last T)

    def hf_generate(self, with_prompt, **kw):
        ids, mask = self.hf_inputs(with_prompt)
        kw = {"max_new_tokens": MAX_NEW, "pad_token_id": PAD, "do_sample": False, **kw}
        with torch.no_grad():
            out = self.hf.generate(pixel_values=torch_pixels(self.pixels), input_ids=ids, attention_mask=mask,
                                   **kw).numpy()[:, ids.shape[1]:]
        return np.pad(out, ((0, 0), (0, MAX_NEW - out.shape[1])), constant_values=PAD)

    def ours(self, with_prompt, **kw):
        text = dict(input_ids=self.ids, attention_mask=self.mask) if with_prompt else {}
        return np.asarray(blip2_jax.generate(self.model, self.params, self.pixels, **text, max_new_tokens=MAX_NEW,
                                             pad_token_id=PAD, **kw))

    def check(self, with_prompt, **kw) -> bool:
        """Ours equals HF up to and including each row's first EOS, padding after it; returns whether the
        EOS ended some rows but not all."""
        full = self.hf_generate(with_prompt, **{**kw, "eos_token_id": VOCAB})  # an EOS the head cannot emit
        kw["eos_token_id"] = eos = _pick_eos(full, exclude={PAD, self.cfg.image_token_index})
        ours, ref = self.ours(with_prompt, **kw), self.hf_generate(with_prompt, **kw)
        ended = (ref == eos).any(axis=1)
        for i in range(B):
            stop = int(np.argmax(ref[i] == eos)) + 1 if ended[i] else MAX_NEW
            np.testing.assert_array_equal(ours[i, :stop], ref[i, :stop], err_msg=f"row {i}, {kw}")
            assert (ours[i, stop:] == PAD).all(), (i, ours[i])
        return 0 < ended.sum() < B


def _pick_eos(hf_rows: np.ndarray, exclude) -> int:
    """A token some rows (not all) emit, at the earliest position: those rows stop early, others never."""
    best = None
    for tok in np.unique(hf_rows):
        rows = (hf_rows == tok).any(axis=1)
        if tok not in exclude and 0 < rows.sum() < len(hf_rows):
            first = min(int(np.argmax(r == tok)) for r in hf_rows[rows])
            if first >= 1 and (best is None or first < best[0]):
                best = (first, int(tok))
    assert best is not None, f"no token separates the rows of {hf_rows}"
    return best[1]


@pytest.fixture(scope="module", params=sorted(TEXT))
def setup(request, tmp_path_factory):
    return Setup(request.param, tmp_path_factory)


def test_text_logits_left_padded(setup):
    model, params = setup.model, setup.params
    assert isinstance(model, Blip2DecoderOnly) and not isinstance(model, Blip2OPT)  # Blip2OPT: OPT only
    assert isinstance(model.config.text, DecoderConfig)
    assert model.config.text.model_type == setup.cfg.text_config.model_type
    ours = np.asarray(model.apply({"params": params}, setup.pixels, setup.ids, setup.mask))
    assert ours.shape == (B, T, VOCAB)
    ref = setup.hf_logits()
    err = assert_close(ours[setup.mask == 1], ref[setup.mask == 1])
    print(f"BLIP-2 {model.config.text.model_type} max err {err:.2e} (max|HF| {np.abs(ref).max():.2f})")


def test_greedy_with_and_without_prompt(setup):
    assert setup.check(True)
    setup.check(False)


def test_beam_search(setup):
    assert any([setup.check(True, num_beams=3, length_penalty=lp) for lp in (1.0, 0.4)])
    setup.check(False, num_beams=5, repetition_penalty=1.3, min_new_tokens=2)


def test_save_pretrained_runs_in_transformers(setup, tmp_path):
    blip2_jax.save_pretrained(setup.model, setup.params, str(tmp_path))
    again = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert type(again.language_model) is type(setup.hf.language_model)
    assert_close(setup.hf_logits(again), setup.hf_logits(), tol=1e-6)
    model, params = blip2_jax.from_pretrained(str(tmp_path))
    assert model.config == setup.model.config


def test_stage2_loss_matches_hf(setup):
    """train/stage2's LM loss on a right-padded batch as the pipeline writes it = HF's `labels=` loss."""
    rng = np.random.default_rng(7)
    mask = (np.arange(6)[None] < np.array([[6], [4], [5], [3]])).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(4, VOCAB - 1, size=(B, 6)), PAD).astype(np.int32)
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    labels[:, :2] = -100  # BOS + a one-token prompt
    batch = {"image": setup.pixels, "input_ids": ids, "attention_mask": mask, "labels": labels}
    loss, _ = stage2.stage2_loss(setup.model, setup.params, batch, jax.random.PRNGKey(0), train=False)
    nq, img = setup.cfg.num_query_tokens, setup.cfg.image_token_index
    hf_in = {"input_ids": np.concatenate([np.full((B, nq), img), ids], 1),
             "attention_mask": np.concatenate([np.ones((B, nq), np.int32), mask], 1),
             "labels": np.concatenate([np.full((B, nq), -100), labels], 1)}
    with torch.no_grad():
        ref = float(setup.hf(pixel_values=torch_pixels(setup.pixels),
                             **{k: torch.from_numpy(v).long() for k, v in hf_in.items()}).loss)
    err = assert_close(float(loss), ref, tol=1e-5)
    print(f"stage-2 loss {setup.cfg.text_config.model_type}: ours {float(loss):.6f} HF {ref:.6f} err {err:.1e}")

