"""Small helpers shared by the test modules (numpy, PIL, jax; the torch references live in tests/hf_tiny.py)."""
from __future__ import annotations

import io

import numpy as np

# XLA flag of every test process (tests/conftest.py): compile without LLVM's optimisation passes.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def subprocess_xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a JAX process a test starts: the suite's fast compile, and `devices` simulated CPU
    devices (None: the one CPU device)."""
    count = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    return " ".join([*count, FAST_COMPILE])


def assert_close(ours, ref, tol: float = 1e-4) -> float:
    """The parity bound: same shape and max|ours - ref| <= tol * max(1, max|ref|). Returns the error."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    bound = tol * max(1.0, np.abs(ref).max())
    assert err <= bound, f"max |ours - ref| = {err:.3g} > {bound:.3g}"
    return err


def random_image(seed: int, height: int = 20, width: int = 24) -> np.ndarray:
    """A random uint8 HWC RGB image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_bytes(image, fmt: str = "PNG") -> bytes:
    """`image` (a uint8 HWC array, or a seed for `random_image(seed)`) encoded as a `fmt` file."""
    from PIL import Image

    if isinstance(image, (int, np.integer)):
        image = random_image(int(image))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def write_images(directory, seed: int, sizes=((40, 30), (17, 23), (64, 64))) -> list[str]:
    """Random RGB images of `sizes` (height, width) written as `directory/img{i}.png`; their paths. None is at
    the tiny models' 28 px, so a processor's resize matters."""
    import os

    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i, size in enumerate(sizes):
        paths.append(os.path.join(str(directory), f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, size=tuple(size) + (3,), dtype=np.uint8)).save(paths[-1])
    return paths


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """`(tensors, config)` of a Hugging Face directory: every tensor (numpy) by key, and its config.json."""
    from blip2_jax.convert.hf_io import CheckpointReader

    with CheckpointReader(path) as r:
        return {k: r.get(k) for k in r.keys()}, r.config


def write_checkpoint(path, tensors: dict, config: dict) -> str:
    """A Hugging Face directory at `path` (created): `config` as config.json, `tensors` as model.safetensors."""
    import json
    import os

    from blip2_jax.convert.hf_io import write_safetensors

    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    return str(path)


def assert_bad_keys_listed(load, path: str, directory, *, missing: str, unexpected: str) -> None:
    """`load` of a copy of the checkpoint at `path` written to `directory`, without tensor `missing` and with an
    extra tensor `unexpected`, raises a CheckpointError that names both."""
    import re

    import pytest

    from blip2_jax.convert.hf_io import CheckpointError

    tensors, config = read_checkpoint(path)
    tensors.pop(missing)
    tensors[unexpected] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError, match=re.escape(f"missing (1): {missing}")) as e:
        load(write_checkpoint(directory, tensors, config))
    assert f"unexpected (1): {unexpected}" in str(e.value)


def random_params(init):
    """Random values (std 0.3) for the shapes `init` would create (cheaper than compiling the initializers)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    shapes = nn.unbox(jax.eval_shape(init))
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def assert_dropout_and_remat(run, variables) -> None:
    """`run(variables, rng)` returns (logits, logits with dropout, the same again, logits of the remat model):
    dropout changes the logits and follows the rng; remat gives the same logits."""
    import jax

    logits, d1, d2, logits_remat = run(variables, jax.random.key(0, impl="rbg"))  # rbg: cheap to compile
    assert not np.allclose(np.asarray(d1), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    np.testing.assert_allclose(np.asarray(logits_remat), np.asarray(logits), atol=1e-6, rtol=1e-6)


def with_attention_impl(config, impl: str):
    """A BLIP-2 model config whose towers (ViT, Q-Former, LLM) all take `attention_impl=impl`."""
    import dataclasses

    def tower(c):
        return None if c is None else dataclasses.replace(c, attention_impl=impl)
    return dataclasses.replace(config, vision=tower(config.vision), qformer=tower(config.qformer),
                               text=tower(config.text))


def blip2_call_args(model, llm: str) -> tuple:
    """Two random images and token rows for `model.apply` of a BLIP-2 (`llm`: "opt" or "t5"); row 1 is
    left-padded for the decoder-only LLM; T5 gets the same ids as its decoder input."""
    size = model.config.vision.image_size
    rng = np.random.default_rng(1)
    px = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    ids = rng.integers(4, 50, (2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0 if llm == "opt" else 1
    return (px, ids, mask) + ((ids, np.ones_like(ids)) if llm == "t5" else ())
