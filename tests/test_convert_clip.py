"""CLIP ViT-L-style loader: our clip-style VisionTransformer == HF CLIPVisionModel hidden_states[-2]."""
import dataclasses

import numpy as np
import pytest
import torch

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from blip2_jax.convert import clip
from blip2_jax.convert.hf_io import CheckpointError
from blip2_jax.models.blip2 import Blip2Config, Blip2Stage1
from blip2_jax.models.qformer import QFormerConfig
from tests import hf_tiny
from tests.helpers import assert_close

# Two shapes; "clip_model" is saved as a full CLIPModel (keys under `vision_model.`, text tower present).
CONFIGS = {
    "vision_model": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                         image_size=28, patch_size=14),
    "clip_model": dict(hidden_size=48, intermediate_size=100, num_hidden_layers=4, num_attention_heads=6,
                       image_size=42, patch_size=14),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def clip_dir(request, tmp_path_factory):
    vcfg = CLIPVisionConfig(**CONFIGS[request.param])
    torch.manual_seed(0)
    if request.param == "clip_model":
        full = CLIPModel(CLIPConfig(vision_config=vcfg.to_dict(),
                                    text_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                                     num_attention_heads=2, vocab_size=30, bos_token_id=0,
                                                     eos_token_id=1, pad_token_id=1)))
        hf_tiny.redraw_(full, seed=2, std=0.2)
        path = str(tmp_path_factory.mktemp(request.param))
        full.save_pretrained(path)
        hf = CLIPVisionModel(vcfg)
        hf.load_state_dict(full.vision_model.state_dict())
    else:
        hf = hf_tiny.redraw_(CLIPVisionModel(vcfg), seed=1, std=0.2)
        path = str(tmp_path_factory.mktemp(request.param))
        hf.save_pretrained(path)
    return hf.eval(), path, vcfg


def test_penultimate_hidden_state_matches_hf(clip_dir):
    hf, path, vcfg = clip_dir
    model, params = clip.load(path)
    assert model.config.style == "clip" and model.config.num_layers == vcfg.num_hidden_layers - 1
    assert model.config.hidden_act == "quick_gelu" and model.config.layer_norm_eps == 1e-5
    assert "patch_bias" not in params["embeddings"] and f"layers_{vcfg.num_hidden_layers - 1}" not in params
    pixels = np.random.default_rng(0).normal(size=(2, vcfg.image_size, vcfg.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    ref = out.hidden_states[-2].numpy()
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(pixels))
    err = assert_close(ours, ref)
    # The last block matters: the last hidden state differs (so the test would see a wrong layer count).
    assert np.abs(out.hidden_states[-1].numpy() - ref).max() > 100 * max(err, 1e-6)


def test_loaded_tower_fits_a_stage1_model(clip_dir):
    _, path, vcfg = clip_dir
    vmodel, vparams = clip.load(path)
    qcfg = QFormerConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24, vocab_size=20,
                         max_position_embeddings=8, encoder_hidden_size=vcfg.hidden_size, num_query_tokens=2)
    cfg = Blip2Config(vision=vmodel.config, qformer=qcfg, num_query_tokens=2, image_text_hidden_size=8)
    model = Blip2Stage1(cfg)
    ids = jnp.ones((1, 3), jnp.int32)
    pixels = jnp.zeros((1, vcfg.image_size, vcfg.image_size, 3))
    init = jax.eval_shape(model.init, jax.random.PRNGKey(0), pixels, ids, ids)
    params = clip.with_vision(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(init["params"])), vparams)
    clip.check_matches(vmodel.config, cfg.vision)
    np.testing.assert_array_equal(params["vision"]["layers_0"]["fc1"]["kernel"], vparams["layers_0"]["fc1"]["kernel"])
    with pytest.raises(CheckpointError, match="layers_0/fc1/kernel"):
        clip.with_vision(params, {**vparams, "layers_0": {**vparams["layers_0"], "fc1": {
            "kernel": vparams["layers_0"]["fc1"]["kernel"][:, :3], "bias": vparams["layers_0"]["fc1"]["bias"]}}})
    with pytest.raises(CheckpointError, match="num_layers"):
        clip.check_matches(vmodel.config, dataclasses.replace(vmodel.config, num_layers=vmodel.config.num_layers + 1))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    vcfg = CLIPVisionConfig(**CONFIGS["vision_model"])
    hf = CLIPVisionModel(vcfg)
    sd = {k: v.numpy() for k, v in hf.state_dict().items() if "layers.0.mlp.fc1" not in k}
    sd["encoder.surprise.weight"] = np.zeros(3, np.float32)
    from blip2_jax.convert.hf_io import write_safetensors
    hf.config.save_pretrained(str(tmp_path))
    write_safetensors(str(tmp_path / "model.safetensors"), sd)
    with pytest.raises(CheckpointError, match=r"missing \(2\).*fc1.*\n.*unexpected \(1\).*encoder.surprise"):
        clip.load(str(tmp_path))
