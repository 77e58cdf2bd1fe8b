"""The paper-scale stage-1 config (EVA ViT-g + BERT-base Q-Former) from abstract shapes: no weights."""
import jax
import pytest

from blip2_jax import sharding
from blip2_jax.data import testing
from blip2_jax.train import aot, stage1
from configs import stage1 as stage1_config


def vit_g(batch=1680, **mesh):
    config = stage1_config.get_config("vit_g")
    config.data.tokenizer_path = testing.bert_vocab_dir()  # bert-base-uncased's vocabulary
    config.init.vision_checkpoint = config.init.qformer_checkpoint = ""
    config.train.batch_size = config.data.global_batch_size = batch
    config.mesh.update(mesh or dict(data=2, fsdp=4, tensor=1))
    mesh = sharding.make_mesh(config.mesh)
    return config, stage1.make_task(config, mesh), mesh


def test_vit_g_parameter_counts_match_the_paper():
    config, task, _ = vit_g()
    trainable = aot.count(jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0)))
    frozen = aot.count(jax.eval_shape(task.init_frozen, jax.random.PRNGKey(0)))
    # Paper: 188M trainable (Q-Former with its tied LM head); EVA ViT-g/14 without its last block ~1B.
    assert 180e6 < trainable < 195e6, trainable
    assert 0.95e9 < frozen < 1.02e9, frozen
    # The ViT is 39 blocks of width 1408 with a 6144 MLP: count it by hand.
    d, f, n = 1408, 6144, 39
    block = 4 * d * d + 3 * d + 2 * d * f + f + d + 4 * d  # q,k,v,out + q/v/out bias + fc1,fc2 (+bias) + 2 LNs
    embed = 14 * 14 * 3 * d + d + d + 257 * d            # patch kernel + bias, class token, positions
    assert frozen == n * block + embed


@pytest.mark.slow
def test_vit_g_train_step_compiles_for_8_devices():
    config, task, mesh = vit_g()
    compiled, counts = aot.compile_train_step(config, task, mesh)
    assert counts["frozen"] > 0.95e9 and aot.memory_summary(compiled)["argument_size_in_bytes"] > 0


def test_vit_g_architecture_compiles_sharded_at_reduced_depth():
    """The same widths, heads and vocabulary, fewer blocks and a small batch: the sharded step compiles
    on data=2 x fsdp=2 x tensor=2 (the full depth is the slow test above and benchmarks/)."""
    config = stage1_config.get_config("vit_g")
    config.data.tokenizer_path = testing.bert_vocab_dir()
    config.init.vision_checkpoint = config.init.qformer_checkpoint = ""
    config.model.vision.num_layers = 1
    config.model.qformer.num_layers = 2
    config.train.batch_size = config.data.global_batch_size = 8
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config.mesh)
    compiled, counts = aot.compile_train_step(config, stage1.make_task(config, mesh), mesh)
    assert aot.memory_summary(compiled)["argument_size_in_bytes"] > 0
    assert counts["trainable"] > 50e6  # BERT-base embeddings, heads and 2 layers


def test_retrieval_finetune_config_trains_the_vit_in_float32():
    """vit_g_coco_ft (LAVIS retrieval_coco_ft): the ViT joins the trainable tree, ~1.17B trainable
    (paper: 1.2B for ViT-g retrieval fine-tuning), nothing frozen; the config validates."""
    from blip2_jax import config_validation
    import numpy as np
    config = stage1_config.get_config("vit_g_coco_ft")
    config_validation.validate(config)
    assert config.loss.itc_image_id_targets and config.model.train_vision and config.data.image_size == 364
    config.data.tokenizer_path = testing.bert_vocab_dir()
    config.init.vision_checkpoint = config.init.stage1_checkpoint = config.eval.source.path = ""
    task = stage1.make_task(config, sharding.make_mesh(config.mesh))
    trainable = jax.eval_shape(task.init_trainable, jax.random.PRNGKey(0))
    assert jax.eval_shape(task.init_frozen, jax.random.PRNGKey(0)) == {}
    assert 1.15e9 < aot.count(trainable) < 1.2e9, aot.count(trainable)
    assert {leaf.dtype for leaf in jax.tree.leaves(sharding.unbox(trainable["vision"]))} == {np.dtype("float32")}
