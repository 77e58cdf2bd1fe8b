"""LAVIS .pth converter: tiny state dicts with LAVIS's key names, built here from tiny HF BLIP-2 models
(the inverse of transformers' convert_blip_2_original_to_pytorch.py), saved with torch.save, converted,
and compared key by key with HF's own tensors and numerically with HF's outputs.
"""
import copy
import re

import numpy as np
import pytest
import torch

import jax
from transformers import Blip2ForConditionalGeneration

import blip2_jax
from blip2_jax.convert import lavis
from blip2_jax.convert.hf_io import CheckpointError, CheckpointReader, SafetensorsFile
from tests import hf_tiny
from tests.helpers import assert_close

CLS = "Qformer.cls.predictions."


def to_lavis(hf_state: dict, llm: str = "") -> dict:
    """HF BLIP-2 keys -> LAVIS keys (the reference's converter map, read backwards)."""
    out = {}
    for key, value in hf_state.items():
        if key.endswith("position_ids"):
            continue
        if key.endswith("self_attn.qkv.bias"):  # HF fuses cat(q_bias, 0, v_bias)
            q, k, v = value.chunk(3)
            assert torch.all(k == 0)
            base = key.replace("vision_model.encoder.layers.", "visual_encoder.blocks.")
            base = base.replace("self_attn.qkv.bias", "attn.")
            out[base + "q_bias"], out[base + "v_bias"] = q.clone(), v.clone()
            continue
        new = key
        for a, b in (("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
                     ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
                     ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
                     ("vision_model.post_layernorm", "ln_vision"),
                     ("vision_model.encoder.layers.", "visual_encoder.blocks."),
                     ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"),
                     ("self_attn.projection", "attn.proj"),
                     ("qformer.layernorm", "Qformer.bert.embeddings.LayerNorm"),
                     ("embeddings.word_embeddings", "Qformer.bert.embeddings.word_embeddings"),
                     ("embeddings.position_embeddings", "Qformer.bert.embeddings.position_embeddings"),
                     ("qformer.", "Qformer.bert."), ("attention.attention.", "attention.self."),
                     ("vision_projection", "vision_proj"), ("text_projection", "text_proj"),
                     ("language_projection", f"{llm}_proj"), ("language_model.", f"{llm}_model.")):
            if new.startswith(a) or (a.startswith(("layer_norm", "self_attn", "attention.")) and a in new):
                new = new.replace(a, b, 1)
        out[new] = value.detach().clone()
    return out


def itg_extras(hf_state: dict, seed: int = 5) -> dict:
    """What LAVIS stage-1 files have beyond HF: temp and the ITG head (decoder tied to the word embeddings)."""
    g = torch.Generator().manual_seed(seed)
    words = hf_state["embeddings.word_embeddings.weight"]
    d, v = words.shape[1], words.shape[0]
    positions = hf_state["embeddings.position_embeddings.weight"].shape[0]
    bias = torch.randn(v, generator=g)
    return {"temp": torch.tensor(0.0625), CLS + "transform.dense.weight": torch.randn(d, d, generator=g) * 0.3,
            CLS + "transform.dense.bias": torch.randn(d, generator=g) * 0.3,
            CLS + "transform.LayerNorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
            CLS + "transform.LayerNorm.bias": torch.randn(d, generator=g) * 0.1,
            CLS + "bias": bias, CLS + "decoder.weight": words.clone(), CLS + "decoder.bias": bias.clone(),
            "Qformer.bert.embeddings.position_ids": torch.arange(positions)[None]}


@pytest.fixture(scope="module", params=list(hf_tiny.RETRIEVAL_SIZES))
def stage1(request, hf_retrieval, tmp_path_factory):
    hf, _ = hf_retrieval(request.param)
    cfg = hf.config
    hf_state = hf.state_dict()
    state = {**to_lavis(hf_state), **itg_extras(hf_state)}
    tmp = tmp_path_factory.mktemp(request.param)
    torch.save({"model": state, "config": {"note": "LAVIS files carry more than the weights"}}, tmp / "ckpt.pth")
    out = str(tmp / "converted")
    lavis.main(["--checkpoint", str(tmp / "ckpt.pth"), "--out", out,
                "--vision-heads", str(cfg.vision_config.num_attention_heads),
                "--qformer-heads", str(cfg.qformer_config.num_attention_heads)])
    return hf, hf_state, state, out


def test_stage1_key_by_key(stage1):
    hf, hf_state, state, out = stage1
    with CheckpointReader(out) as reader:
        want = {k for k in hf_state if not k.endswith("position_ids")}
        assert set(reader.keys()) == want
        for k in want:
            np.testing.assert_array_equal(reader.get(k), hf_state[k].numpy(), err_msg=k)
        assert reader.config["architectures"] == ["Blip2ForImageTextRetrieval"]
    extra = SafetensorsFile(f"{out}/{lavis.EXTRA_FILE}")
    assert set(extra.keys()) == {"temp"} | {k for k in state if k.startswith(CLS) and ".decoder." not in k}
    for k in extra.keys():
        np.testing.assert_array_equal(extra.get(k), state[k].numpy(), err_msg=k)
    extra.close()
    model, params = lavis.load_stage1(out)
    assert params["temp"] == np.float32(0.0625) and model.config.ln_vision_eps == 1e-5
    np.testing.assert_array_equal(params["lm_transform"]["kernel"], state[CLS + "transform.dense.weight"].numpy().T)
    np.testing.assert_array_equal(params["lm_bias"], state[CLS + "bias"].numpy())
    np.testing.assert_array_equal(params["lm_transform_ln"]["scale"], state[CLS + "transform.LayerNorm.weight"].numpy())


def test_stage1_itm_itc_match_hf(stage1):
    hf, _, _, out = stage1
    hf = copy.deepcopy(hf)  # a session fixture's model: changed here on a copy
    hf.vision_model.post_layernorm.eps = lavis.LAVIS_LN_VISION_EPS  # LAVIS's ln_vision, which load_stage1 follows
    pixels, ids, mask = hf_tiny.retrieval_inputs(hf.config)
    with torch.no_grad():
        args = dict(pixel_values=hf_tiny.torch_pixels(pixels), input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask))
        itm = hf(**args, use_image_text_matching_head=True).logits_per_image.numpy()
        itc = hf(**args, use_image_text_matching_head=False).logits_per_image.numpy()
    model, params = lavis.load_stage1(out)
    v = {"params": params}
    run = jax.jit(model.apply, static_argnames="method")
    assert_close(run(v, pixels, ids, mask, method="itm"), itm)
    assert_close(run(v, pixels, ids, mask, method="itc"), itc)


