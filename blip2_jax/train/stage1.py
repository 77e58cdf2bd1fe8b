"""Stage 1: representation learning with a frozen image encoder (ITC + ITM + ITG over one Q-Former).

`make_task(config, mesh)` gives the train loop its `Task`; `make_data(config)` its data factory.
The frozen tree is `{"vision": ...}` (patch embedding and blocks); everything else — `ln_vision`,
the queries, the Q-Former, the heads and the temperature — trains (as in LAVIS).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections

from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import text as data_text
from blip2_jax.evaluate import retrieval, retrieval_eval
from blip2_jax.models.blip2 import Blip2Config, Blip2Stage1, init_fns
from blip2_jax.models.qformer import QFormerConfig
from blip2_jax.models.vit import VisionConfig
from blip2_jax.train import losses, stage1_init
from blip2_jax.train.task import Task

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# -- model --------------------------------------------------------------------------------------
def tokenizer(config):
    return data_text.load_bert_tokenizer(config.data.tokenizer_path)


def model_config(config, vocab_size: int | None = None) -> Blip2Config:
    """Our `Blip2Config` from `config.model` (`qformer.vocab_size = 0` means: the tokenizer's size)."""
    m = config.model
    vision_dtype = jnp.float32 if m.train_vision else DTYPES[m.frozen_dtype]  # a trained ViT: float32
    vision = VisionConfig(**{k: v for k, v in m.vision.items()}, dtype=vision_dtype, param_dtype=vision_dtype)
    q = dict(m.qformer.items())
    if not q["vocab_size"]:
        if vocab_size is None:
            raise ValueError("config.model.qformer.vocab_size = 0 needs the tokenizer (config.data.tokenizer_path)")
        q["vocab_size"] = vocab_size
    qformer = QFormerConfig(**q, num_query_tokens=m.num_query_tokens, encoder_hidden_size=vision.hidden_size,
                            remat=m.remat)
    return Blip2Config(vision=vision, qformer=qformer, num_query_tokens=m.num_query_tokens,
                       image_text_hidden_size=m.embed_dim, ln_vision_eps=m.ln_vision_eps,
                       temperature_init=m.temperature_init, with_lm_head=True)


def _dummy_inputs(cfg: Blip2Config, batch: int = 1, text_len: int = 8):
    s = cfg.vision.image_size
    return (jnp.zeros((batch, s, s, 3), jnp.float32), jnp.zeros((batch, text_len), jnp.int32),
            jnp.ones((batch, text_len), jnp.int32))


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
    tok = tokenizer(config)
    cfg = model_config(config, vocab_size=len(tok))
    model = Blip2Stage1(cfg)
    dec_token_id = tok.bos_token_id
    loss_cfg = config.loss

    train_vision = bool(config.model.train_vision)
    init_trainable, init_frozen = init_fns(model, *_dummy_inputs(cfg),
                                           frozen_keys=() if train_vision else ("vision",))

    def loss_fn(trainable, frozen, batch, rng, train):
        return stage1_losses(model, {**trainable, **frozen}, batch, rng, train=train,
                             dec_token_id=dec_token_id, loss_cfg=loss_cfg, train_vision=train_vision)

    return Task(
        init_trainable=init_trainable, loss_fn=loss_fn, init_frozen=init_frozen,
        load_frozen=None if train_vision else stage1_init.frozen_loader(config, cfg),
        load_trainable=stage1_init.trainable_loader(config, cfg),
        evaluate=make_retrieval_eval(config, model, tok, mesh) if config.eval.source.path else None,
        flops_per_example=flops_per_example(cfg, config.data.max_text_len), name="stage1")


def flops_per_example(cfg: Blip2Config, text_len: int) -> float:
    """Approximate training FLOPs per example: 2·params·tokens forward (x3 with backward) per pass."""
    v, q = cfg.vision, cfg.qformer
    n_img = (v.image_size // v.patch_size) ** 2 + 1
    vit = 2 * n_img * v.num_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    layer = 4 * q.hidden_size ** 2 + 2 * q.hidden_size * q.intermediate_size
    cross = q.num_layers // q.cross_attention_frequency * (2 * q.hidden_size * v.hidden_size * n_img
                                                          + 2 * q.hidden_size ** 2 * cfg.num_query_tokens)
    nq = cfg.num_query_tokens
    # passes: queries (ITC), text (ITC), 3x [queries; text] (ITM), text (ITG) + LM head.
    tokens = nq + text_len + 3 * (nq + text_len) + text_len
    qformer = 2 * tokens * q.num_layers * layer + 2 * 4 * cross + 2 * text_len * q.hidden_size * q.vocab_size
    return float(vit + 3 * qformer)


# -- evaluation ---------------------------------------------------------------------------------
def make_retrieval_eval(config, model: Blip2Stage1, tok, mesh):
    """Zero-shot retrieval on the held-out source: ITC similarities (+ ITM re-ranking if k_test > 0).

    The same computation as `blip2_jax.evaluate.run.evaluate_retrieval` (`RetrievalScorer`): an
    undecodable image is dropped together with its captions, so recall is over the decodable images.
    """
    eval_cfg = config.eval
    scorer = retrieval_eval.RetrievalScorer(model)
    source = eval_cfg.source

    def evaluate(trainable, frozen, step):
        params = {**trainable, **frozen}
        ds = data_pipeline.make_eval_dataset(config.data, source, batch_size=eval_cfg.batch_size,
                                             process_index=0, process_count=1)
        image_feats, image_embeds, image_ids = scorer.image_features(params, ds)
        captions = data_pipeline.read_captions(source)
        if not len(image_ids):
            raise ValueError(f"config.eval.source: no image of {source.path or source.tfds_name} could be decoded")
        if len(image_ids) < len(captions):
            log.warning("retrieval eval at step %d: %d of %d held-out images could not be decoded; "
                        "recall is over the other %d", step, len(captions) - len(image_ids), len(captions),
                        len(image_ids))
        texts, txt2img, img2txt = retrieval_eval.caption_texts(retrieval_eval.select(captions, image_ids),
                                                               config.data.max_words)
        ids, mask = retrieval_eval.encode_texts(tok, texts, int(config.data.max_text_len))
        score_i2t, score_t2i = scorer.scores(params, image_feats, image_embeds, ids, mask,
                                             k_test=int(eval_cfg.k_test), batch_size=int(eval_cfg.batch_size))
        out = retrieval.recall_at_k(score_i2t, score_t2i, txt2img, img2txt)
        return {k: float(v) for k, v in out.items()}

    return evaluate


# -- data ---------------------------------------------------------------------------------------
def make_data(config):
    """The grain pipeline of `config.data` (its batch size checked by config validation)."""
    return data_pipeline.train_factory(config.data, seed=config.seed)


# -- config sections ----------------------------------------------------------------------------
def model_section(**overrides) -> ml_collections.ConfigDict:
    """`config.model` for stage 1 (defaults: the paper's EVA ViT-g + BERT-base Q-Former)."""
    m = ml_collections.ConfigDict()
    m.vision = ml_collections.ConfigDict(dict(
        style="eva", hidden_size=1408, intermediate_size=6144, num_layers=39, num_heads=16, image_size=224,
        patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu", remat=False,
        position_init_std=0.02))  # > 0.02 only for a random frozen ViT (the demo): see VisionConfig
    m.qformer = ml_collections.ConfigDict(dict(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, hidden_act="gelu",
        layer_norm_eps=1e-12, hidden_dropout=0.1, attention_dropout=0.1, max_position_embeddings=512,
        vocab_size=0, pad_token_id=0, cross_attention_frequency=2))
    m.num_query_tokens = 32
    m.embed_dim = 256          # ITC projection width
    m.ln_vision_eps = 1e-5     # LAVIS ln_vision (torch default); HF checkpoints use 1e-6
    m.temperature_init = 0.07
    m.frozen_dtype = "bfloat16"  # storage + compute dtype of the frozen ViT
    m.remat = False            # rematerialise Q-Former layers in the backward pass
    # Train the ViT too (LAVIS `freeze_vit: False`, as its retrieval fine-tuning does): it joins the
    # trainable tree, the optimizer state and the checkpoint, starting from init.vision_checkpoint
    # (or a random init). A later run reads such a workdir as its init.vision_checkpoint.
    m.train_vision = False
    m.update(overrides)
    return m


def loss_section() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.itc_label_smoothing = 0.1
    c.itg_label_smoothing = 0.1
    # Default: the full gradient of the ITC loss. True reproduces LAVIS exactly: its all-gather runs
    # under no_grad, so the other side of every similarity carries no gradient (mesh-independent).
    c.itc_detach_other_side = False
    c.itc_image_id_targets = False  # soft ITC targets over same-image pairs (LAVIS COCO fine-tuning)
    # ITM negatives exclude every pair with the same image id (LAVIS fine-tuning); False excludes
    # only the diagonal (LAVIS pretraining).
    c.itm_exclude_same_image = True
    c.temp_min = 0.0  # > 0: clamp the temperature to [temp_min, temp_max] (BLIP-2 does not clamp)
    c.temp_max = 0.5
    return c


def init_section() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # HF BLIP-2 dir (EVA ViT-g), HF CLIPVisionModel dir, or a workdir of this project whose checkpoint
    # trained the ViT (model.train_vision); "" = random frozen ViT
    c.vision_checkpoint = ""
    c.qformer_checkpoint = ""  # bert-base-uncased style dir for the Q-Former (LAVIS init)
    c.stage1_checkpoint = ""   # whole stage-1 model: HF Blip2ForImageTextRetrieval dir or converted LAVIS dir
    return c


def eval_section() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = data_pipeline.source_config()  # held-out split (path "" = no evaluation)
    c.batch_size = 32
    c.k_test = 0  # > 0: LAVIS's ITM re-ranking of the top k_test candidates
    return c
