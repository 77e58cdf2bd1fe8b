"""The paper-scale stage-2 configs (EVA ViT-g + OPT-2.7B / FlanT5-XL) from abstract shapes: no weights.

No LLM checkpoint can be read here, so the LLM is described by its Hugging Face config fields
(`model.text`, as `init.llm_checkpoint`'s config.json would give them).
"""
import jax
import numpy as np
import pytest

from blip2_jax import sharding
from blip2_jax.train import aot, stage2
from configs import stage2 as stage2_config

OPT_2_7B = dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                do_layer_norm_before=True, activation_function="relu", pad_token_id=1, bos_token_id=2,
                eos_token_id=2)
FLAN_T5_XL = dict(model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                  num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
VIT_G = 39 * (4 * 1408 ** 2 + 3 * 1408 + 2 * 1408 * 6144 + 6144 + 1408 + 4 * 1408) \
    + 14 * 14 * 3 * 1408 + 1408 + 1408 + 257 * 1408  # as tests/test_paper_scale.py counts it


def opt_by_hand(d=2560, f=10240, n=32, vocab=50272, positions=2048):
    layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # q,k,v,out (+bias), fc1, fc2 (+bias), 2 LNs
    return vocab * d + (positions + 2) * d + n * layer + 2 * d  # tied head; positions offset by 2


def t5_by_hand(d=2048, f=5120, n=24, vocab=32128, buckets=32, heads=32):
    enc = n * (4 * d * d + 3 * d * f + 2 * d) + buckets * heads + d
    dec = n * (8 * d * d + 3 * d * f + 3 * d) + buckets * heads + d
    return enc + dec + 2 * vocab * d  # shared embedding + untied head


def paper_config(variant, text, **mesh):
    config = stage2_config.get_config(variant)
    config.init.llm_checkpoint = config.init.vision_checkpoint = config.init.stage1_checkpoint = ""
    config.model.text = text
    config.mesh.update(mesh or dict(data=2, fsdp=4, tensor=1))
    return config


@pytest.mark.parametrize("variant, text, llm_params", [
    ("opt2.7b", OPT_2_7B, 2_651_596_800),    # facebook/opt-2.7b
    ("flant5xl", FLAN_T5_XL, 2_849_757_184),  # google/flan-t5-xl
])
def test_stage2_parameter_counts_match_the_models(variant, text, llm_params):
    config = paper_config(variant, text)
    task = stage2.make_task(config, sharding.make_mesh(config.mesh))
    frozen = jax.eval_shape(task.init_frozen, jax.random.PRNGKey(0))
    trainable = aot.count(jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0)))
    assert aot.count(frozen["vision"]) == VIT_G
    assert aot.count(frozen["language_model"]) == llm_params
    assert llm_params == (opt_by_hand() if text is OPT_2_7B else t5_by_hand())
    # Paper Table 2: 107M trainable for ViT-g with OPT-2.7B and with FlanT5-XL (Q-Former query path,
    # queries, ln_vision, projection to the LLM width).
    assert 104e6 < trainable < 110e6, trainable


@pytest.mark.parametrize("variant, text", [("opt2.7b", OPT_2_7B), ("flant5xl", FLAN_T5_XL)])
def test_stage2_architecture_compiles_sharded_at_reduced_depth(variant, text):
    """The LLM's and ViT's real widths, heads and vocabularies, 1-2 blocks, a small batch: the sharded
    stage-2 step compiles on data=2 x fsdp=2 x tensor=2 (gradients through the frozen LLM included)."""
    small = dict(text, num_hidden_layers=2) if text is OPT_2_7B else dict(text, num_layers=1, num_decoder_layers=1)
    config = paper_config(variant, small, data=2, fsdp=2, tensor=2)
    config.model.vision.num_layers = 1
    config.model.qformer.num_layers = 2
    config.train.batch_size = config.data.global_batch_size = 8
    mesh = sharding.make_mesh(config.mesh)
    compiled, counts = aot.compile_train_step(config, stage2.make_task(config, mesh), mesh)
    assert aot.memory_summary(compiled)["argument_size_in_bytes"] > 0
    assert counts["frozen"] > 130e6  # the LLM's embeddings alone


def test_caption_finetune_config_trains_the_vit_in_float32():
    """opt2.7b_coco_ft (LAVIS caption_coco_ft): ViT unfrozen, ~1.1B trainable (paper: 1.1-1.2B)."""
    config = paper_config("opt2.7b_coco_ft", OPT_2_7B)
    config.init.stage2_checkpoint = config.eval.source.path = ""  # no checkpoints or COCO here
    task = stage2.make_task(config, sharding.make_mesh(config.mesh))
    trainable = jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0))
    frozen = jax.eval_shape(task.init_frozen, jax.random.PRNGKey(0))
    assert sorted(frozen) == ["language_model"] and aot.count(frozen) == 2_651_596_800
    assert aot.count(trainable["vision"]) == VIT_G
    assert 1.05e9 < aot.count(trainable) < 1.2e9
    assert {leaf.dtype for leaf in jax.tree.leaves(sharding.unbox(trainable["vision"]))} == {np.dtype("float32")}


def test_instruction_tuning_config_trains_instructblips_188m():
    """configs/stage2.py:instruct_flant5xl: InstructBLIP's Q-Former with its text path (BERT-base
    embeddings and text FFNs) on top of BLIP-2's 107M; the InstructBLIP paper trains 188M parameters."""
    config = paper_config("instruct_flant5xl", FLAN_T5_XL)
    config.init.stage2_checkpoint = config.eval.source.path = ""  # no files here
    task = stage2.make_task(config, sharding.make_mesh(config.mesh))
    trainable = jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0))
    assert "word_embeddings" in trainable["qformer"] and "text_ffn" in trainable["qformer"]["layers"]["layer_0"]
    assert 185e6 < aot.count(trainable) < 191e6, aot.count(trainable)
