"""InstructBLIP against Hugging Face `InstructBlipForConditionalGeneration` (float32), with a LLaMA and a
FlanT5 LLM: logits, `generate` (greedy and beam) token for token up to EOS, and `save_pretrained`.

The instruction enters the Q-Former as `qformer_input_ids` (BERT vocabulary, right-padded as
InstructBlipProcessor pads it) beside the queries. LLM prompts as in tests/test_blip2_llm.py: HF 5.x
scatters the query outputs into `num_query_tokens` image placeholders in front of the text; a
decoder-only batch is left-padded (padding before the placeholders for HF, between the queries and
the text for us: positions come from the mask), a T5 batch right-padded. Odd sizes: 5 queries, a
Q-Former of width 36 with 3 heads and 3 layers, LLaMA with 5 query heads on 1 K/V head.
"""
import jax
import numpy as np
import pytest
import torch
from transformers import InstructBlipForConditionalGeneration, T5Config

import blip2_jax
from blip2_jax.models.blip2 import Blip2DecoderOnly, Blip2T5
from blip2_jax.train import stage2
from tests import hf_tiny
from tests.test_blip2_llm import B, MAX_NEW, PAD, TEXT, VOCAB
from tests.test_blip2_llm import Setup as Blip2Setup
from tests.helpers import assert_close
from tests.hf_tiny import torch_pixels

T, T_DEC = 4, 3
SIZES = dict(q_hidden=36, q_heads=3, q_layers=3, vocab=57, vision_hidden=24, vision_heads=3)


def t5_text():
    return T5Config(vocab_size=VOCAB, d_model=36, d_kv=12, d_ff=68, num_layers=2, num_decoder_layers=2, num_heads=3,
                    feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16)


LLMS = {"llama": lambda: TEXT["llama"](), "t5": t5_text}


def _rows(lengths, width, left: bool):
    """A 0/1 mask `[len(lengths), width]` with each row's ones on the right (left padding) or the left."""
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1 if left else 0
        mask[i, :n] = 0 if left else 1
    return mask


