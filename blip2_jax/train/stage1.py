"""Stage 1: representation learning with a frozen image encoder (ITC + ITM + ITG over one Q-Former).

`make_task(config, mesh)` gives the train loop its `Task`; `make_data(config)` its data factory.
The frozen tree is `{"vision": ...}` (patch embedding and blocks); everything else — `ln_vision`,
the queries, the Q-Former, the heads and the temperature — trains (as in LAVIS).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip2_jax import sharding as sharding_lib
from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.evaluate import retrieval_eval, zero_shot
from blip2_jax.models.blip2 import Blip2Config, Blip2Stage1
from blip2_jax.spec import model as spec
from blip2_jax.spec import weights
from blip2_jax.train import losses
from blip2_jax.train.task import Task


# -- loss ---------------------------------------------------------------------------------------
def stage1_losses(model: Blip2Stage1, params, batch, rng, *, train: bool, dec_token_id: int, loss_cfg,
                  train_vision: bool = False):
    """`(total, metrics)` of ITC + ITM + ITG on one (global) batch. See the reference for each part.
    `train_vision`: the gradient also reaches the ViT (LAVIS fine-tuning with `freeze_vit: False`)."""
    deterministic = not train
    rng_itm, rng_dropout = jax.random.split(rng)
    rngs = {"dropout": rng_dropout}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_ids = batch["image_id"] if loss_cfg.itm_exclude_same_image else None

    vit = model.apply({"params": params}, batch["image"], method="vit_features")
    if not train_vision:
        vit = jax.lax.stop_gradient(vit)  # frozen: no gradient ever reaches (or is computed for) the ViT

    def forward(m: Blip2Stage1):
        image_embeds = m.image_embeds(vit)
        image_feats, _, query_kvs = m.image_features(image_embeds, deterministic)
        text_feats = m.text_features(ids, mask, deterministic)
        temp = m.temp
        if loss_cfg.temp_min > 0:
            temp = jnp.clip(temp, loss_cfg.temp_min, loss_cfg.temp_max)
        itc = losses.itc_loss(image_feats, text_feats, temp, label_smoothing=loss_cfg.itc_label_smoothing,
                              image_ids=batch["image_id"] if loss_cfg.itc_image_id_targets else None,
                              detach_other_side=loss_cfg.itc_detach_other_side)
        sim_i2t, sim_t2i = losses.itc_similarities(image_feats, text_feats)
        neg_img, neg_txt = losses.itm_hard_negatives(sim_i2t / temp, sim_t2i / temp, rng_itm, image_ids=image_ids)
        (ids3, mask3), image3, labels = losses.itm_batch((ids, mask), image_embeds, neg_img, neg_txt)
        itm_logits = m.itm_logits(image3, ids3, mask3, deterministic)
        itm = losses.itm_loss(itm_logits, labels)
        dec_ids = ids.at[:, 0].set(dec_token_id)  # [DEC] replaces [CLS] for generation
        itg_logits = m.itg_logits(dec_ids, mask, query_kvs, deterministic)
        itg = losses.itg_loss(itg_logits, dec_ids, mask, label_smoothing=loss_cfg.itg_label_smoothing)
        metrics = {"loss_itc": itc, "loss_itm": itm, "loss_itg": itg, "temperature": temp,
                   "itm_accuracy": losses.itm_accuracy(itm_logits, labels)}
        return itc + itm + itg, metrics

    total, metrics = model.apply({"params": params}, method=forward, rngs=rngs)
    return total, {"loss": total, **metrics}


# -- task ---------------------------------------------------------------------------------------
def make_task(config, mesh) -> Task:
    """Stage 1's hooks for the train loop: the model and tokenizer of `config`, its pretrained
    weights (`config.init`), the loss, and zero-shot retrieval on `config.eval.source`."""
    built = spec.build(config)
    model, cfg = built.model, built.model.config
    init_trainable, init_frozen = spec.init_fns(config, model)
    rules = sharding_lib.axis_rules(tuple(config.mesh.axis_rules))
    dec_token_id, loss_cfg = built.tokenizer.bos_token_id, config.loss
    train_vision = bool(config.model.train_vision)
    evaluators = []
    if config.get("eval") is not None and config.eval.source.path:
        evaluators.append(retrieval_eval.evaluator(config, model, built.tokenizer, mesh))
    if config.get("eval") is not None and config.eval.get("zero_shot") and config.eval.zero_shot.path:
        evaluators.append(zero_shot.evaluator(config, model, built.tokenizer))

    def evaluate(trainable, frozen, step):
        params = {**trainable, **frozen}
        return {k: v for ev in evaluators for k, v in ev(params, step).items()}

    def loss_fn(trainable, frozen, batch, rng, train):
        return stage1_losses(model, {**trainable, **frozen}, batch, rng, train=train,
                             dec_token_id=dec_token_id, loss_cfg=loss_cfg, train_vision=train_vision)

    return Task(init_trainable=init_trainable, loss_fn=loss_fn, init_frozen=init_frozen,
                load_frozen=weights.frozen_loader(config, model, mesh, rules),
                load_trainable=weights.trainable_loader(config, cfg), evaluate=evaluate if evaluators else None,
                flops_per_example=flops_per_example(cfg, config.data.max_text_len), name="stage1")


def flops_per_example(cfg: Blip2Config, text_len: int) -> float:
    """Approximate training FLOPs per example: 2·params·tokens forward (x3 with backward) per pass."""
    v, q = cfg.vision, cfg.qformer
    n_img, vit = v.num_tokens, v.forward_flops
    layer = 4 * q.hidden_size ** 2 + 2 * q.hidden_size * q.intermediate_size
    cross = q.num_layers // q.cross_attention_frequency * (2 * q.hidden_size * v.hidden_size * n_img
                                                          + 2 * q.hidden_size ** 2 * cfg.num_query_tokens)
    nq = cfg.num_query_tokens
    # passes: queries (ITC), text (ITC), 3x [queries; text] (ITM), text (ITG) + LM head.
    tokens = nq + text_len + 3 * (nq + text_len) + text_len
    qformer = 2 * tokens * q.num_layers * layer + 2 * 4 * cross + 2 * text_len * q.hidden_size * q.vocab_size
    return float(vit + 3 * qformer)


# -- data ---------------------------------------------------------------------------------------
def make_data(config):
    """The grain pipeline of `config.data` (global batch `data.global_batch_size` = `train.batch_size`)."""
    return data_pipeline.train_factory(config.data, seed=config.seed)


# -- config sections ----------------------------------------------------------------------------
