"""`load_processor` and `python -m blip2_jax.caption` on a tiny saved BLIP-2 OPT with its own tokenizer.

References: HF `BlipImageProcessorPil` for the pixels, HF `Blip2ForConditionalGeneration.generate` plus
the tokenizer's own `decode` for the captions the command prints.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import blip2_jax
from tests.helpers import subprocess_xla_flags, write_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of"


@pytest.fixture(scope="module")
def saved(hf_captioner, tmp_path_factory):
    """The tiny BLIP-2 OPT with a byte-level BPE tokenizer ("\\n" as EOS, as in BLIP-2), images and a non-image."""
    hf, tok, path = hf_captioner("opt")
    assert len(tok("\n", add_special_tokens=False)["input_ids"]) == 1
    images = write_images(tmp_path_factory.mktemp("caption_images"), seed=0)
    bad = os.path.join(os.path.dirname(images[0]), "notes.txt")
    with open(bad, "w") as f:
        f.write("not an image\n")
    return hf, tok, path, images, bad


def test_preprocess_matches_hf_image_processor(saved):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    _, _, path, images, _ = saved
    proc = blip2_jax.load_processor(path)
    pils = [Image.open(p) for p in images]
    ours = proc.preprocess(pils + [np.asarray(pils[0])])
    size = proc.image_size
    assert size == 28 and ours.shape == (4, size, size, 3) and ours.dtype == np.float32
    ref = BlipImageProcessorPil(size={"height": size, "width": size})(pils, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours[:3], ref.transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_array_equal(ours[3], ours[0])


def test_tokenize_and_decode(saved):
    _, tok, path, _, _ = saved
    proc = blip2_jax.load_processor(path)
    ids, mask = proc.tokenize([PROMPT, "a"])
    want = [tok(p)["input_ids"] for p in (PROMPT, "a")]
    assert want[0][0] == tok.bos_token_id  # OPT-style BOS in front
    assert ids[0].tolist() == want[0] and mask[0].all()
    n = len(want[1])  # left padding
    assert ids[1, -n:].tolist() == want[1] and (ids[1, :-n] == tok.pad_token_id).all()
    assert mask[1].tolist() == [0] * (ids.shape[1] - n) + [1] * n
    right_ids, right_mask = proc.tokenize([PROMPT, "a"], padding_side="right")
    assert right_ids[1, :n].tolist() == want[1] and right_mask[1, n:].sum() == 0

    eos = proc.eos_token_ids[0]
    body = tok(" red circle", add_special_tokens=False)["input_ids"]
    rows = np.array([[tok.bos_token_id] + body + [eos] + body, body + [tok.pad_token_id] * (len(body) + 2)])
    assert proc.decode(rows) == ["red circle", tok.decode(body + [tok.pad_token_id] * 2,
                                                          skip_special_tokens=True).strip()]


def _hf_captions(hf, tok, pixels, prompt, **kw):
    cfg = hf.config
    text = tok(prompt)["input_ids"] if prompt else [cfg.text_config.bos_token_id]
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens + text] * len(pixels))
    with torch.no_grad():
        out = hf.generate(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), input_ids=ids,
                          pad_token_id=tok.pad_token_id, **kw)[:, ids.shape[1]:].numpy()
    eos = cfg.text_config.eos_token_id
    return [tok.decode(list(r[:np.argmax(r == eos)] if (r == eos).any() else r),
                       skip_special_tokens=True).strip() for r in out]


def test_caption_cli(saved):
    hf, tok, path, images, bad = saved
    args = [sys.executable, "-m", "blip2_jax.caption", f"--model={path}", f"--prompt={PROMPT}", "--num_beams=3",
            "--max_new_tokens=8", "--batch_size=2", images[0], bad, images[1], images[2]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags(), "PYTHONPATH": REPO}
    run = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and bad in errors[0] and "not a readable image" in errors[0], run.stderr
    lines = run.stdout.rstrip("\n").split("\n")
    assert [line.split("\t")[0] for line in lines] == images, run.stdout

    proc = blip2_jax.load_processor(path)
    pixels = proc.preprocess([Image.open(p) for p in images])
    want = _hf_captions(hf, tok, pixels, PROMPT, num_beams=3, max_new_tokens=8, min_new_tokens=1)
    assert [line.split("\t", 1)[1] for line in lines] == want
    assert any(want), "a tiny model that only says nothing would not test decoding"


def test_caption_cli_all_good_exit_zero(saved, capsys):
    from blip2_jax import caption

    hf, tok, path, images, _ = saved
    assert caption.main([f"--model={path}", "--num_beams=1", "--max_new_tokens=6", images[1]]) == 0
    out = capsys.readouterr().out.rstrip("\n").split("\t", 1)
    pixels = blip2_jax.load_processor(path).preprocess([Image.open(images[1])])
    assert out == [images[1], _hf_captions(hf, tok, pixels, "", max_new_tokens=6, min_new_tokens=1)[0]]


def test_caption_cli_checks_the_model_path_before_the_images(tmp_path, capsys):
    """A wrong --model is one error line naming it (exit 2), before any image is read."""
    from blip2_jax import caption

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "retrieval").mkdir()
    (tmp_path / "retrieval" / "config.json").write_text(
        '{"model_type": "blip-2", "architectures": ["Blip2ForImageTextRetrieval"]}')
    (tmp_path / "file.txt").write_text("x")
    for model, why in [("/nonexistent_dir", "no such directory"), (tmp_path / "file.txt", "not a directory"),
                       (tmp_path, "no config.json and no checkpoints/"),
                       (tmp_path / "other", "describes a 'bert' model, not BLIP-2"),
                       (tmp_path / "retrieval", "captioning needs Blip2ForConditionalGeneration")]:
        assert caption.main([f"--model={model}", str(tmp_path / "bad.jpg")]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --model={model}: ") and why in err[0], err


def test_caption_cli_second_run_loads_its_programs_from_the_cache(saved, tmp_path):
    """With `--compilation_cache=DIR` the first run writes its compiled programs there; a second run of
    the same command compiles nothing new (the cache holds exactly the same entries) and prints the same
    captions."""
    from benchmarks.startup import caption_runs  # the start-up benchmark's runs, at tiny size

    hf, tok, path, images, _ = saved
    first, second = caption_runs(path, [images[0]], str(tmp_path / "xla"), 2, ("--num_beams=2", "--max_new_tokens=5"))
    assert first["cache_entries"] > 0, "the first run wrote no compiled program"
    assert second["cache_entries"] == first["cache_entries"] and second["stdout"] == first["stdout"]


def test_compilation_cache_directory_and_off_switch(tmp_path, monkeypatch):
    import jax

    from blip2_jax import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.default_directory() == "" and compilation_cache.enable() == ""
    assert compilation_cache.enable("") == "" and jax.config.jax_compilation_cache_dir == before
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))
    assert compilation_cache.default_directory() == str(tmp_path / "env")
    monkeypatch.delenv(compilation_cache.ENV)
    assert compilation_cache.default_directory() == compilation_cache.DEFAULT_DIRECTORY


def test_caption_cli_with_int8_frozen_towers(saved, capsys):
    """`--frozen_dtype=int8` prints the captions of the same model quantised through `from_pretrained`."""
    import jax

    from blip2_jax import caption

    hf, tok, path, images, _ = saved
    argv = [f"--model={path}", "--frozen_dtype=int8", "--num_beams=1", "--max_new_tokens=6", images[1]]
    assert caption.main(argv) == 0
    out = capsys.readouterr().out.rstrip("\n").split("\t", 1)
    model, params = blip2_jax.from_pretrained(path, frozen_dtype="int8")
    assert any(type(x).__name__ == "QuantizedArray" for x in jax.tree.leaves(
        params["language_model"], is_leaf=lambda x: type(x).__name__ == "QuantizedArray"))
    want = caption.caption_batches(model, params, blip2_jax.load_processor(path), [Image.open(images[1])], prompt="",
                                   batch_size=1, max_new_tokens=6, min_new_tokens=1)
    assert out == [images[1], want[0]]
