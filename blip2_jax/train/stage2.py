"""Stage 2: generative pretraining with a frozen LLM (OPT or FlanT5) behind the Q-Former's queries.

`make_task(config, mesh)` gives the train loop its `Task`; `make_data(config)` its data factory.
The frozen tree is `{"vision", "language_model"}` (bfloat16 by default, `config.model.frozen_dtype`);
`ln_vision`, the queries, the query-path Q-Former (`use_text_input=False`: no text embeddings, no
text FFNs) and `language_projection` train. The ViT features are computed outside the gradient;
the gradient flows through the frozen LLM's activations into the projection and the Q-Former.

Losses (the data pipeline's batch contract, `blip2_jax/data/pipeline.py`):
- OPT: `losses.lm_loss(text logits, labels)`, HF `Blip2ForConditionalGeneration`'s shifted CE; the
  labels are -100 at BOS, prompt and padding, and the query positions are not in the text logits.
- T5: CE of the decoder logits against `labels` (-100 ignored), not shifted (the pipeline's
  `decoder_input_ids` are the labels shifted right behind the start token).
Dropout: the Q-Former's as configured; the frozen LLM's own dropout is active in training when
`model.llm_dropout` (LAVIS leaves the frozen LLM in train mode: OPT/T5 dropout 0.1 applies).

Evaluation (`config.eval`, `make_caption_eval`): greedy captions of a held-out split with the
training prompt, scored by `caption_scores` (caption_exact, top_caption_share, BLEU-4, CIDEr).
"""
from __future__ import annotations

import collections
import logging
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from blip2_jax import sharding as sharding_lib
from blip2_jax.convert import blip2 as hf_blip2
from blip2_jax.convert.hf_io import CheckpointReader
from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import text as data_text
from blip2_jax.evaluate import captioning
from blip2_jax.models.blip2 import Blip2Config, Blip2OPT, Blip2T5, init_fns
from blip2_jax.models.qformer import QFormerConfig
from blip2_jax.models.vit import VisionConfig
from blip2_jax.train import loop, losses, stage1, stage2_init
from blip2_jax.train.task import Task

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LLMS = ("opt", "t5")
TEXT_MODES = {"opt": ("opt",), "t5": ("t5_prefix", "t5_prompt")}


# -- model --------------------------------------------------------------------------------------
def text_config(config):
    """The LLM's `OPTConfig` / `T5Config`: from `init.llm_checkpoint`'s config.json (and which weights
    the file holds: an `lm_head.weight` unties the head), else from `model.text` (HF field names)."""
    m = config.model
    frozen = DTYPES[m.frozen_dtype]
    path = config.init.llm_checkpoint
    if path:
        hf = stage2_init.read_hf_config(path)
        with CheckpointReader(path) as reader:
            keys = reader.keys()
    else:
        hf, keys = dict(m.text), ()
        if not hf:
            raise ValueError("config.init.llm_checkpoint is empty and config.model.text gives no LLM config")
    kind = hf.get("model_type")
    if kind != m.llm:
        raise ValueError(f"config.model.llm is {m.llm!r} but the LLM config ({path or 'config.model.text'}) "
                         f"has model_type {kind!r}")
    overrides = dict(dtype=frozen, param_dtype=frozen, remat=m.llm_remat)
    if not path and hf.get("tie_word_embeddings") is False:
        overrides["tie_word_embeddings"] = False  # a checkpoint says so by holding lm_head.weight
    if kind == "t5" and m.t5_dense_act_fn:
        overrides["dense_act_fn"] = m.t5_dense_act_fn
    return hf_blip2.text_converter(hf).config_for_checkpoint(hf, keys, **overrides)


def model_config(config) -> Blip2Config:
    """Our `Blip2Config` (vision, query-path Q-Former, LLM) from `config.model` and `config.init`."""
    m = config.model
    if m.llm not in LLMS:
        raise ValueError(f"config.model.llm must be one of {LLMS}, got {m.llm!r}")
    frozen = DTYPES[m.frozen_dtype]
    vision_dtype = jnp.float32 if m.train_vision else frozen  # a trained ViT keeps float32 weights
    vision = VisionConfig(**dict(m.vision.items()), dtype=vision_dtype, param_dtype=vision_dtype)
    qformer = QFormerConfig(**dict(m.qformer.items()), num_query_tokens=m.num_query_tokens,
                            encoder_hidden_size=vision.hidden_size, use_text_input=False, remat=m.remat)
    return Blip2Config(vision=vision, qformer=qformer, text=text_config(config),
                       num_query_tokens=m.num_query_tokens, ln_vision_eps=m.ln_vision_eps, with_lm_head=False)


