"""The stage-2 configs with a LLaMA-family and a Qwen-family LLM (`llama3.2-1b`, `qwen2.5-1.5b`) from
abstract shapes: no weights. The LLM is described by its Hugging Face config.json fields (as
`init.llm_checkpoint`'s config.json gives them); the parameter counts are the published models'.
"""
import jax
import pytest

from blip2_jax import sharding
from blip2_jax.models.blip2 import Blip2DecoderOnly
from blip2_jax.spec import model as spec
from blip2_jax.train import aot, stage2
from configs import stage2 as stage2_config

LLAMA_3_2_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0,
                                                           original_max_position_embeddings=8192),
                    bos_token_id=128000, eos_token_id=128001)
QWEN2_5_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, hidden_act="silu",
                    max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1e6,
                    use_sliding_window=False, sliding_window=131072, max_window_layers=21,
                    bos_token_id=151643, eos_token_id=151643)


def by_hand(vocab, d, f, n, heads, kv, head_dim, qkv_bias):
    """Tied embeddings + n blocks (q, k, v, o, gate, up, down, 2 RMSNorms) + the final RMSNorm."""
    attn = d * head_dim * (2 * heads + 2 * kv) + (head_dim * (heads + 2 * kv) if qkv_bias else 0)
    return vocab * d + n * (attn + 3 * d * f + 2 * d) + d


@pytest.mark.parametrize("variant, text, llm_params", [
    ("llama3.2-1b", LLAMA_3_2_1B, 1_235_814_400),   # meta-llama/Llama-3.2-1B
    ("qwen2.5-1.5b", QWEN2_5_1_5B, 1_543_714_304),  # Qwen/Qwen2.5-1.5B
])
def test_stage2_llm_parameter_counts(variant, text, llm_params):
    config = stage2_config.get_config(variant)
    assert config.model.llm == text["model_type"] and config.data.text_mode == "opt"
    config.init.llm_checkpoint = config.init.vision_checkpoint = config.init.stage1_checkpoint = ""
    config.model.text = text
    config.mesh.update(data=2, fsdp=4, tensor=1)
    task = stage2.make_task(config, sharding.make_mesh(config.mesh))
    frozen = jax.eval_shape(task.init_frozen, jax.random.PRNGKey(0))
    trainable = aot.count(jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0)))
    assert aot.count(frozen["language_model"]) == llm_params
    qkv_bias = text["model_type"] == "qwen2"
    assert llm_params == by_hand(text["vocab_size"], text["hidden_size"], text["intermediate_size"],
                                 text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"],
                                 text["hidden_size"] // text["num_attention_heads"], qkv_bias)
    # The Q-Former query path, queries, ln_vision and the projection to the LLM width (~107M with OPT-2.7B).
    assert 104e6 < trainable < 110e6, trainable
    assert isinstance(spec.model_of(config), Blip2DecoderOnly)
