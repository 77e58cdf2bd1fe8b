"""Parity of the ViT, the Q-Former and the stage-1 heads with HF Blip2ForImageTextRetrieval (float32)."""
import os

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from transformers import Blip2ForImageTextRetrieval

import blip2_jax
from tests import hf_tiny
from tests.helpers import assert_close
from tests.hf_tiny import torch_pixels


@pytest.fixture(scope="module", params=list(hf_tiny.RETRIEVAL_SIZES))
def retrieval(request, hf_retrieval):
    hf, path = hf_retrieval(request.param)
    return (hf, path) + hf_tiny.retrieval_inputs(hf.config)


def test_vision_and_qformer_outputs(retrieval):
    hf, path, pixels, _, _ = retrieval
    model, params = blip2_jax.from_pretrained(path)
    with torch.no_grad():
        vis = hf.vision_model(pixel_values=torch_pixels(pixels)).last_hidden_state
        q = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=vis,
                       encoder_attention_mask=torch.ones(vis.shape[:2], dtype=torch.long)).last_hidden_state
    v = {"params": params}
    ours_vis = model.apply(v, jnp.asarray(pixels), method=lambda m, x: m.image_embeds(m.vit_features(x)))
    assert_close(ours_vis, vis.numpy())
    ours_q, _ = model.apply(v, ours_vis, method=lambda m, e: m.query_outputs(e))
    assert_close(ours_q, q.numpy())


def test_itm_and_itc(retrieval):
    hf, path, pixels, ids, mask = retrieval
    model, params = blip2_jax.from_pretrained(path)
    with torch.no_grad():
        args = dict(pixel_values=torch_pixels(pixels), input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask))
        itm = hf(**args, use_image_text_matching_head=True).logits_per_image.numpy()
        itc = hf(**args, use_image_text_matching_head=False).logits_per_image.numpy()
    v = {"params": params}
    assert_close(model.apply(v, pixels, ids, mask, method="itm"), itm)
    assert_close(model.apply(v, pixels, ids, mask, method="itc"), itc)


def test_bfloat16_frozen_vision_within_tolerance(retrieval):
    hf, path, pixels, ids, mask = retrieval
    model, params = blip2_jax.from_pretrained(path, frozen_dtype=jnp.bfloat16)
    assert params["vision"]["layers_0"]["fc1"]["kernel"].dtype == jnp.bfloat16
    assert params["qformer"]["layernorm"]["scale"].dtype == jnp.float32
    with torch.no_grad():
        itm = hf(pixel_values=torch_pixels(pixels), input_ids=torch.from_numpy(ids),
                 attention_mask=torch.from_numpy(mask), use_image_text_matching_head=True).logits_per_image.numpy()
    assert_close(model.apply({"params": params}, pixels, ids, mask, method="itm"), itm, tol=3e-2)


def test_save_pretrained_round_trip_runs_in_transformers(retrieval, tmp_path):
    hf, path, pixels, ids, mask = retrieval
    model, params = blip2_jax.from_pretrained(path)
    blip2_jax.save_pretrained(model, params, str(tmp_path))
    again = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path)).eval()
    nq = again.config.num_query_tokens
    with torch.no_grad():
        args = dict(pixel_values=torch_pixels(pixels), input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask))
        want = hf(**args, use_image_text_matching_head=True).logits_per_image.numpy()
        if again.config.image_token_index is not None:  # 5.x strips the first num_query_tokens ids
            pad = torch.full((3, nq), again.config.image_token_index)
            args["input_ids"] = torch.cat([pad, args["input_ids"]], 1)
            args["attention_mask"] = torch.cat([torch.ones(3, nq, dtype=torch.long), args["attention_mask"]], 1)
        got = again(**args, use_image_text_matching_head=True).logits_per_image.numpy()
    assert_close(got, want, tol=1e-5)
    # And our reader reads back exactly what we wrote.
    _, params2 = blip2_jax.from_pretrained(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_position_embedding_interpolation_matches_hf(retrieval):
    hf, path, _, _, _ = retrieval
    model, params = blip2_jax.from_pretrained(path)
    size = hf.config.vision_config.image_size + 2 * hf.config.vision_config.patch_size  # a larger grid
    pixels = np.random.default_rng(3).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=torch_pixels(pixels), interpolate_pos_encoding=True).last_hidden_state
    ours = model.apply({"params": params}, pixels, method=lambda m, x: m.image_embeds(m.vit_features(x)))
    assert_close(ours, ref.numpy())


def test_sharded_and_bfloat16_safetensors_load_like_the_single_file(retrieval, tmp_path):
    hf, path, _, _, _ = retrieval
    _, want = blip2_jax.from_pretrained(path)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="50KB")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "sharded") and len(shards) > 1
    _, got = blip2_jax.from_pretrained(str(tmp_path / "sharded"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    # A bfloat16 file: the reader decodes BF16 itself (no torch); values are the bf16 roundings.
    import copy
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    _, got16 = blip2_jax.from_pretrained(str(tmp_path / "bf16"))
    got16.pop("temp"), want.pop("temp")  # not in HF files: our float32 init either way
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), np.asarray(jnp.asarray(b).astype(jnp.bfloat16).astype(jnp.float32))), got16, want)
