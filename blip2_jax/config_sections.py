"""Every config section with its defaults and the meaning of each field: plain ml_collections.

The experiment configs (`configs/*.py`) are built from these sections, and
`blip2_jax.config_validation` checks a config against them. Reading a config imports nothing but
ml_collections: this module sits at the bottom of the package (docs/architecture.md).

Sections:
- `loop_config()`: task, seed, mesh, train, optimizer (what the one train loop reads);
- `data_config()`, `source_config(...)`: the input pipeline and one data source;
- `layer_stack_fields()`: `scan_layers` and `remat_policy` of the stage-1 and stage-2 models;
- `stage1_model()`, `stage1_loss()`, `stage1_init()`, `stage1_eval()`: stage 1;
- `stage2_model(llm)`, `stage2_init()`, `stage2_eval()`: stage 2;
- `text_lm_model(llm)`: the demo's text-only LLM pretraining;
- `experiment_config(task)`: the loop's sections plus `data`, with one batch size.
"""
from __future__ import annotations

import ml_collections

# CLIP's normalisation (LAVIS blip_image_train / eval, HF BlipImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The TF EfficientNet-Lite models' normalisation: (x/255 - mean) / std == (x - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
# The demo with a pretrained frozen encoder (`demo_effnet` variants): scenes of all four shapes and the
# ImageNet-trained EfficientNet-Lite0, both written by launch/demo.sh.
EFFNET_DEMO_DATA = "demo_data/shapes4"  # python -m blip2_jax.data.shapes --out demo_data/shapes4 --num_heldout 100
EFFNET_DEMO_WEIGHTS = "demo_data/efficientnet_lite0"  # python -m blip2_jax.convert.efficientnet --out ...


SOURCE_WEIGHTINGS = ("weights", "sqrt_size")  # data.source_weighting: how train sources mix

def loop_config() -> ml_collections.ConfigDict:
    """Every field the loop reads, with its default. Stage configs start from this and add sections.

    `blip2_jax.config_validation.validate` checks these sections against it (unknown names, types).
    """
    c = ml_collections.ConfigDict()
    c.task = ""                  # which stage main.py runs: "stage1", "stage2"
    c.seed = 0                   # parameter init and every random draw derive from it

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1             # pure data parallelism; -1 = all devices not used by the others
    c.mesh.fsdp = 1              # parameters (the "embed" dim) sharded; the batch is split too
    c.mesh.tensor = 1            # mlp/heads/vocab dims sharded
    c.mesh.axis_rules = ()       # overrides of sharding.DEFAULT_AXIS_RULES: ((logical, mesh axes), ...)

    c.train = ml_collections.ConfigDict()
    c.train.total_steps = 10_000
    c.train.batch_size = 8       # GLOBAL batch per step (all processes, all micro-batches)
    c.train.grad_accum_steps = 1  # micro-batches per step; in-batch negatives are per micro-batch
    c.train.log_every = 10
    c.train.eval_every = 0       # 0: evaluate only after the last step
    c.train.checkpoint_every = 1000   # 0: checkpoint only at the end and on preemption
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True
    c.train.skip_nonfinite_updates = False  # False: stop with an error naming the step
    c.train.peak_flops_per_device = 0.0     # for MFU (e.g. 197e12 TPU v5e bf16); 0: no MFU
    # (N, M): a jax.profiler trace of steps N+1..M into <workdir>/profile (TensorBoard's profile plugin,
    # Perfetto); () = none. Start after the first step, which compiles.
    c.train.profile_steps = ()

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.schedule = "warmup_cosine"  # or "lavis_epoch_cosine", "constant"
    c.optimizer.peak_lr = 1e-4
    c.optimizer.warmup_lr = 1e-6            # LAVIS warmup_lr; the warmup starts here
    c.optimizer.min_lr = 1e-5
    c.optimizer.warmup_steps = 2000
    c.optimizer.steps_per_epoch = 0         # lavis_epoch_cosine only
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98                   # the paper's (LAVIS's code default is 0.999)
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.05         # not on biases, norms, other 0-/1-D params
    c.optimizer.grad_clip_norm = 0.0        # 0: no clipping (as LAVIS)
    # < 1: layer-wise LR decay of a trainable ViT (model.train_vision): block i of L gets
    # lr * decay**(L - i), the embeddings lr * decay**(L + 1) (LAVIS get_optimizer_params); 1 = off.
    c.optimizer.vit_layer_decay = 1.0
    return c


def experiment_config(task: str) -> ml_collections.ConfigDict:
    """`loop_config()` for `task` plus a `data` section whose `global_batch_size` IS `train.batch_size`
    (one FieldReference: `--config.train.batch_size=N` sets both)."""
    c = loop_config()
    c.task = task
    c.data = data_config()
    c.data.global_batch_size = c.train.get_ref("batch_size")
    return c


