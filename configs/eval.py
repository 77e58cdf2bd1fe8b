"""Zero-shot / fine-tuned evaluation of BLIP-2 as the paper reports it (LAVIS's eval settings).

`python -m blip2_jax.evaluate.run --config=configs/eval.py:VARIANT --config.model=PATH [--out=FILE]`

Variants (settings from LAVIS `lavis/projects/blip2/eval/*.yaml`, see docs/evaluation.md):
  coco_caption      COCO Karpathy test, COCO-finetuned model, 364 px, prompt "a photo of", beam 5,
                    max 30 / min 8 new tokens, repetition and length penalty 1.0 (release-era LAVIS).
  nocaps            NoCaps val with the same model and decoding (the paper's zero-shot NoCaps).
  coco_retrieval    COCO 5k test: ITC similarities, then ITM re-ranking of the top k_test=128, 364 px.
  flickr_retrieval  Flickr30K 1k test with the COCO-finetuned retrieval model (the paper's
                    "zero-shot Flickr"), same settings.
  vqav2, okvqa, gqa zero-shot VQA: "Question: {} Short answer:", beam 5, max 10 / min 1 new tokens,
                    224 px; length penalty 0 for OPT and -1 for FlanT5 (each model's
                    `predict_answers` default: LAVIS's `valid_step` does not pass one).
                    Metric: VQAv2 accuracy (vqav2, okvqa) or exact match (gqa).
  demo_caption      this repo's stage-2 demo (workdirs/demo_stage2_opt, rebuilt from
                    configs/stage2.py:demo_opt) on the bundled shapes held-out split: runs on 2 CPUs.

Fields:
  task            "caption" | "retrieval" | "vqa"
  model           an HF BLIP-2 directory (Blip2ForConditionalGeneration for caption/vqa,
                  Blip2ForImageTextRetrieval for retrieval) or a workdir of this project
  train_config    for a workdir: "configs/stage2.py:demo_opt" style path[:variant] of the config
                  that trained it (a workdir does not store its config); "" for an HF directory
  tokenizer       tokenizer directory ("" = the model directory, or the train config's)
  frozen_dtype    "float32" | "bfloat16" | "int8": the frozen ViT and LLM (LAVIS evaluates the ViT in
                  fp32 for the 364 px caption/retrieval models and the LLM in fp16/bf16; "int8":
                  weight-only int8 matrices, bfloat16 compute); "" (default): float32 for an HF
                  directory, the run's model.frozen_dtype for a workdir
  image_size, batch_size, jpeg_draft (let libjpeg downscale big JPEGs while decoding; False = exact)
  data.source     captioning / retrieval records (blip2_jax.data.pipeline.source_config: this
                  project's ArrayRecord shards, or a TFDS array_record dataset)
  data.max_words  caption cleaning (LAVIS pre_caption) for references and retrieval texts
  data.max_text_len  retrieval: Q-Former text length (LAVIS: padding max_length 35)
  vqa.questions   a JSONL file (docs/evaluation.md): {"image", "question_id", "question", "answers"}
  vqa.metric      "vqa" (VQAv2 10-human accuracy) | "exact" (GQA: normalised exact match)
  vqa.apply_lemmatizer  OK-VQA: spaCy lemmatisation of the predicted answers (needs spaCy)
  generation.*    prompt, num_beams, max_new_tokens, min_new_tokens, repetition_penalty,
                  length_penalty (ConfigDict {"opt": x, "t5": y}: picked by the model's LLM)
  retrieval.k_test  ITM re-ranking candidates per query (0 = ITC only)
  max_examples    > 0: evaluate only the first N images / questions (smoke tests)
"""
import ml_collections

from blip2_jax import config_sections as sections

VARIANTS = ("coco_caption", "nocaps", "coco_retrieval", "flickr_retrieval", "vqav2", "okvqa", "gqa",
            "demo_caption")
VQA_PROMPT = "Question: {} Short answer:"
DATA = "data"  # where `python -m blip2_jax.data.build` wrote the eval shards