class Setup(Blip2Setup):
    """A tiny HF InstructBLIP, the same model loaded by us, images, instructions and LLM prompts (`check`:
    ours = HF's generate up to EOS, as for BLIP-2)."""

    def __init__(self, kind, tmp_path_factory):
        self.kind, self.cfg = kind, hf_tiny.instructblip_config(LLMS[kind](), num_queries=5, **SIZES)
        torch.manual_seed(0)
        self.hf = hf_tiny.redraw_(InstructBlipForConditionalGeneration(self.cfg), seed=8, std=0.25)
        self.path = str(tmp_path_factory.mktemp(f"instructblip_{kind}"))
        self.hf.save_pretrained(self.path)
        self.model, self.params = blip2_jax.from_pretrained(self.path)
        rng = np.random.default_rng(9)
        size = self.cfg.vision_config.image_size
        self.pixels = rng.normal(size=(B, size, size, 3)).astype(np.float32)
        self.left = kind != "t5"
        self.mask = _rows([4, 2, 3, 1], T, self.left)
        self.ids = np.where(self.mask == 1, rng.integers(4, VOCAB - 1, size=(B, T)), PAD).astype(np.int32)
        self.q_mask = _rows([5, 3, 4, 2], 5, left=False)
        self.q_ids = np.where(self.q_mask == 1, rng.integers(1, SIZES["vocab"], size=(B, 5)), 0).astype(np.int32)
        self.instruction = dict(qformer_input_ids=self.q_ids, qformer_attention_mask=self.q_mask)

    def hf_inputs(self, with_prompt=True):
        """HF 5.x inputs: image placeholders then the text, padded on our side (no prompt: BOS, T5 none)."""
        nq, img = self.cfg.num_query_tokens, self.cfg.image_token_index
        rows, masks = [], []
        for i in range(B):
            if with_prompt:
                n = int(self.mask[i].sum())
                text = list(self.ids[i, T - n:] if self.left else self.ids[i, :n])
            else:
                n, text = T, [self.cfg.text_config.bos_token_id] if self.left else []
            pad = T - n
            row, ones = [img] * nq + text, [1] * (nq + len(text))
            rows.append([PAD] * pad + row if self.left else row + [PAD] * pad)
            masks.append([0] * pad + ones if self.left else ones + [0] * pad)
        return torch.tensor(rows), torch.tensor(masks)

    def hf_call(self, hf=None, **kw):
        q = {k: torch.from_numpy(v).long() for k, v in self.instruction.items()}
        with torch.no_grad():
            return (hf or self.hf)(pixel_values=torch_pixels(self.pixels), **q, **kw)

    def hf_generate(self, with_prompt, **kw):
        ids, mask = self.hf_inputs(with_prompt)
        q = {k: torch.from_numpy(v).long() for k, v in self.instruction.items()}
        kw = {"max_new_tokens": MAX_NEW, "pad_token_id": PAD, "do_sample": False, **kw}
        with torch.no_grad():
            out = self.hf.generate(pixel_values=torch_pixels(self.pixels), input_ids=ids, attention_mask=mask,
                                   **q, **kw).numpy()
        out = out[:, ids.shape[1]:] if self.left else out[:, 1:]  # HF T5 starts with the decoder start id
        return np.pad(out, ((0, 0), (0, MAX_NEW - out.shape[1])), constant_values=PAD)

    def ours(self, with_prompt, **kw):
        text = dict(input_ids=self.ids, attention_mask=self.mask) if with_prompt else {}
        return np.asarray(blip2_jax.generate(self.model, self.params, self.pixels, **text, **self.instruction,
                                             max_new_tokens=MAX_NEW, pad_token_id=PAD, **kw))

    def decoder_inputs(self):
        """T5 decoder ids `[B, T_DEC]` from the start token, right-padded, and their mask."""
        mask = _rows([3, 2, 3, 1], T_DEC, left=False)
        ids = np.random.default_rng(3).integers(2, VOCAB, size=(B, T_DEC))
        ids[:, 0] = self.cfg.text_config.decoder_start_token_id
        return np.where(mask == 1, ids, PAD).astype(np.int32), mask

    def logits(self, hf=None):
        """`(ours, HF)` text logits at the real positions: the prompt (decoder-only) or the decoder (T5)."""
        ids, mask = self.hf_inputs()
        if self.left:
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what HF `generate` uses
            ref = self.hf_call(hf, input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()[:, -T:]
            ours = self.model.apply({"params": self.params}, self.pixels, self.ids, self.mask, **self.instruction)
            return np.asarray(ours)[self.mask == 1], ref[self.mask == 1]
        dec, dec_mask = self.decoder_inputs()
        ref = self.hf_call(hf, input_ids=ids, attention_mask=mask, decoder_input_ids=torch.from_numpy(dec).long(),
                           decoder_attention_mask=torch.from_numpy(dec_mask).long()).logits.numpy()
        ours = self.model.apply({"params": self.params}, self.pixels, self.ids, self.mask, dec, dec_mask,
                                **self.instruction)
        return np.asarray(ours)[dec_mask == 1], ref[dec_mask == 1]


@pytest.fixture(scope="module", params=sorted(LLMS))
def setup(request, tmp_path_factory):
    return Setup(request.param, tmp_path_factory)


def test_logits_match_hf(setup):
    model = setup.model
    assert model.config.instruction_aware
    assert isinstance(model, Blip2T5 if setup.kind == "t5" else Blip2DecoderOnly)
    ours, ref = setup.logits()
    err = assert_close(ours, ref)
    print(f"InstructBLIP {setup.kind} max err {err:.2e} (max|HF| {np.abs(ref).max():.2f})")
    # The instruction matters: another one changes the logits.
    other = dict(setup.instruction, qformer_input_ids=np.roll(setup.q_ids, 1, axis=0))
    args = (setup.pixels, setup.ids, setup.mask) + (setup.decoder_inputs() if setup.kind == "t5" else ())
    changed = np.asarray(model.apply({"params": setup.params}, *args, **other))
    assert np.abs(changed - np.asarray(model.apply({"params": setup.params}, *args, **setup.instruction))).max() > 1e-3


def test_greedy_and_beams_match_hf(setup):
    assert setup.check(True)
    setup.check(False)
    assert any([setup.check(True, num_beams=3, length_penalty=lp) for lp in (1.0, 0.4)])


def test_save_pretrained_runs_in_transformers(setup, tmp_path):
    blip2_jax.save_pretrained(setup.model, setup.params, str(tmp_path))
    again = InstructBlipForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert type(again.language_model) is type(setup.hf.language_model)
    assert_close(setup.logits(again)[1], setup.logits()[1], tol=1e-6)
    model, _ = blip2_jax.from_pretrained(str(tmp_path))
    assert model.config == setup.model.config


def test_instruction_is_required_and_refused_by_blip2(setup):
    args = (setup.pixels, setup.ids, setup.mask) + (setup.decoder_inputs() if setup.kind == "t5" else ())
    with pytest.raises(ValueError, match="needs qformer_input_ids"):
        setup.model.apply({"params": setup.params}, *args)
    with pytest.raises(ValueError, match=r"qformer_input_ids \(4, 5\) and qformer_attention_mask \(4, 3\)"):
        setup.model.apply({"params": setup.params}, *args, qformer_input_ids=setup.q_ids,
                          qformer_attention_mask=setup.q_mask[:, :3])


def test_stage2_loss_matches_hf(setup):
    """train/stage2's LM loss with the instruction in the batch = HF's `labels=` loss (right-padded targets)."""
    rng = np.random.default_rng(7)
    mask = _rows([6, 4, 5, 3], 6, left=False)
    ids = np.where(mask == 1, rng.integers(4, VOCAB - 1, size=(B, 6)), PAD).astype(np.int32)
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    batch = {"image": setup.pixels, **setup.instruction, "labels": labels}
    nq, img = setup.cfg.num_query_tokens, setup.cfg.image_token_index
    if setup.left:  # decoder-only: [queries; prompt + answer], the loss on the answer only
        labels[:, :2] = -100
        batch.update(input_ids=ids, attention_mask=mask)
        hf_in = {"input_ids": np.concatenate([np.full((B, nq), img), ids], 1),
                 "attention_mask": np.concatenate([np.ones((B, nq), np.int32), mask], 1),
                 "labels": np.concatenate([np.full((B, nq), -100), labels], 1)}
    else:  # T5: the prompt to the encoder, the answer as the decoder's target (HF shifts it right)
        start = setup.cfg.text_config.decoder_start_token_id
        batch.update(input_ids=setup.ids, attention_mask=setup.mask, decoder_attention_mask=np.ones_like(mask),
                     decoder_input_ids=np.concatenate([np.full((B, 1), start), ids[:, :-1]], 1).astype(np.int32))
        hf_ids, hf_mask = setup.hf_inputs()
        hf_in = {"input_ids": hf_ids.numpy(), "attention_mask": hf_mask.numpy(), "labels": labels}
    loss, _ = stage2.stage2_loss(setup.model, setup.params, batch, jax.random.PRNGKey(0), train=False)
    ref = float(setup.hf_call(**{k: torch.from_numpy(np.asarray(v)).long() for k, v in hf_in.items()}).loss)
    err = assert_close(float(loss), ref, tol=1e-5)
    print(f"InstructBLIP {setup.kind} stage-2 loss: ours {float(loss):.6f} HF {ref:.6f} err {err:.1e}")
    with pytest.raises(ValueError, match="needs qformer_input_ids"):
        stage2.stage2_loss(setup.model, setup.params, {k: v for k, v in batch.items() if not k.startswith("qformer")},
                           jax.random.PRNGKey(0), train=False)


def test_instruction_templates():
    from blip2_jax.data import instructions

    assert {k: len(v) for k, v in instructions.TEMPLATES.items()} == {"caption": 13, "vqa": 10, "vqg": 6}
    rng = np.random.default_rng(0)
    drawn = {instructions.instruction("vqa", rng, question="what colour is the square?") for _ in range(200)}
    assert len(drawn) == 10 and all("what colour is the square?" in d for d in drawn)
    assert instructions.instruction("caption", rng) in instructions.TEMPLATES["caption"]
    with pytest.raises(ValueError, match=r"takes the fields \('answer',\), got \('question',\)"):
        instructions.instruction("vqg", rng, question="q")
    with pytest.raises(ValueError, match="instruction task 'ocr'"):
        instructions.instruction("ocr", rng)
