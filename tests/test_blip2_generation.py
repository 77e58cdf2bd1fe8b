"""Parity of Blip2OPT / Blip2T5 with HF Blip2ForConditionalGeneration (float32), and save_pretrained."""
import json
import os

import numpy as np
import pytest
import torch

import jax.numpy as jnp
from transformers import Blip2ForConditionalGeneration

import blip2_jax
from tests import hf_tiny
from tests.helpers import assert_close
from tests.hf_tiny import torch_pixels

OPT_CONFIGS = {
    "opt_freq2": dict(),
    "opt_freq1": dict(hidden=48, heads=6, layers=3, num_queries=6, cross_freq=1, vision_hidden=48,
                      vision_heads=6, q_hidden=48, q_heads=6),
}


def _hf_inputs(cfg, ids, mask):
    """transformers 5.x wants num_query_tokens image placeholders in front of the text."""
    nq = cfg.num_query_tokens
    b = ids.shape[0]
    ids = np.concatenate([np.full((b, nq), cfg.image_token_index), ids], 1)
    mask = np.concatenate([np.ones((b, nq), mask.dtype), mask], 1)
    return torch.from_numpy(ids), torch.from_numpy(mask)


@pytest.fixture(scope="module", params=list(OPT_CONFIGS))
def opt_model(request, tmp_path_factory):
    cfg = hf_tiny.blip2_opt_config(**OPT_CONFIGS[request.param])
    torch.manual_seed(0)
    hf = hf_tiny.redraw_(Blip2ForConditionalGeneration(cfg), seed=2)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    rng = np.random.default_rng(1)
    size = cfg.vision_config.image_size
    pixels = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    ids = rng.integers(4, cfg.text_config.vocab_size - 1, size=(2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[1, 4:] = 0
    return hf, path, pixels, ids, mask


def _opt_reference(hf, pixels, ids, mask):
    hf_ids, hf_mask = _hf_inputs(hf.config, ids, mask)
    with torch.no_grad():
        logits = hf(pixel_values=torch_pixels(pixels), input_ids=hf_ids, attention_mask=hf_mask).logits
    return logits[:, hf.config.num_query_tokens:].numpy()


def test_opt_text_logits(opt_model):
    hf, path, pixels, ids, mask = opt_model
    model, params = blip2_jax.from_pretrained(path)
    ours = model.apply({"params": params}, pixels, ids, mask)
    assert ours.shape == (2, 6, hf.config.text_config.vocab_size)
    ref = _opt_reference(hf, pixels, ids, mask)
    valid = mask.astype(bool)  # padded positions carry no meaning
    assert_close(np.asarray(ours)[valid], ref[valid])


def test_opt_bfloat16_frozen_towers(opt_model):
    hf, path, pixels, ids, mask = opt_model
    model, params = blip2_jax.from_pretrained(path, frozen_dtype=jnp.bfloat16)
    assert params["language_model"]["layers_0"]["fc1"]["kernel"].dtype == jnp.bfloat16
    ours = np.asarray(model.apply({"params": params}, pixels, ids, mask))
    ref = _opt_reference(hf, pixels, ids, mask)
    valid = mask.astype(bool)
    assert_close(ours[valid], ref[valid], tol=3e-2)


def test_opt_loads_without_image_token_index(opt_model, tmp_path):
    hf, path, pixels, ids, mask = opt_model
    for name in os.listdir(path):
        os.symlink(os.path.join(path, name), tmp_path / name) if name != "config.json" else None
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("image_token_index")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    model, params = blip2_jax.from_pretrained(str(tmp_path))
    ours = np.asarray(model.apply({"params": params}, pixels, ids, mask))
    valid = mask.astype(bool)
    assert_close(ours[valid], _opt_reference(hf, pixels, ids, mask)[valid])


def test_opt_save_pretrained_runs_in_transformers(opt_model, tmp_path):
    hf, path, pixels, ids, mask = opt_model
    model, params = blip2_jax.from_pretrained(path)
    blip2_jax.save_pretrained(model, params, str(tmp_path))
    again = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    got = _opt_reference(again, pixels, ids, mask)
    want = _opt_reference(hf, pixels, ids, mask)
    valid = mask.astype(bool)
    assert_close(got[valid], want[valid], tol=1e-5)
