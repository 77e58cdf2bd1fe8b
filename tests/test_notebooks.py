"""The Colab notebooks in notebooks/ run end to end on tiny random models and give the right numbers.

Every code cell runs in one namespace, as Jupyter would (shell/magic lines such as `!pip install` become
`pass`); right after the cell tagged "parameters" the test injects its own values (Papermill style):
tiny randomly initialised Hugging Face BLIP-2 directories saved with `save_pretrained`, and tiny images.

References: captions and VQA answers from `blip2_jax.generate` run here on a separately loaded model;
ITC similarities, ITM scores and their recalls from HF `Blip2ForImageTextRetrieval` in torch.
"""
import ast
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

import blip2_jax
from blip2_jax.data.testing import bert_vocab_dir
from blip2_jax.evaluate.captioning import caption_metrics
from blip2_jax.evaluate.retrieval import recall_at_k, rerank_with_itm
from blip2_jax.evaluate.vqa import vqa_accuracy_corpus
from tests import hf_tiny
from tests.helpers import write_images

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
_MAGIC = re.compile(r"^(\s*)[!%]")


def _load(name: str) -> dict:
    with open(os.path.join(NOTEBOOKS, name), encoding="utf-8") as f:
        return json.load(f)


def _source(cell: dict) -> str:
    """A cell's Python: each `!shell` / `%magic` line becomes `pass` at its indentation (keeps blocks valid)."""
    lines = "".join(cell["source"]).split("\n")
    return "\n".join(_MAGIC.sub(r"\1pass  # ", line) if _MAGIC.match(line) else line for line in lines)