def build_model(cfg: Blip2Config):
    return Blip2OPT(cfg) if type(cfg.text).__name__ == "OPTConfig" else Blip2T5(cfg)


def _dummy_inputs(cfg: Blip2Config, batch: int = 1, text_len: int = 4):
    s = cfg.vision.image_size
    ids = jnp.zeros((batch, text_len), jnp.int32)
    mask = jnp.ones((batch, text_len), jnp.int32)
    pixels = jnp.zeros((batch, s, s, 3), jnp.float32)
    return (pixels, ids, mask) if type(cfg.text).__name__ == "OPTConfig" else (pixels, ids, mask, ids, mask)


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
    is_opt = isinstance(model, Blip2OPT)

    def forward(m):
        hidden, _ = m.query_outputs(m.image_embeds(vit), qformer_det)
        prompt = m.language_projection(hidden).astype(m.config.text.dtype)
        embeds, mask = m.prompt_inputs(prompt, batch["input_ids"], batch["attention_mask"])
        if is_opt:
            logits, _ = m.language_model(embeds, mask, deterministic=llm_det)
            return losses.lm_loss(logits, batch["labels"]), logits[:, prompt.shape[1]:]
        encoded = m.language_model.encode(embeds, mask, deterministic=llm_det)
        logits, _ = m.language_model.decode(batch["decoder_input_ids"], encoded, mask,
                                            batch["decoder_attention_mask"], deterministic=llm_det)
        return losses.cross_entropy(logits, batch["labels"]), logits

    loss, logits = model.apply({"params": params}, method=forward, rngs={"dropout": rng})
    # Token accuracy over the positions that count (logits aligned with the labels they predict).
    labels = batch["labels"][:, 1:] if is_opt else batch["labels"]
    logits = logits[:, :-1] if is_opt else logits
    valid = labels != losses.IGNORE_INDEX
    correct = (jnp.argmax(logits, -1) == labels) & valid
    accuracy = correct.sum() / jnp.maximum(valid.sum(), 1)
    return loss, {"loss_lm": loss, "token_accuracy": accuracy}


# -- task ---------------------------------------------------------------------------------------
def make_task(config, mesh) -> Task:
    cfg = model_config(config)
    model = build_model(cfg)
    mode = config.data.text_mode
    if mode not in TEXT_MODES[config.model.llm]:
        raise ValueError(f"config.data.text_mode {mode!r} does not fit config.model.llm {config.model.llm!r} "
                         f"(expected one of {TEXT_MODES[config.model.llm]})")
    llm_dropout = bool(config.model.llm_dropout)
    frozen_key = loop.run_keys(config.seed)[1]  # the random frozen towers are the loop's

    train_vision = bool(config.model.train_vision)
    init_trainable, init_frozen = init_fns(
        model, *_dummy_inputs(cfg),
        frozen_keys=("language_model",) if train_vision else ("vision", "language_model"))

    def random_frozen():
        """The loop's random frozen tree (for a tower that has no checkpoint), on its shardings."""
        rules = sharding_lib.axis_rules(tuple(config.mesh.axis_rules))
        boxed = jax.eval_shape(init_frozen, frozen_key)
        shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
        return jax.jit(lambda r: sharding_lib.unbox(init_frozen(r)), out_shardings=shardings)(frozen_key)

    def loss_fn(trainable, frozen, batch, rng, train):
        return stage2_loss(model, {**trainable, **frozen}, batch, rng, train=train, llm_dropout=llm_dropout,
                           train_vision=train_vision)

    return Task(init_trainable=init_trainable, loss_fn=loss_fn, init_frozen=init_frozen,
                load_frozen=stage2_init.frozen_loader(config, cfg, random_frozen),
                load_trainable=stage2_init.trainable_loader(config, cfg),
                evaluate=make_caption_eval(config, model) if _eval_source(config) else None,
                flops_per_example=flops_per_example(cfg, config.data.max_text_len, train_vision),
                name=f"stage2_{config.model.llm}")