# -- data --------------------------------------------------------------------------------------
def source_config(path: str = "", *, weight: float = 1.0, prefix: str = "",
                  tfds_name: str = "", tfds_data_dir: str = "", split: str = "train",
                  image_key: str = "image",
                  captions_key: str = "captions") -> ml_collections.ConfigDict:
    """One data source: our ArrayRecord shards (`path`) or an array_record TFDS dataset."""
    return ml_collections.ConfigDict({
        "path": path,                    # shard dir, glob or file (ArrayRecord built by data.build)
        "prefix": prefix,                # shard prefix inside `path` ("" = any), e.g. "train"
        "weight": weight,                # mixing weight (normalised over all train sources)
        "tfds_name": tfds_name,          # if set: read tfds.data_source(tfds_name) instead of path
        "tfds_data_dir": tfds_data_dir,  # TFDS data_dir ("" = TFDS default)
        "split": split,                  # TFDS split
        "image_key": image_key,          # TFDS feature with the image (encoded bytes or uint8 HWC)
        "captions_key": captions_key,    # TFDS feature with the caption(s); "a/b" for nested keys
    })


def data_config() -> ml_collections.ConfigDict:
    """Every data field with its meaning. Override per experiment in configs/."""
    c = ml_collections.ConfigDict()
    # name -> source_config(...). Sources are taken in sorted name order (fixes dense image ids).
    c.train_sources = ml_collections.ConfigDict()
    # Rows per step over all processes (split evenly over them). In an experiment config this is
    # train.batch_size itself (a FieldReference: `experiment_config`), so there is one batch size.
    c.global_batch_size = 32
    c.shuffle = True                # global shuffle of each source (reshuffled every epoch)
    # How sources mix: "weights" - in proportion to each source's `weight`; "sqrt_size" - InstructBLIP's
    # size-balanced sampling (Dai et al. 2023, sec. 3.3): in proportion to sqrt(records) x `weight` (the
    # paper's manual adjustments), so small datasets are not drowned and large ones not overfitted.
    c.source_weighting = "weights"  # one of SOURCE_WEIGHTINGS
    # Images.
    c.image_size = 224              # output H = W (224 pretrain, 364 caption fine-tuning, ...)
    c.min_scale = 0.5               # RandomResizedCrop area scale range (LAVIS: 0.5 - 1.0)
    c.max_scale = 1.0
    c.hflip = True                  # random horizontal flip with p = 0.5
    c.randaugment = False           # True = LAVIS blip_image_train, False = blip2_image_train
    c.randaug_num_ops = 2           # RandomAugment(N, M): ops per image
    c.randaug_magnitude = 5         # level M of 10
    c.jpeg_draft = True             # let libjpeg downscale big JPEGs by 2^k while decoding
    c.image_mean = CLIP_MEAN
    c.image_std = CLIP_STD
    # Text.
    c.text_mode = "stage1"          # one of TEXT_MODES: stage1 | opt | t5_prefix | t5_prompt
    c.tokenizer_path = ""           # local dir: BERT vocab (stage1) or the LLM's tokenizer files
    c.max_text_len = 32             # tokens, padded and truncated to exactly this
    c.max_words = 50                # caption cleaning: keep at most this many words
    c.caption_index = -1            # -1: a random caption of the record per visit; k: always the k-th
    c.prompt = ""                   # opt: prepended, masked in labels; t5_prompt: encoder text
    # opt: how many leading tokens the prompt masks. "lavis": the prompt's own token count, as LAVIS
    # counts it; a prompt ending in a space ("a photo of ") then masks the caption's first token too (a
    # byte-level BPE joins the space to the next word: "ĠA"), which is never trained. "exact": the
    # tokens of the prompt without its trailing whitespace, so the caption's first token is a target.
    c.prompt_mask = "lavis"
    # Instruction tuning (InstructBLIP, `model.instruction_aware`): "" = off; "caption" = every caption gets
    # one of InstructBLIP's captioning instructions (blip2_jax/data/instructions.py), drawn per visit, as
    # its prompt (text modes opt and t5_prompt) and as the Q-Former's instruction; "vqa" = instruction
    # records (`data.build table --question_key`): a VQA instruction around the question, the answer as target.
    c.instruction_task = ""
    c.qformer_tokenizer_path = ""   # the Q-Former's BERT vocabulary (local dir) for the instruction
    c.max_instruction_len = 32      # Q-Former instruction tokens, padded and truncated to exactly this
    # Throughput.
    c.num_workers = 0               # grain worker processes (0 = in-process threads only)
    c.worker_buffer_size = 2        # batches buffered per worker
    c.read_threads = 8              # threads per process (or worker) reading + transforming
    c.read_buffer_size = 128        # elements prefetched by those threads
    return c


