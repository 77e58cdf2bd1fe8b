"""Stage 2: generative pretraining with a frozen LLM (OPT, LLaMA & co., or FlanT5) behind the Q-Former's queries.

`make_task(config, mesh)` gives the train loop its `Task`; `make_data(config)` its data factory.
The frozen tree is `{"vision", "language_model"}` (bfloat16 by default, `config.model.frozen_dtype`);
`ln_vision`, the queries, the query-path Q-Former (`use_text_input=False`: no text embeddings, no
text FFNs) and `language_projection` train. The ViT features are computed outside the gradient;
the gradient flows through the frozen LLM's activations into the projection and the Q-Former.

An InstructBLIP model (`Blip2Config.instruction_aware`) takes the same loss with the instruction in the
batch as `qformer_input_ids` / `qformer_attention_mask` (its Q-Former, text path included, trains; the
LLM stays frozen).

Losses (the data pipeline's batch contract, `blip2_jax/data/pipeline.py`):
- decoder-only LLMs (OPT, LLaMA, Mistral, Qwen2, Gemma; `data.text_mode = "opt"`):
  `losses.lm_loss(text logits, labels)`, HF `Blip2ForConditionalGeneration`'s shifted CE; the labels
  are -100 at BOS, prompt and padding, and the query positions are not in the text logits.
- T5: CE of the decoder logits against `labels` (-100 ignored), not shifted (the pipeline's
  `decoder_input_ids` are the labels shifted right behind the start token).
Dropout: the Q-Former's as configured; the frozen LLM's own dropout is active in training when
`model.llm_dropout` (LAVIS leaves the frozen LLM in train mode: OPT/T5 dropout 0.1 applies).

Evaluation (`config.eval`, `blip2_jax.evaluate.caption_eval.evaluator`): greedy captions of a held-out
split with the training prompt, scored by `caption_scores` (caption_exact, top_caption_share, BLEU-4,
CIDEr); with `data.instruction_task = "vqa"` (`blip2_jax.evaluate.instruct_vqa.evaluator`): greedy answers
to every held-out question, `vqa_acc` against `majority_baseline`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip2_jax import sharding as sharding_lib
from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.evaluate import caption_eval, instruct_vqa
from blip2_jax.models.blip2 import Blip2Config, Blip2T5
from blip2_jax.spec import model as spec
from blip2_jax.spec import weights
from blip2_jax.train import losses
from blip2_jax.train.task import Task

TEXT_MODES = {"opt": ("opt",), "t5": ("t5_prefix", "t5_prompt")}  # every other (decoder-only) LLM: "opt"


# -- loss ---------------------------------------------------------------------------------------
def stage2_loss(model, params, batch, rng, *, train: bool, llm_dropout: bool = True,
                train_vision: bool = False):
    """`(loss, metrics)` of the stage-2 LM loss on one (global) batch. `params` = trainable + frozen.
    `train_vision`: the gradient also reaches the ViT (LAVIS fine-tuning with `freeze_vit: False`)."""
    qformer_det = not train
    llm_det = not (train and llm_dropout)
    vit = model.apply({"params": params}, batch["image"], method="vit_features")
    if not train_vision:
        vit = jax.lax.stop_gradient(vit)  # frozen: no gradient reaches (or is computed for) the ViT
    decoder_only = not isinstance(model, Blip2T5)

    def forward(m):
        # InstructBLIP: the batch's instruction (Q-Former vocabulary) shares the queries' self-attention.
        instruction = m.instruction(batch.get("qformer_input_ids"), batch.get("qformer_attention_mask"), vit.shape[0])
        hidden, _ = m.query_outputs(m.image_embeds(vit), qformer_det, instruction)
        prompt = m.language_projection(hidden).astype(m.config.text.dtype)
        embeds, mask = m.prompt_inputs(prompt, batch["input_ids"], batch["attention_mask"])
        if decoder_only:  # the LM head runs over the text positions only (not over the visual prompt)
            logits, _ = m.language_model(embeds, mask, deterministic=llm_det,
                                         logits_to_keep=batch["input_ids"].shape[1])
            return losses.lm_loss(logits, batch["labels"]), logits
        encoded = m.language_model.encode(embeds, mask, deterministic=llm_det)
        logits, _ = m.language_model.decode(batch["decoder_input_ids"], encoded, mask,
                                            batch["decoder_attention_mask"], deterministic=llm_det)
        return losses.cross_entropy(logits, batch["labels"]), logits

    loss, logits = model.apply({"params": params}, method=forward, rngs={"dropout": rng})
    # Token accuracy over the positions that count (logits aligned with the labels they predict).
    labels = batch["labels"][:, 1:] if decoder_only else batch["labels"]
    logits = logits[:, :-1] if decoder_only else logits
    valid = labels != losses.IGNORE_INDEX
    correct = (jnp.argmax(logits, -1) == labels) & valid
    accuracy = correct.sum() / jnp.maximum(valid.sum(), 1)
    return loss, {"loss_lm": loss, "token_accuracy": accuracy}


# -- task ---------------------------------------------------------------------------------------
def make_task(config, mesh) -> Task:
    """Stage 2's hooks for the train loop: the model and tokenizer of `config`, its pretrained weights
    (`config.init`), the LM loss, and held-out captioning on `config.eval.source`."""
    mode = config.data.text_mode
    modes = TEXT_MODES.get(config.model.llm, TEXT_MODES["opt"])
    if mode not in modes:
        raise ValueError(f"config.data.text_mode {mode!r} does not fit config.model.llm {config.model.llm!r} "
                         f"(expected one of {modes})")
    model = spec.model_of(config)  # the tokenizer is read only for the held-out captioning
    cfg = model.config
    if cfg.instruction_aware != bool(config.data.get("instruction_task", "")):
        raise ValueError(f"config.model.instruction_aware={cfg.instruction_aware} needs config.data.instruction_task "
                         f"set exactly when it is True (the batches' Q-Former instruction), got "
                         f"{config.data.get('instruction_task', '')!r}")
    init_trainable, init_frozen = spec.init_fns(config, model)
    rules = sharding_lib.axis_rules(tuple(config.mesh.axis_rules))
    llm_dropout, train_vision = bool(config.model.llm_dropout), bool(config.model.train_vision)
    evaluate = None
    if config.get("eval") is not None and config.eval.source.path:
        if config.data.get("instruction_task", "") == "vqg":
            raise ValueError("config.data.instruction_task='vqg' has no held-out evaluation: set "
                             "config.eval.source.path='' (or evaluate the model on a caption or vqa split)")
        # VQA instruction records: held-out answer accuracy against the majority answer; else captioning.
        make_evaluator = (instruct_vqa.evaluator if config.data.get("instruction_task", "") == "vqa"
                          else caption_eval.evaluator)
        evaluate_params = make_evaluator(config, model, spec.tokenizer(config), mesh)
        evaluate = lambda trainable, frozen, step: evaluate_params({**trainable, **frozen}, step)  # noqa: E731

    def loss_fn(trainable, frozen, batch, rng, train):
        return stage2_loss(model, {**trainable, **frozen}, batch, rng, train=train, llm_dropout=llm_dropout,
                           train_vision=train_vision)

    return Task(init_trainable=init_trainable, loss_fn=loss_fn, init_frozen=init_frozen,
                load_frozen=weights.frozen_loader(config, model, mesh, rules),
                load_trainable=weights.trainable_loader(config, cfg), evaluate=evaluate,
                flops_per_example=flops_per_example(cfg, config.data.max_text_len, train_vision),
                name=f"stage2_{config.model.llm}")


def flops_per_example(cfg: Blip2Config, text_len: int, train_vision: bool = False) -> float:
    """Approximate training FLOPs per example: ViT forward (x3 with its backward when it trains),
    Q-Former forward+backward (x3), LLM forward and its backward to the inputs (x3: the activation
    gradients cost as much as the forward twice over, minus the weight gradients, which are not
    computed: ~2x forward)."""
    v, q = cfg.vision, cfg.qformer
    n_img, vit = v.num_tokens, v.forward_flops
    nq = cfg.num_query_tokens
    layer = 4 * q.hidden_size ** 2 + 2 * q.hidden_size * q.intermediate_size
    cross = q.num_layers // q.cross_attention_frequency * 2 * q.hidden_size * v.hidden_size * n_img
    qformer = 2 * nq * q.num_layers * layer + 2 * cross
    t = cfg.text
    if type(t).__name__ == "OPTConfig":
        llm_params = t.num_hidden_layers * (4 * t.hidden_size ** 2 + 2 * t.hidden_size * t.ffn_dim)
        llm_params += t.vocab_size * t.embed_dim
        llm = 2 * (nq + text_len) * llm_params
    elif type(t).__name__ == "DecoderConfig":
        attn = t.hidden_size * t.head_dim * 2 * (t.num_attention_heads + t.num_key_value_heads)
        llm_params = t.num_hidden_layers * (attn + 3 * t.hidden_size * t.intermediate_size)
        llm = 2 * (nq + text_len) * (llm_params + t.vocab_size * t.hidden_size)
    else:
        enc = t.num_layers * (4 * t.d_model * t.inner_dim + 3 * t.d_model * t.d_ff)
        dec = t.num_decoder_layers * (8 * t.d_model * t.inner_dim + 3 * t.d_model * t.d_ff)
        llm = 2 * (nq + text_len) * enc + 2 * text_len * (dec + t.vocab_size * t.d_model)
    return float((3 if train_vision else 1) * vit + 3 * qformer + 3 * llm)


# -- data ---------------------------------------------------------------------------------------
def make_data(config):
    """The grain pipeline of `config.data` (global batch `data.global_batch_size` = `train.batch_size`)."""
    return data_pipeline.train_factory(config.data, seed=config.seed)


# -- config sections ----------------------------------------------------------------------------