def flops_per_example(cfg: Blip2Config, text_len: int, train_vision: bool = False) -> float:
    """Approximate training FLOPs per example: ViT forward (x3 with its backward when it trains),
    Q-Former forward+backward (x3), LLM forward and its backward to the inputs (x3: the activation
    gradients cost as much as the forward twice over, minus the weight gradients, which are not
    computed: ~2x forward)."""
    v, q = cfg.vision, cfg.qformer
    n_img = (v.image_size // v.patch_size) ** 2 + 1
    vit = 2 * n_img * v.num_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    nq = cfg.num_query_tokens
    layer = 4 * q.hidden_size ** 2 + 2 * q.hidden_size * q.intermediate_size
    cross = q.num_layers // q.cross_attention_frequency * 2 * q.hidden_size * v.hidden_size * n_img
    qformer = 2 * nq * q.num_layers * layer + 2 * cross
    t = cfg.text
    if type(t).__name__ == "OPTConfig":
        llm_params = t.num_hidden_layers * (4 * t.hidden_size ** 2 + 2 * t.hidden_size * t.ffn_dim)
        llm_params += t.vocab_size * t.embed_dim
        llm = 2 * (nq + text_len) * llm_params
    else:
        enc = t.num_layers * (4 * t.d_model * t.inner_dim + 3 * t.d_model * t.d_ff)
        dec = t.num_decoder_layers * (8 * t.d_model * t.inner_dim + 3 * t.d_model * t.d_ff)
        llm = 2 * (nq + text_len) * enc + 2 * text_len * (dec + t.vocab_size * t.d_model)
    return float((3 if train_vision else 1) * vit + 3 * qformer + 3 * llm)


# -- evaluation: greedy captions of a held-out split ---------------------------------------------
def _eval_source(config):
    """`config.eval.source` when the config has an eval section with a path, else None."""
    ev = config.get("eval")
    return ev.source if ev is not None and ev.source.path else None


def generation_prompt(config) -> str:
    """The text prompt captions are generated from: the one the model was trained with.

    OPT: `data.prompt` without its trailing whitespace. The pipeline tokenises `prompt + caption` as
    one string, and a byte-level BPE attaches the prompt's trailing space to the caption's first word
    ("Ġa"), so the prompt alone would end in a lone space token the model never saw in training.
    T5: `t5_prompt` mode encodes the fixed prompt (default "a photo of", as the pipeline); `t5_prefix`
    has no fixed prompt (the visual prompt alone).
    """
    mode, prompt = config.data.text_mode, config.data.prompt
    if mode == "opt":
        return prompt.rstrip()
    if mode == "t5_prompt":
        return prompt or "a photo of"
    return ""


def caption_scores(references: Sequence[Sequence[str]], generated: Mapping[int, str]) -> dict:
    """Captioning metrics of `generated[i]` against `references[i]` (both already cleaned).

    - `caption_exact`: fraction of images whose caption equals one of its references exactly;
    - `top_caption_share`: fraction of images given the single most frequent generated caption (1.0
      when the LLM ignores the image and says the same thing every time);
    - `bleu_4`, `cider`: `blip2_jax.evaluate.captioning.caption_metrics` (PTB-tokenised);
    - `num_images`: how many images were captioned.
    """
    if not generated:
        raise ValueError("caption_scores: no generated captions")
    ids = sorted(generated)
    exact = sum(generated[i] in set(references[i]) for i in ids)
    top = collections.Counter(generated[i] for i in ids).most_common(1)[0][1]
    metrics = captioning.caption_metrics({i: list(references[i]) for i in ids}, {i: generated[i] for i in ids})
    return {"caption_exact": exact / len(ids), "top_caption_share": top / len(ids),
            "bleu_4": metrics["bleu_4"], "cider": metrics["cider"], "num_images": float(len(ids))}


def make_caption_eval(config, model):
    """`Task.evaluate`: greedy (or `eval.num_beams`) captions of every image of `eval.source`, with the
    training prompt (`generation_prompt`), decoded with the LLM's tokenizer (cut at the first EOS),
    LAVIS-cleaned and scored against the cleaned references (`caption_scores`)."""
    from blip2_jax.generate import generate
    from blip2_jax.processor import Blip2Processor

    ev, data_cfg = config.eval, config.data
    text = model.config.text
    processor = Blip2Processor(data_text.load_tokenizer(data_cfg.tokenizer_path), data_cfg.image_size,
                               eos_token_id=text.eos_token_id,
                               padding_side="left" if isinstance(model, Blip2OPT) else "right")
    prompt = generation_prompt(config)

    def captions_of(params) -> dict[int, str]:
        out = {}
        ds = data_pipeline.make_eval_dataset(data_cfg, ev.source, batch_size=ev.batch_size,
                                             process_index=0, process_count=1)
        for b in ds:
            n = b["image"].shape[0]
            ids, mask = processor.tokenize([prompt] * n) if prompt else (None, None)
            tokens = generate(model, params, b["image"], ids, mask, max_new_tokens=ev.max_new_tokens,
                              num_beams=ev.num_beams)
            texts = processor.decode(np.asarray(tokens))
            for image_id, valid, t in zip(np.asarray(b["image_id"]), np.asarray(b["valid"]), texts):
                if valid:
                    out[int(image_id)] = data_text.clean_caption(t, data_cfg.max_words)
        return out

    def evaluate(trainable, frozen, step):
        generated = captions_of({**trainable, **frozen})
        references = [[data_text.clean_caption(c, data_cfg.max_words) for c in caps]
                      for caps in data_pipeline.read_captions(ev.source)]
        for i in sorted(generated)[:ev.log_examples]:
            log.info("step %d, image %d: %r (references %r)", step, i, generated[i], references[i])
        return caption_scores(references, generated)

    return evaluate


# -- data ---------------------------------------------------------------------------------------
def make_data(config):
    """The grain pipeline of `config.data` (its batch size checked by config validation)."""
    return data_pipeline.train_factory(config.data, seed=config.seed)


# -- config sections ----------------------------------------------------------------------------
def model_section(llm: str = "opt", **overrides) -> ml_collections.ConfigDict:
    """`config.model` for stage 2 (defaults: the paper's EVA ViT-g + BERT-base Q-Former query path)."""
    s1 = stage1.model_section()
    m = ml_collections.ConfigDict()
    m.llm = llm                  # "opt" (decoder-only, Blip2OPT) or "t5" (FlanT5, Blip2T5)
    m.vision = s1.vision         # the frozen ViT's sizes (as stage 1; see stage1.model_section)
    q = s1.qformer.to_dict()
    for text_only in ("vocab_size", "pad_token_id", "max_position_embeddings"):
        q.pop(text_only)         # the stage-2 Q-Former has no text input
    m.qformer = ml_collections.ConfigDict(q)  # Q-Former sizes and dropout (as stage 1)
    m.num_query_tokens = 32
    m.ln_vision_eps = 1e-5       # LAVIS ln_vision (torch default); HF checkpoints use 1e-6
    m.frozen_dtype = "bfloat16"  # storage + compute dtype of the frozen ViT and LLM
    # Train the ViT too (LAVIS captioning/VQA fine-tuning, `freeze_vit: False`): it joins the trainable
    # tree, the optimizer and the checkpoint in float32, from init.vision_checkpoint (or a random init).
    m.train_vision = False
    m.remat = False              # rematerialise Q-Former layers in the backward pass
    m.llm_remat = False          # rematerialise LLM layers (saves activation memory at scale)
    m.llm_dropout = True         # the frozen LLM's own dropout in training (LAVIS: it stays in train mode)
    m.t5_dense_act_fn = "gelu"   # T5 FFN activation override (LAVIS and HF BLIP-2: exact GELU); "" = checkpoint's
    # The LLM's HF config.json fields (model_type, sizes, token ids) when init.llm_checkpoint is
    # empty (a random frozen LLM: tests); ignored when a checkpoint is given.
    m.text = ml_collections.ConfigDict()
    m.update(overrides)
    return m


def init_section() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.vision_checkpoint = ""   # HF BLIP-2 dir (EVA ViT-g) or HF CLIPVisionModel dir; "" = random ViT (seed's)
    c.llm_checkpoint = ""      # HF OPTForCausalLM / T5ForConditionalGeneration dir; "" = random (model.text)
    # This project's stage-1 workdir (newest checkpoint) or an HF BLIP-2 dir: ln_vision, queries and
    # the Q-Former's query path; "" = fresh. language_projection starts fresh (unless stage2_checkpoint).
    c.stage1_checkpoint = ""
    # Fine-tuning a stage-2 model (e.g. LAVIS caption_coco_ft): an HF Blip2ForConditionalGeneration dir
    # or a stage-2 workdir gives the query path AND language_projection; exclusive with stage1_checkpoint.
    c.stage2_checkpoint = ""
    return c


def eval_section() -> ml_collections.ConfigDict:
    """`config.eval`: captioning of a held-out split after training (and every `train.eval_every`)."""
    c = ml_collections.ConfigDict()
    c.source = data_pipeline.source_config()  # held-out split (path "" = no evaluation)
    c.batch_size = 32       # images per `generate` call (the last batch is padded)
    c.max_new_tokens = 30   # generation budget per caption (OPT: queries + prompt + this <= positions)
    c.num_beams = 1         # 1 = greedy
    c.log_examples = 5      # generated captions written to the log at each evaluation
    return c