# -- models ------------------------------------------------------------------------------------
def layer_stack_fields() -> dict:
    """How every tower of `config.model` runs its layers (`blip2_jax.models.layers`)."""
    return dict(
        # True: each tower's layers are one nn.scan (parameters stacked on a leading "layers" axis; one
        # compiled block: the paper-scale step compiles in about half the unrolled time). Checkpoints
        # of either layout load into the other (blip2_jax.models.stacking); the Q-Former scans groups of
        # cross_attention_frequency layers, so its num_layers must be a multiple of it.
        scan_layers=False,
        # What a rematerialised tower (`remat`, `llm_remat`, `vision.remat` on) keeps for the backward
        # pass: "full" (nothing but each block's input: the least memory), "save_dots" (the weight
        # matmuls' outputs: less recomputation, more memory), "none" (no remat whatever the switches).
        remat_policy="full",
        # Every tower's attention: "xla" (the einsum form, float32 scores), "fused"
        # (jax.nn.dot_product_attention: cuDNN flash attention on NVIDIA GPUs in bfloat16/float16,
        # XLA's form elsewhere) or "pallas" (the Pallas flash-attention kernel: TPU only, or CPU under
        # Pallas's interpret mode; blip2_jax/models/pallas_attention.py). The same numbers up to float
        # rounding; attention dropout always takes the einsum form.
        attention_impl="xla",
    )


# -- stage 1 -----------------------------------------------------------------------------------
def stage1_model(**overrides) -> ml_collections.ConfigDict:
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
    m.update(layer_stack_fields())
    # Train the ViT too (LAVIS `freeze_vit: False`, as its retrieval fine-tuning does): it joins the
    # trainable tree, the optimizer state and the checkpoint, starting from init.vision_checkpoint
    # (or a random init). A later run reads such a workdir as its init.vision_checkpoint.
    m.train_vision = False
    m.update(overrides)
    return m


def stage1_loss() -> ml_collections.ConfigDict:
    """`config.loss`: the ITC / ITM / ITG options (LAVIS defaults)."""
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


def stage1_init() -> ml_collections.ConfigDict:
    """`config.init`: where stage 1's pretrained weights come from ("" = fresh / random)."""
    c = ml_collections.ConfigDict()
    # HF BLIP-2 dir (EVA ViT-g), HF CLIPVisionModel dir, or a workdir of this project whose checkpoint
    # trained the ViT (model.train_vision); "" = random frozen ViT
    c.vision_checkpoint = ""
    c.qformer_checkpoint = ""  # bert-base-uncased style dir for the Q-Former (LAVIS init)
    c.stage1_checkpoint = ""   # whole stage-1 model: HF Blip2ForImageTextRetrieval dir or converted LAVIS dir
    return c


def stage1_eval() -> ml_collections.ConfigDict:
    """`config.eval`: zero-shot retrieval on a held-out split (after training and every `train.eval_every`)."""
    c = ml_collections.ConfigDict()
    c.source = source_config()  # held-out split (path "" = no evaluation)
    c.batch_size = 32
    c.k_test = 0  # > 0: LAVIS's ITM re-ranking of the top k_test candidates
    # Zero-shot classification (blip2_jax/evaluate/zero_shot.py), also after training / every eval_every:
    c.zero_shot = ml_collections.ConfigDict()
    c.zero_shot.path = ""        # labelled images: a folder of <class>/<images> or a JSONL file; "" = none
    c.zero_shot.classes = ""     # comma-separated class names; "" = the labels found in `path`
    c.zero_shot.templates = ()   # prompt templates with "{}"; () = zero_shot.TEMPLATES
    c.zero_shot.itm_top_k = 0    # > 0: re-rank each image's top k classes by ITM + ITC
    return c


# -- stage 2 -----------------------------------------------------------------------------------
def stage2_model(llm: str = "opt", **overrides) -> ml_collections.ConfigDict:
    """`config.model` for stage 2 (defaults: the paper's EVA ViT-g + BERT-base Q-Former query path)."""
    s1 = stage1_model()
    m = ml_collections.ConfigDict()
    # The LLM's HF model_type: "opt", "llama" (Vicuna too), "mistral", "qwen2", "gemma" (decoder-only,
    # Blip2DecoderOnly; data.text_mode "opt") or "t5" (FlanT5, Blip2T5)
    m.llm = llm
    m.vision = s1.vision         # the frozen ViT's sizes (as stage 1; see stage1_model)
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
    m.update(layer_stack_fields())
    m.llm_dropout = True         # the frozen LLM's own dropout in training (LAVIS: it stays in train mode)
    # InstructBLIP: the Q-Former also reads the instruction (its text path: word/position embeddings and
    # text FFNs, sized by qformer_text; vocab_size 0 = the size of data.qformer_tokenizer_path's vocabulary).
    m.instruction_aware = False
    m.qformer_text = ml_collections.ConfigDict(dict(vocab_size=0, pad_token_id=0, max_position_embeddings=512))
    m.t5_dense_act_fn = "gelu"   # T5 FFN activation override (LAVIS and HF BLIP-2: exact GELU); "" = checkpoint's
    # The LLM's HF config.json fields (model_type, sizes, token ids) when init.llm_checkpoint is
    # empty (a random frozen LLM: tests); ignored when a checkpoint is given.
    m.text = ml_collections.ConfigDict()
    m.update(overrides)
    return m


