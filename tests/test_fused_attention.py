"""`model.attention_impl="fused"` (jax.nn.dot_product_attention) against the einsum form: the kernel
alone (grouped-query heads, an additive mask) and whole BLIP-2 models (OPT and T5) in float32."""
import numpy as np
import pytest

import blip2_jax
from blip2_jax.models import layers
from blip2_jax.models.blip2 import build_model
from tests.helpers import assert_close, blip2_call_args, with_attention_impl


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_fused_equals_einsum_attention(kv_heads):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32) for _ in range(2))
    mask = rng.random((2, 1, 5, 7)) > 0.3
    mask[..., 0] = True
    bias = layers.mask_to_bias(mask)
    for scale in (None, 1.0):
        ref = layers.dot_product_attention(q, k, v, bias, scale=scale)
        assert_close(layers.dot_product_attention(q, k, v, bias, scale=scale, impl="fused"), ref, tol=1e-5)
    with pytest.raises(ValueError, match="attention impl 'flash'"):
        layers.dot_product_attention(q, k, v, impl="flash")


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_blip2_logits_equal_with_fused_attention(hf_blip2, llm):
    _, path, _ = hf_blip2(llm)
    model, params = blip2_jax.from_pretrained(path)
    args = blip2_call_args(model, llm)
    ref = model.apply({"params": params}, *args)
    fused = build_model(with_attention_impl(model.config, "fused")).apply({"params": params}, *args)
    assert_close(fused, ref, tol=1e-5)


def test_logits_to_keep_is_the_tail_of_the_full_logits(hf_blip2):
    """The LLM's `logits_to_keep=N` (the stage-2 loss keeps the text positions, decoding's prefill the last
    one) equals the last N positions of the full logits, with left padding."""
    _, path, _ = hf_blip2("opt")
    model, params = blip2_jax.from_pretrained(path)
    rng = np.random.default_rng(2)
    embeds = rng.normal(size=(2, 9, model.config.text.word_embed_proj_dim)).astype(np.float32)
    mask = np.ones((2, 9), np.int32)
    mask[1, :3] = 0

    def logits(keep):
        return model.apply({"params": params}, embeds, mask, method=lambda m, e, k: m.language_model(
            e, k, logits_to_keep=keep)[0])

    full = np.asarray(logits(0))
    assert full.shape[1] == 9
    for keep in (1, 5):
        np.testing.assert_array_equal(np.asarray(logits(keep)), full[:, -keep:])
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        logits(-1)
