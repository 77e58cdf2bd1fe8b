"""Stage-1 pretrained initialisation from config paths: BLIP-2 (ViT + whole model), BERT, CLIP."""

import jax
import numpy as np
import torch

import blip2_jax
from blip2_jax import sharding
from flax.traverse_util import flatten_dict as flatten
from blip2_jax.train import stage1
from tests import hf_tiny, tiny_configs


def config_for(shapes_dir, **init):
    """The tiny stage-1 config (the sizes of tests/hf_tiny.py's retrieval model) with `init` paths."""
    c = tiny_configs.stage1(shapes_dir)
    c.init.update(init)
    return c


def task_trees(c):
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    task = stage1.make_task(c, mesh)
    fresh, _ = sharding.create_sharded(task.init_trainable, jax.random.PRNGKey(0), mesh, sharding.axis_rules())
    frozen_abstract = sharding.abstract_with_shardings(
        sharding.unbox(jax.eval_shape(task.init_frozen, jax.random.PRNGKey(1))),
        sharding.logical_shardings(jax.eval_shape(task.init_frozen, jax.random.PRNGKey(1)), mesh, sharding.axis_rules()))
    return task, fresh, frozen_abstract


def test_vit_and_whole_model_from_a_blip2_retrieval_dir(shapes_dir, hf_retrieval):
    _, path = hf_retrieval("freq2")
    _, ref = blip2_jax.from_pretrained(path)
    task, fresh, frozen_abstract = task_trees(config_for(shapes_dir, vision_checkpoint=path, stage1_checkpoint=path))
    frozen = task.load_frozen(frozen_abstract)
    for path, value in flatten(frozen["vision"]).items():
        np.testing.assert_array_equal(np.asarray(value, np.float32), np.asarray(flatten(ref["vision"])[path], np.float32))
    loaded = task.load_trainable(fresh)
    flat, ref_flat, fresh_flat = flatten(loaded), flatten(ref), flatten(fresh)
    for path, value in flat.items():
        if path[0] in ("temp", "lm_transform", "lm_transform_ln", "lm_bias"):  # not in HF checkpoints
            np.testing.assert_array_equal(np.asarray(value), np.asarray(fresh_flat[path]))
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(ref_flat[path]), err_msg=str(path))
            assert value.sharding == fresh_flat[path].sharding


def test_qformer_from_bert_copies_the_text_ffn_into_the_query_ffn(shapes_dir, tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    bert = BertForMaskedLM(BertConfig(vocab_size=98, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=68, max_position_embeddings=40))
    hf_tiny.redraw_(bert, seed=5)
    with torch.no_grad():
        bert.cls.predictions.decoder.weight = bert.bert.embeddings.word_embeddings.weight  # tied, as BERT is
    bert.save_pretrained(str(tmp_path))
    task, fresh, _ = task_trees(config_for(shapes_dir, qformer_checkpoint=str(tmp_path)))
    loaded = task.load_trainable(fresh)
    words = np.asarray(loaded["qformer"]["word_embeddings"]["embedding"])
    np.testing.assert_allclose(words[:98], bert.bert.embeddings.word_embeddings.weight.detach().numpy())
    for i in range(2):
        layer = loaded["qformer"][f"layer_{i}"]
        jax.tree.map(np.testing.assert_array_equal, layer["query_ffn"], layer["text_ffn"])
    # cross-attention stays fresh
    np.testing.assert_array_equal(np.asarray(loaded["qformer"]["layer_0"]["crossattention"]["key"]["kernel"]),
                                  np.asarray(fresh["qformer"]["layer_0"]["crossattention"]["key"]["kernel"]))