def _stage2(tmp_path, kind, hf_cfg, *, trainable_only: bool):
    torch.manual_seed(0)
    hf = hf_tiny.redraw_(Blip2ForConditionalGeneration(hf_cfg), seed=4, std=0.2)
    if kind == "opt":  # tied head, as in real OPT
        hf.language_model.lm_head.weight = hf.language_model.model.decoder.embed_tokens.weight
    hf_dir, llm_dir = tmp_path / "hf", tmp_path / "llm"
    hf.save_pretrained(str(hf_dir))
    hf.language_model.save_pretrained(str(llm_dir))
    state = to_lavis(hf.state_dict(), llm=kind)
    if trainable_only:  # what LAVIS's runner saves: no frozen ViT, no LLM
        state = {k: v for k, v in state.items() if not k.startswith(("visual_encoder.", f"{kind}_model."))}
    torch.save(state, tmp_path / "stage2.pth")
    out = str(tmp_path / "out")
    argv = ["--checkpoint", str(tmp_path / "stage2.pth"), "--out", out, "--language-model", str(llm_dir),
            "--vision-heads", "4", "--qformer-heads", "4"]
    if trainable_only:
        argv += ["--vision", str(hf_dir)]
    lavis.main(argv)
    return str(hf_dir), out


@pytest.mark.parametrize("kind,trainable_only", [("opt", False), ("opt", True), ("t5", True)])
def test_stage2_converts_to_what_hf_saves(tmp_path, kind, trainable_only):
    hf_cfg = hf_tiny.blip2_opt_config() if kind == "opt" else hf_tiny.blip2_t5_config()
    hf_dir, out = _stage2(tmp_path, kind, hf_cfg, trainable_only=trainable_only)
    with CheckpointReader(hf_dir) as want, CheckpointReader(out) as got:
        assert set(got.keys()) == set(want.keys())
        for k in want.keys():
            np.testing.assert_array_equal(got.get(k), want.get(k), err_msg=k)
    model, params = blip2_jax.from_pretrained(out)
    ref_model, ref_params = blip2_jax.from_pretrained(hf_dir)
    assert type(model) is type(ref_model) and model.config.text == ref_model.config.text
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    vcfg, vparams = lavis.load_vision_from_blip2(hf_dir)  # the EVA tower alone, out of a BLIP-2 directory
    assert vcfg == ref_model.config.vision
    jax.tree.map(np.testing.assert_array_equal, vparams, ref_params["vision"])


def test_missing_towers_and_bad_keys_are_explained(tmp_path):
    cfg = hf_tiny.blip2_opt_config()
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(cfg)
    state = {k: v for k, v in to_lavis(hf.state_dict(), llm="opt").items() if not k.startswith("visual_encoder.")}
    with pytest.raises(CheckpointError, match="--vision"):
        lavis.convert_state_dict(state, vision_heads=4, qformer_heads=4)
    state = to_lavis(hf.state_dict(), llm="opt")
    with pytest.raises(CheckpointError, match="--language-model"):
        lavis.convert_state_dict(state, vision_heads=4, qformer_heads=4)
    with pytest.raises(CheckpointError, match="--qformer-heads"):
        lavis.convert_state_dict(state, vision_heads=4)
    hf.language_model.save_pretrained(str(tmp_path / "llm"))
    state["Qformer.bert.encoder.layer.0.surprise.weight"] = torch.zeros(2)
    del state["opt_proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): opt_proj.bias\n.*unexpected \(1\).*surprise"):
        lavis.convert_state_dict(state, vision_heads=4, qformer_heads=4, language_model_dir=str(tmp_path / "llm"))


def test_pickled_weights_are_refused_naming_the_converter(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pth")
    d = tmp_path / "hf_dir"
    d.mkdir()
    (d / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    for path in (str(tmp_path / "model.pth"), str(d)):
        with pytest.raises(CheckpointError, match=re.escape("python -m blip2_jax.convert.lavis --checkpoint")):
            blip2_jax.from_pretrained(path)


def test_help_names_the_torch_requirement(capsys):
    with pytest.raises(SystemExit):
        lavis.main(["--help"])
    text = capsys.readouterr().out
    assert "torch.load(weights_only=True)" in text and "torch" in text and "--language-model" in text