def _generation(prompt: str, num_beams: int, max_new: int, min_new: int, lp_opt: float,
                lp_t5: float) -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.prompt = prompt                  # VQA: formatted with the question ("{}")
    g.num_beams = num_beams
    g.max_new_tokens = max_new         # LAVIS max_len
    g.min_new_tokens = min_new         # LAVIS min_len
    g.repetition_penalty = 1.0         # release-era LAVIS (HEAD defaults to 1.15 for captions)
    g.length_penalty = ml_collections.ConfigDict({"opt": lp_opt, "t5": lp_t5})
    g.prompt_pad_multiple = 8          # pad prompts to a multiple of this (fewer compilations)
    return g


def get_config(arg: str = "coco_caption") -> ml_collections.ConfigDict:
    arg = arg or "coco_caption"
    if arg not in VARIANTS:
        raise ValueError(f"configs/eval.py: unknown variant {arg!r} (expected one of {', '.join(VARIANTS)})")
    c = ml_collections.ConfigDict()
    c.name = arg
    c.model = ""
    c.train_config = ""
    c.tokenizer = ""
    c.frozen_dtype = ""  # float32 for an HF directory, the run's for a workdir
    c.image_size = 224
    c.batch_size = 16
    c.jpeg_draft = False
    c.max_examples = 0
    c.data = ml_collections.ConfigDict()
    c.data.source = sections.source_config()
    c.data.max_words = 50
    c.data.max_text_len = 35
    c.vqa = ml_collections.ConfigDict(dict(questions="", metric="vqa", apply_lemmatizer=False))
    c.retrieval = ml_collections.ConfigDict(dict(k_test=128))
    c.generation = _generation("a photo of", 5, 30, 8, 1.0, 1.0)

    if arg in ("coco_caption", "nocaps"):
        # caption_coco_opt2.7b_eval.yaml: the COCO-finetuned model, blip_image_eval 364.
        c.task = "caption"
        c.model = "checkpoints/blip2-opt-2.7b-coco"
        c.image_size = 364
        c.batch_size = 8
        prefix = "coco_karpathy_test" if arg == "coco_caption" else "nocaps_val"
        c.data.source = sections.source_config(DATA, prefix=prefix)
    elif arg in ("coco_retrieval", "flickr_retrieval"):
        # ret_coco_eval.yaml / ret_flickr_eval.yaml: model_type coco, 364 px, k_test 128.
        c.task = "retrieval"
        c.model = "checkpoints/blip2-itm-vit-g-coco"
        c.image_size = 364
        c.batch_size = 32
        prefix = "coco_karpathy_test" if arg == "coco_retrieval" else "flickr30k_test"
        c.data.source = sections.source_config(DATA, prefix=prefix)
    elif arg in ("vqav2", "okvqa", "gqa"):
        # {vqav2,okvqa,gqa}_zeroshot_*_eval.yaml: 224 px, beam 5, max_len 10, min_len 1.
        c.task = "vqa"
        c.model = "checkpoints/blip2-flan-t5-xl"
        c.batch_size = 64
        c.generation = _generation(VQA_PROMPT, 5, 10, 1, 0.0, -1.0)
        c.vqa.questions = {"vqav2": f"{DATA}/vqav2_val.jsonl", "okvqa": f"{DATA}/okvqa_test.jsonl",
                           "gqa": f"{DATA}/gqa_testdev_balanced.jsonl"}[arg]
        c.vqa.metric = "exact" if arg == "gqa" else "vqa"
        c.vqa.apply_lemmatizer = arg == "okvqa"
    else:  # demo_caption
        c.task = "caption"
        c.model = "workdirs/demo_stage2_opt"
        c.train_config = "configs/stage2.py:demo_opt"
        c.image_size = 64
        c.batch_size = 50
        c.data.source = sections.source_config("demo_data/shapes", prefix="heldout")
        # The demo LLM was trained on "a photo of " + caption + "\n"; a caption is ~13 tokens.
        c.generation = _generation("a photo of", 1, 20, 0, 1.0, 1.0)
    return c