def run_notebook(name: str, overrides: dict) -> dict:
    """Runs every code cell of `name` in one namespace; `overrides` are applied after the parameters cell."""
    nb = _load(name)
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one code cell tagged 'parameters', found {len(tagged)}"
    assigned = {t.id for node in ast.parse(_source(tagged[0])).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert set(overrides) <= assigned, f"{name}: not parameters: {sorted(set(overrides) - assigned)}"
    ns = {"__name__": "__main__"}
    for k, cell in enumerate(cells):
        exec(compile(_source(cell), f"{name}[code cell {k}]", "exec"), ns)
        if cell is tagged[0]:
            ns.update(overrides)
    return ns


@pytest.mark.parametrize("name", ["caption_and_vqa.ipynb", "retrieval.ipynb"])
def test_notebook_is_clean_nbformat4(name):
    nb = _load(name)
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
    assert nb["cells"][0]["cell_type"] == "markdown" and "Runtime" in "".join(nb["cells"][0]["source"])
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
    for c in nb["cells"]:
        assert isinstance(c["source"], list) and isinstance(c["metadata"], dict)
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None, "stored outputs"
    setup = "".join(nb["cells"][1]["source"])
    assert "REPO_URL" in setup and '!pip install -q "git+{REPO_URL}"' in setup and "find_spec" in setup


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_caption_and_vqa_notebook(hf_captioner, tmp_path, llm):
    _, _, model_dir = hf_captioner(llm)
    images = write_images(tmp_path, seed=0)
    questions = ["what is this?", "how many red circles are there?", "which shape is left?"]
    prompt, beams, max_new = "a photo of", 3, 8

    # The reference: the same calls made directly, on a separately loaded model (float32 frozen towers).
    model, params = blip2_jax.from_pretrained(model_dir)
    proc = blip2_jax.load_processor(model_dir)
    pixels = proc.preprocess([Image.open(p) for p in images])
    ids, mask = proc.tokenize([prompt] * 3)
    want_captions = proc.decode(blip2_jax.generate(model, params, pixels, ids, mask, num_beams=beams,
                                                   max_new_tokens=max_new, min_new_tokens=1))
    ids, mask = proc.tokenize([f"Question: {q} Short answer:" for q in questions])
    penalty = 0.0 if llm == "opt" else -1.0  # LAVIS's predict_answers defaults
    want_answers = proc.decode(blip2_jax.generate(model, params, pixels, ids, mask, num_beams=5, max_new_tokens=10,
                                                  min_new_tokens=1, length_penalty=penalty))
    assert any(want_captions) and any(want_answers), "a model that only says nothing would not test decoding"

    # References that make the scores depend on what the notebook generated: image 0's caption is among its
    # references; question 0's answer is what 10 humans said, the others get an answer nobody generates.
    caption_set = {images[0]: [want_captions[0], "a red circle left of a blue square"],
                   images[1]: ["a green triangle above a yellow diamond"],
                   images[2]: ["a small purple square", "an orange circle below a triangle"]}
    vqa_set = [(images[0], questions[0], [want_answers[0]] * 10),
               (images[1], questions[1], ["2"] * 7 + ["3"] * 3),
               (images[2], questions[2], ["zzzz"] * 10)]
    ns = run_notebook("caption_and_vqa.ipynb", dict(
        MODEL_DIR=model_dir, FROZEN_DTYPE="float32", IMAGES=images, PROMPT=prompt, NUM_BEAMS=beams,
        MAX_NEW_TOKENS=max_new, MIN_NEW_TOKENS=1, BATCH_SIZE=3, CAPTION_SET=caption_set, VQA_SET=vqa_set))

    assert type(ns["model"]).__name__ == {"opt": "Blip2OPT", "t5": "Blip2T5"}[llm]
    assert ns["IS_T5"] == (llm == "t5")
    assert ns["captions"] == want_captions
    assert ns["set_captions"] == want_captions
    assert ns["vqa_answers"] == want_answers
    refs = dict(enumerate(caption_set.values()))
    assert ns["caption_scores"] == caption_metrics(refs, dict(enumerate(want_captions)))
    assert ns["caption_scores"]["bleu_1"] > 0
    accuracy = vqa_accuracy_corpus(want_answers, [g for _, _, g in vqa_set])
    assert ns["vqa_accuracy"] == accuracy and accuracy >= 1 / 3


def test_retrieval_notebook(tmp_path):
    tok = AutoTokenizer.from_pretrained(bert_vocab_dir(), local_files_only=True)
    tok.save_pretrained(str(tmp_path))
    cfg = hf_tiny.blip2_retrieval_config(vocab=len(tok))
    torch.manual_seed(0)
    hf = hf_tiny.redraw_(Blip2ForImageTextRetrieval(cfg), seed=3)
    hf.save_pretrained(str(tmp_path))
    images = write_images(tmp_path, seed=1)
    texts = ["a red circle", "a blue square left of a green triangle", "two cats on a pink blanket",
             "a woman and her dog on the beach", "a small yellow diamond"]
    text_to_image = [0, 0, 1, 2, 2]
    ks, k_test = (1, 2), 2

    ns = run_notebook("retrieval.ipynb", dict(
        MODEL_DIR=str(tmp_path), FROZEN_DTYPE="float32", IMAGES=images, TEXTS=texts, TEXT_TO_IMAGE=text_to_image,
        KS=ks, K_TEST=k_test, ITM_BATCH=4))

    # Independent reference: HF's image processor and tokenizer, HF's model in torch.
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    pixels = BlipImageProcessorPil(size={"height": 28, "width": 28})(
        [Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    enc = tok(texts, padding=True, return_tensors="pt")
    n_img, n_txt = len(images), len(texts)
    with torch.no_grad():
        itc = hf(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 use_image_text_matching_head=False).logits_per_image.numpy()
        ii, tt = np.meshgrid(np.arange(n_img), np.arange(n_txt), indexing="ij")
        ii, tt = torch.from_numpy(ii.ravel()), torch.from_numpy(tt.ravel())
        itm = hf(pixel_values=pixels[ii], input_ids=enc["input_ids"][tt], attention_mask=enc["attention_mask"][tt],
                 use_image_text_matching_head=True).logits_per_image.numpy().reshape(n_img, n_txt, 2)
    prob = torch.softmax(torch.from_numpy(itm), -1).numpy()[..., 1]
    assert itc.shape == (n_img, n_txt)
    np.testing.assert_allclose(ns["itc"], itc, atol=1e-4)
    np.testing.assert_allclose(ns["itm_prob"], prob, atol=1e-4)
    assert np.ptp(prob) > 0.05 and np.ptp(itc) > 0.05, "random scores too flat to rank"

    img2txt = [[t for t, i in enumerate(text_to_image) if i == img] for img in range(n_img)]
    want = {"itc": recall_at_k(itc, itc.T, text_to_image, img2txt, ks=ks),
            "itm": recall_at_k(prob, prob.T, text_to_image, img2txt, ks=ks)}
    i2t, t2i = rerank_with_itm(itc, lambda i, t: itm[i, t, 1], k_test)
    want["itc+itm"] = recall_at_k(i2t, t2i, text_to_image, img2txt, ks=ks)
    assert ns["recall"] == want
