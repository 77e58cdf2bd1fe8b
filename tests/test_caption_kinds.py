"""`python -m blip2_jax.caption --model=PATH --prompt=...` for every checkpoint kind besides BLIP-2 OPT
(tests/test_caption.py): BLIP-2 with FlanT5 and LLaMA, and InstructBLIP with LLaMA and FlanT5 (the CLI has
no per-family code: Qwen2, Mistral and Gemma take the LLaMA path; their BLIP-2 generate is tested in
tests/test_blip2_llm.py),
each a tiny random HF model saved with its HF processor (`Blip2Processor` / `InstructBlipProcessor`, the
latter with its Q-Former tokenizer). Reference: that HF processor's inputs through HF `generate`, cut
at the first EOS and decoded by the tokenizer.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (Blip2ForConditionalGeneration, Blip2Processor, BertTokenizerFast,
                          InstructBlipForConditionalGeneration, InstructBlipProcessor, LlamaConfig)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from blip2_jax import caption
from blip2_jax.data import testing
from tests import hf_tiny
from tests.helpers import write_images

PROMPT = "what colour is the square?"
KINDS = ("blip2-t5", "blip2-llama", "instructblip-llama", "instructblip-t5")


def _text_config(llm: str, tok):
    vocab = len(tok) + 1  # one more id: the processor's <image> placeholder
    if llm == "t5":
        return hf_tiny.blip2_t5_config(vocab=vocab).text_config
    return LlamaConfig(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=1, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _save(kind: str, path: str):
    """A tiny HF model of `kind` and its HF processor, both saved to `path`: `(hf, processor)`."""
    arch, llm = kind.split("-")
    tok = (testing.make_tiny_t5_tokenizer if llm == "t5" else testing.make_tiny_opt_tokenizer)(
        os.path.join(path, "_tok"), vocab_size=120 if llm == "t5" else 300)
    text = _text_config(llm, tok)
    images = BlipImageProcessorPil(size={"height": 28, "width": 28})
    torch.manual_seed(0)
    if arch == "instructblip":
        cfg = hf_tiny.instructblip_config(text)
        hf = InstructBlipForConditionalGeneration(cfg)
        vocab = os.path.join(path, "_tok", "vocab.txt")  # hf_tiny's words + the prompt's: within the Q-Former's 99
        with open(vocab, "w") as f:
            f.write("\n".join(hf_tiny.BERT_SPECIALS + hf_tiny.WORDS + "what colour is the ?".split()) + "\n")
        bert = BertTokenizerFast(vocab=vocab, do_lower_case=True)
        proc = InstructBlipProcessor(images, tok, bert, num_query_tokens=cfg.num_query_tokens)
    else:
        cfg = hf_tiny._conditional_generation(text, text.vocab_size, 4, 2, {})
        hf = Blip2ForConditionalGeneration(cfg)
        proc = Blip2Processor(images, tok, num_query_tokens=cfg.num_query_tokens)
    assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_index
    hf = hf_tiny.redraw_(hf, seed=11, std=0.3)
    hf.save_pretrained(path)
    proc.save_pretrained(path)
    return hf, proc


def _hf_caption(hf, proc, image, **kw) -> str:
    inputs = proc(images=image, text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, **kw)[0].numpy()
    out = out[1:] if hf.config.text_config.is_encoder_decoder else out[inputs["input_ids"].shape[1]:]
    eos = hf.config.text_config.eos_token_id
    out = out[:np.argmax(out == eos)] if (out == eos).any() else out
    return proc.tokenizer.decode(list(out), skip_special_tokens=True).strip()


@pytest.mark.parametrize("kind", KINDS)
def test_caption_cli_prompt_matches_hf(kind, tmp_path, capsys):
    hf, proc = _save(kind, str(tmp_path / "model"))
    os.makedirs(tmp_path / "images")
    (image,) = write_images(tmp_path / "images", seed=2, sizes=((40, 30),))
    args = ["--num_beams=2", "--max_new_tokens=6", "--min_new_tokens=1"]
    assert caption.main([f"--model={tmp_path / 'model'}", f"--prompt={PROMPT}", *args, image]) == 0
    name, text = capsys.readouterr().out.rstrip("\n").split("\t", 1)
    want = _hf_caption(hf, proc, Image.open(image).convert("RGB"), num_beams=2, max_new_tokens=6, min_new_tokens=1,
                       pad_token_id=proc.tokenizer.pad_token_id)
    assert (name, text) == (image, want)
    assert want, "a tiny model that only says nothing would not test decoding"
