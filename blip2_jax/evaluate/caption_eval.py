"""Captioning a held-out split: one implementation for the evaluation CLI and for stage-2 training.

- `generate_texts`: decoded generations for a batch of images and (optional) prompts;
- `caption_split`: every valid image of an eval dataset captioned, LAVIS-cleaned;
- `caption_scores`: caption_exact, top_caption_share, BLEU-4, CIDEr against the references;
- `evaluator(config, model, tokenizer)`: what stage-2 training runs every `train.eval_every` steps
  (greedy, or `eval.num_beams`, captions with the training prompt, `generation_prompt`).
"""
from __future__ import annotations

import collections
import logging
from typing import Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from blip2_jax import processor as processor_lib
from blip2_jax import sharding
from blip2_jax.data import instructions
from blip2_jax.data import pipeline as data_pipeline
from blip2_jax.data import text as data_text
from blip2_jax.decoding import generate
from blip2_jax.evaluate import captioning

log = logging.getLogger(__name__)


def pad_to_multiple(ids: np.ndarray, mask: np.ndarray, multiple: int, pad_id: int, side: str):
    """Widen `[N, T]` prompts with padding (mask 0) to a multiple of `multiple` columns (fewer shapes,
    fewer compilations)."""
    width = -(-ids.shape[1] // max(1, multiple)) * max(1, multiple)
    extra = width - ids.shape[1]
    if extra <= 0:
        return ids, mask
    cols = ((extra, 0) if side == "left" else (0, extra))
    return (np.pad(ids, ((0, 0), cols), constant_values=pad_id), np.pad(mask, ((0, 0), cols)))


def generate_texts(model, params, processor, pixels: np.ndarray, prompts: Optional[Sequence[str]], *,
                   pad_multiple: int = 1, **generate_kwargs) -> list[str]:
    """Decoded generations (cut at the first EOS) for a batch of images and optional prompts (InstructBLIP:
    also the Q-Former's instruction, the empty one without prompts)."""
    ids = mask = None
    if prompts:
        ids, mask = processor.tokenize(list(prompts))
        ids, mask = pad_to_multiple(ids, mask, pad_multiple, processor.pad_token_id, processor.padding_side)
    if processor.instruction_aware:
        q_ids, q_mask = processor.tokenize_instruction(list(prompts) if prompts else [""] * len(pixels))
        generate_kwargs = dict(generate_kwargs, qformer_input_ids=q_ids, qformer_attention_mask=q_mask)
    out = generate(model, params, pixels, ids, mask, **generate_kwargs)
    return processor.decode(sharding.host_value(out))


def caption_split(model, params, processor, batches: Iterable[Mapping[str, np.ndarray]], *, prompt: str,
                  max_words: int, pad_multiple: int = 1, mesh=None, **generate_kwargs) -> dict[int, str]:
    """`{record index: cleaned caption}` for every valid row of eval `batches` (the pipeline's
    `make_eval_dataset`: `image`, `image_id` = record index, `valid`). With several processes each
    passes its own `batches` (as many on every process) and the `mesh`; all get every caption."""
    out: dict[int, str] = {}
    for b in batches:
        rows = sharding.eval_inputs(np.asarray(b["image"]), mesh)
        texts = generate_texts(model, params, processor, rows, [prompt] * rows.shape[0] if prompt else None,
                               pad_multiple=pad_multiple, **generate_kwargs)
        for image_id, valid, t in zip(sharding.eval_rows(b["image_id"], mesh), sharding.eval_rows(b["valid"], mesh),
                                      texts):
            if valid:
                out[int(image_id)] = data_text.clean_caption(t, max_words)
        log.info("captioned %d images", len(out))
    return out


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


def generation_prompt(config) -> str:
    """The text prompt a stage-2 run's captions are generated from: the one it was trained with.

    OPT: `data.prompt` without its trailing whitespace. The pipeline tokenises `prompt + caption` as
    one string, and a byte-level BPE attaches the prompt's trailing space to the caption's first word
    ("Ġa"), so the prompt alone would end in a lone space token the model never saw in training.
    T5: `t5_prompt` mode encodes the fixed prompt (default "a photo of", as the pipeline); `t5_prefix`
    has no fixed prompt (the visual prompt alone).
    Instruction tuning (`data.instruction_task`): the first captioning instruction, "A short image
    caption:" (training draws one per example; the held-out evaluation is captioning whatever the task).
    """
    mode, prompt = config.data.text_mode, config.data.prompt
    if config.data.get("instruction_task"):
        return instructions.TEMPLATES["caption"][0]
    if mode == "opt":
        return prompt.rstrip()
    if mode == "t5_prompt":
        return prompt or "a photo of"
    return ""


def evaluator(config, model, tokenizer, mesh=None):
    """`(params, step) -> metrics`: greedy (or `eval.num_beams`) captions of every image of
    `config.eval.source` with the training prompt, scored by `caption_scores` against the cleaned
    references. With several processes each captions its share of the images on the train `mesh`
    (as many batches on every process); the metrics are those of one process captioning all."""
    ev, data_cfg = config.eval, config.data
    qformer_tokenizer = None
    if model.config.instruction_aware:
        qformer_tokenizer = data_text.load_bert_tokenizer(data_cfg.qformer_tokenizer_path)
    processor = processor_lib.for_model(model, tokenizer, data_cfg.image_size, qformer_tokenizer)
    prompt = generation_prompt(config)

    def evaluate(params, step: int) -> dict:
        ds = data_pipeline.make_eval_dataset(data_cfg, ev.source, batch_size=ev.batch_size,
                                             process_index=jax.process_index(), process_count=jax.process_count())
        generated = caption_split(model, params, processor, ds, prompt=prompt, max_words=data_cfg.max_words,
                                  mesh=mesh, max_new_tokens=ev.max_new_tokens, num_beams=ev.num_beams)
        references = [[data_text.clean_caption(c, data_cfg.max_words) for c in caps]
                      for caps in data_pipeline.read_captions(ev.source)]
        for i in sorted(generated)[:ev.log_examples]:
            log.info("step %d, image %d: %r (references %r)", step, i, generated[i], references[i])
        return caption_scores(references, generated)

    return evaluate