def stage2_init() -> ml_collections.ConfigDict:
    """`config.init`: where stage 2's pretrained weights come from ("" = fresh / random)."""
    c = ml_collections.ConfigDict()
    c.vision_checkpoint = ""   # HF BLIP-2 dir (EVA ViT-g) or HF CLIPVisionModel dir; "" = random ViT (seed's)
    # HF OPT / LLaMA / Mistral / Qwen2 / Gemma `...ForCausalLM` or `T5ForConditionalGeneration` directory;
    # "" = random (model.text)
    c.llm_checkpoint = ""
    # This project's stage-1 workdir (newest checkpoint) or an HF BLIP-2 dir: ln_vision, queries and
    # the Q-Former's query path; "" = fresh. language_projection starts fresh (unless stage2_checkpoint).
    c.stage1_checkpoint = ""
    # Fine-tuning a stage-2 model (e.g. LAVIS caption_coco_ft): an HF Blip2ForConditionalGeneration dir
    # or a stage-2 workdir gives the query path AND language_projection; exclusive with stage1_checkpoint,
    # except for instruction tuning (model.instruction_aware), where stage1_checkpoint then gives only the
    # Q-Former's text path (a BLIP-2 stage-2 model has none).
    c.stage2_checkpoint = ""
    return c


def stage2_eval() -> ml_collections.ConfigDict:
    """`config.eval`: captioning of a held-out split after training (and every `train.eval_every`)."""
    c = ml_collections.ConfigDict()
    c.source = source_config()  # held-out split (path "" = no evaluation)
    c.batch_size = 32       # images per `generate` call (the last batch is padded)
    c.max_new_tokens = 30   # generation budget per caption (OPT: queries + prompt + this <= positions)
    c.num_beams = 1         # 1 = greedy
    c.log_examples = 5      # generated captions written to the log at each evaluation
    return c


# -- text LM (the demo's LLM) ------------------------------------------------------------------
def text_lm_model(llm: str = "opt") -> ml_collections.ConfigDict:
    """`config.model` for the text LM: which LLM, its HF config fields, its dtype."""
    m = ml_collections.ConfigDict()
    m.llm = llm                   # "opt", "llama" or "t5"
    m.dtype = "float32"           # parameters and compute while training the LM
    m.scan_layers = False         # one nn.scan over the LM's layers (see layer_stack_fields)
    # HF config.json fields of the LM (the names transformers uses); vocab_size 0 = the tokenizer's size.
    if llm == "opt":
        m.text = ml_collections.ConfigDict(dict(
            model_type="opt", vocab_size=0, hidden_size=128, num_hidden_layers=2, ffn_dim=512,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=128, dropout=0.1,
            attention_dropout=0.0, activation_function="relu", do_layer_norm_before=True,
            pad_token_id=1, bos_token_id=2, eos_token_id=2))
    elif llm == "llama":  # grouped-query attention (4 heads, 2 K/V heads), RoPE, untied head
        m.text = ml_collections.ConfigDict(dict(
            model_type="llama", vocab_size=0, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False))
    else:
        m.text = ml_collections.ConfigDict(dict(
            model_type="t5", vocab_size=0, d_model=128, d_kv=32, d_ff=384, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=32,
            dropout_rate=0.1, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return m


def use_efficientnet(c: ml_collections.ConfigDict, checkpoint: str = EFFNET_DEMO_WEIGHTS,
                     image_size: int = 128) -> None:
    """Makes `c` (stage 1 or 2) use the ImageNet-trained EfficientNet-Lite0 as its frozen encoder:
    `model.vision`, `init.vision_checkpoint`, and the data's image size and normalisation. At 128 px its
    1280-wide head gives a 4 x 4 grid (16 tokens for the Q-Former to cross-attend to)."""
    c.model.vision = ml_collections.ConfigDict(dict(style="efficientnet_lite0", image_size=image_size,
                                                    with_head=True))
    c.init.vision_checkpoint = checkpoint
    c.data.image_size = image_size
    c.data.image_mean, c.data.image_std = LITE_MEAN, LITE_STD
