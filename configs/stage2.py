"""Stage 2 (generative pretraining with a frozen LLM): the Q-Former's queries, projected to the LLM
width, are a soft visual prompt for a frozen OPT or FlanT5.

`python -m blip2_jax.main --config=configs/stage2.py[:variant] --workdir=DIR [--config.x=y ...]`

Variants (the paper's settings: EVA ViT-g/14 frozen at 224 px, BERT-base Q-Former query path with
32 queries, AdamW (0.9, 0.98), wd 0.05, peak LR 1e-4 -> min 5e-5 cosine after 2k warmup steps, 80k
steps; frozen towers in bfloat16):
  opt2.7b    (default) OPT-2.7B, batch 1920, LM loss on `</s> caption "\\n"` (EOS "\\n").
  opt6.7b    OPT-6.7B, batch 1920.
  flant5xl   FlanT5-XL, batch 1520, prefix-LM loss (caption split at a random point between the
             first token and the middle: prefix to the encoder after the visual prompt, suffix as the
             decoder target); exact-GELU FFN as LAVIS.
  flant5xxl  FlanT5-XXL, batch 1520.
  llama3.2-1b  the paper's OPT recipe (batch 1920, LM loss on `BOS caption "\\n"`) with LLaMA 3.2 1B
             as the frozen LLM (`checkpoints/Llama-3.2-1B`: HF `LlamaForCausalLM` + tokenizer). Not a
             paper setting: LAVIS has no LLaMA stage-2 pretraining.
  qwen2.5-1.5b  the same with Qwen2.5 1.5B (`checkpoints/Qwen2.5-1.5B`, HF `Qwen2ForCausalLM`; its
             tokenizer has no BOS: `caption "\\n"`).
  opt2.7b_coco_ft  LAVIS caption_coco_ft: a pretrained BLIP-2 OPT-2.7B (`init.stage2_checkpoint`, HF
             dir) fine-tuned on COCO Karpathy-train captions with the ViT unfrozen (`model.train_vision`),
             364 px, prompt "a photo of ", LR 1e-5 -> 0 after 1k warmup, 5 epochs at global batch 128.
  instruct_flant5xl  InstructBLIP instruction tuning (Dai et al. 2023) of BLIP-2 FlanT5-XL: starts from the
             stage-2 model `checkpoints/blip2-flan-t5-xl` (HF dir: ViT, query path, projection), the
             Q-Former's text path (instruction input) from the stage-1 run `init.stage1_checkpoint`; ViT and
             LLM frozen; the paper's optimisation (batch 192, AdamW (0.9, 0.999), wd 0.05, LR 1e-8 -> 1e-5
             over 1k steps, cosine to 0, 60k steps); COCO captions with InstructBLIP's captioning
             instructions (`data.instruction_task`; its VQA templates need question/answer records, which
             the builders do not write yet).
  demo_opt   tiny, 2 CPU cores: the stage-1 demo's ViT/Q-Former sizes (its checkpoint loads), the
             tiny OPT trained on the captions by `configs/text_lm.py:demo_opt`, the shapes data; with
             the fixed prompt "a photo of " (set `data.prompt=""` for none).
  demo_opt_effnet  demo_opt with the ImageNet-trained EfficientNet-Lite0 as the frozen encoder on the
             scenes of all four shapes (after `configs/stage1.py:demo_effnet` and
             `configs/text_lm.py:demo_opt_effnet`): what launch/demo.sh runs.
  demo_t5    the same with the tiny T5 of `configs/text_lm.py:demo_t5`, "a photo of" -> caption.
  demo_instruct  InstructBLIP instruction tuning on 2 CPU cores: questions about the squares scenes
             (`python -m blip2_jax.data.shapes_vqa --out demo_data/shapes_vqa --shapes square`: colour, size
             and position of either square), the instruction-aware Q-Former trained from scratch on the
             random frozen ViT of demo_opt, the frozen LLM the tiny LLaMA of
             `configs/text_lm.py:demo_instruct_llama`; held-out answer accuracy against the majority answer
             at the end (`vqa_acc`, `majority_baseline`): what launch/demo_instruct.sh runs.
  <paper variant>_v5p32  (opt2.7b, opt6.7b, flant5xl, flant5xxl, opt2.7b_coco_ft) with the settings planned
             for a v5p-32 slice (`PLANNED`; docs/pod_planning.md).
Initialisation: `init.stage1_checkpoint` (a stage-1 workdir of this project, or an HF BLIP-2 dir)
gives ln_vision, the queries and the Q-Former; `init.llm_checkpoint` the LLM (and its config);
`init.vision_checkpoint` the ViT; language_projection starts fresh.
The paper-scale variants scan each tower's layers (`model.scan_layers=True`); the demos unroll them.
Every field is documented where it is defined: blip2_jax/config_sections.py.
"""
import ml_collections

from blip2_jax import config_sections as sections

DEMO_DATA = "demo_data/shapes"  # written by `python -m blip2_jax.data.shapes --out demo_data/shapes`
DEMO_STAGE1 = "workdirs/demo_stage1"  # workdir of `configs/stage1.py:demo`
DEMO_LLM = {"opt": "workdirs/demo_text_lm_opt/hf", "t5": "workdirs/demo_text_lm_t5/hf",
            "opt_effnet": "workdirs/demo_effnet_text_lm_opt/hf"}  # configs/text_lm.py
DEMO_EFFNET_STAGE1 = "workdirs/demo_effnet_stage1"  # workdir of `configs/stage1.py:demo_effnet`
DEMO_VQA_DATA = "demo_data/shapes_vqa"  # python -m blip2_jax.data.shapes_vqa --out demo_data/shapes_vqa --shapes square
DEMO_INSTRUCT_LLM = "workdirs/demo_instruct_text_lm_llama/hf"  # configs/text_lm.py:demo_instruct_llama
VARIANTS = {  # variant -> (llm, LLM checkpoint dir, global batch)
    "opt2.7b": ("opt", "checkpoints/opt-2.7b", 1920),
    "opt6.7b": ("opt", "checkpoints/opt-6.7b", 1920),
    "flant5xl": ("t5", "checkpoints/flan-t5-xl", 1520),
    "flant5xxl": ("t5", "checkpoints/flan-t5-xxl", 1520),
    "llama3.2-1b": ("llama", "checkpoints/Llama-3.2-1B", 1920),
    "qwen2.5-1.5b": ("qwen2", "checkpoints/Qwen2.5-1.5B", 1920),
    "opt2.7b_coco_ft": ("opt", "checkpoints/opt-2.7b", 128),
    "instruct_flant5xl": ("t5", "checkpoints/flan-t5-xl", 192),
    "demo_opt": ("opt", DEMO_LLM["opt"], 48),
    "demo_t5": ("t5", DEMO_LLM["t5"], 48),
    "demo_opt_effnet": ("opt", DEMO_LLM["opt_effnet"], 48),
    "demo_instruct": ("llama", DEMO_INSTRUCT_LLM, 48),
}

_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
            activation_function="relu", dropout=0.1, attention_dropout=0.0, pad_token_id=1, bos_token_id=2,
            eos_token_id=2)
_FLAN_T5 = dict(model_type="t5", vocab_size=32128, d_kv=64, num_layers=24, num_decoder_layers=24,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", tie_word_embeddings=False,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# The paper LLMs' published HF config.json fields (facebook/opt-*, google/flan-t5-*): `model.text`, the
# architecture when `init.llm_checkpoint` is not here (the TPU planner, the paper-scale tests); a
# checkpoint's own config.json wins whenever it is given.
LLM_CONFIGS = {
    "checkpoints/opt-2.7b": dict(_OPT, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                                 num_attention_heads=32, word_embed_proj_dim=2560),
    "checkpoints/opt-6.7b": dict(_OPT, hidden_size=4096, num_hidden_layers=32, ffn_dim=16384,
                                 num_attention_heads=32, word_embed_proj_dim=4096),
    "checkpoints/flan-t5-xl": dict(_FLAN_T5, d_model=2048, d_ff=5120, num_heads=32),
    "checkpoints/flan-t5-xxl": dict(_FLAN_T5, d_model=4096, d_ff=10240, num_heads=64),
}


# Paper variants planned for a TPU slice by `python -m blip2_jax.plan` (docs/pod_planning.md has each
# plan's per-chip memory, compile time and command): variant -> (paper variant, settings).
# v5p-32 (16 chips of 95 GiB, --topology=v5p:2x2x4): FSDP over the 16 chips, the paper's global batch
# split 16 ways (FlanT5's 1520 is a multiple of 16, not of 32).
V5P_32 = {"mesh.data": 1, "mesh.fsdp": 16, "mesh.tensor": 1}
PLANNED = {
    "opt2.7b_v5p32": ("opt2.7b", V5P_32),
    "opt6.7b_v5p32": ("opt6.7b", V5P_32),
    "flant5xl_v5p32": ("flant5xl", V5P_32),
    "flant5xxl_v5p32": ("flant5xxl", V5P_32),
    "opt2.7b_coco_ft_v5p32": ("opt2.7b_coco_ft", V5P_32),
}


def get_config(arg: str = "opt2.7b") -> ml_collections.ConfigDict:
    arg = arg or "opt2.7b"
    if arg in PLANNED:
        variant, settings = PLANNED[arg]
        c = get_config(variant)
        c.update_from_flattened_dict(settings)
        return c
    if arg not in VARIANTS:
        raise ValueError(f"configs/stage2.py: unknown variant {arg!r} ({', '.join([*VARIANTS, *PLANNED])})")
    llm, llm_dir, batch = VARIANTS[arg]
    c = sections.experiment_config("stage2")
    c.seed = 42
    c.model = sections.stage2_model(llm)
    c.init = sections.stage2_init()
    c.eval = sections.stage2_eval()  # captioning of a held-out split; source "" = none
    c.data.text_mode = "t5_prefix" if llm == "t5" else "opt"  # "opt": every decoder-only LLM
    c.data.max_text_len = 32
    c.data.image_size = 224
    c.data.tokenizer_path = llm_dir  # HF LLM dirs carry their tokenizer files
    c.data.num_workers = 16

    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.peak_lr = 1e-4
    c.optimizer.min_lr = 5e-5
    c.optimizer.warmup_lr = 1e-6
    c.optimizer.warmup_steps = 2000
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.98
    c.optimizer.weight_decay = 0.05
    c.train.total_steps = 80_000
    c.train.batch_size = batch
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.eval_every = 0
    c.init.llm_checkpoint = llm_dir
    if llm_dir in LLM_CONFIGS:
        c.model.text = ml_collections.ConfigDict(LLM_CONFIGS[llm_dir])
    c.init.vision_checkpoint = "checkpoints/blip2-itm-vit-g"
    c.init.stage1_checkpoint = "workdirs/stage1_vit_g"  # this project's stage-1 run (or an HF BLIP-2 dir)
    c.model.llm_remat = True
    c.model.scan_layers = True  # paper scale: one compiled block per tower (the demos stay unrolled)
    c.mesh.data = -1
    c.mesh.fsdp = 1
    if arg.startswith("demo"):
        _demo(c, llm)
        if arg.endswith("_effnet"):
            _effnet(c)
        if arg == "demo_instruct":
            _demo_instruct(c)
    elif arg.endswith("_coco_ft"):
        _caption_finetune(c)
    elif arg.startswith("instruct_"):
        _instruction_tuning(c)
    return c


def _instruction_tuning(c: ml_collections.ConfigDict) -> None:
    """InstructBLIP: the Q-Former (text path included) and projection of a BLIP-2 stage-2 model tuned on
    instruction data with the ViT and LLM frozen (paper section 3 and appendix)."""
    c.init.stage2_checkpoint = "checkpoints/blip2-flan-t5-xl"  # ln_vision, queries, Q-Former, projection
    c.init.vision_checkpoint = "checkpoints/blip2-flan-t5-xl"
    # The Q-Former's text path, which BLIP-2 stage-2 models drop: this project's stage-1 run (or an HF
    # Blip2ForImageTextRetrieval directory).
    c.init.stage1_checkpoint = "workdirs/stage1_vit_g"
    c.model.instruction_aware = True
    c.model.qformer_text.update(vocab_size=30523, pad_token_id=0, max_position_embeddings=512)  # BERT + [DEC]
    c.data.text_mode = "t5_prompt"  # the instruction to the encoder, the answer as the decoder target
    c.data.instruction_task = "caption"
    c.data.qformer_tokenizer_path = "checkpoints/bert-base-uncased"
    c.data.max_text_len = 64
    c.data.max_instruction_len = 64
    c.data.source_weighting = "sqrt_size"  # InstructBLIP's size-balanced sampling once sources are added
    c.data.train_sources = ml_collections.ConfigDict()
    c.data.train_sources.coco = sections.source_config("data/coco", prefix="coco_karpathy_train")
    c.optimizer.b2 = 0.999
    c.optimizer.peak_lr = 1e-5
    c.optimizer.min_lr = 0.0
    c.optimizer.warmup_lr = 1e-8
    c.optimizer.warmup_steps = 1000
    c.train.total_steps = 60_000
    c.train.checkpoint_every = 5000
    c.eval.source = sections.source_config("data/coco", prefix="coco_karpathy_val")
    c.eval.num_beams = 5


def _caption_finetune(c: ml_collections.ConfigDict) -> None:
    """LAVIS caption_coco_ft.yaml: a pretrained BLIP-2 fine-tuned on COCO captions with the ViT unfrozen
    (float32, gradient checkpointing) and the LLM frozen, at 364 px, prompt "a photo of "."""
    c.init.stage1_checkpoint = ""
    c.init.stage2_checkpoint = "checkpoints/blip2-opt-2.7b"  # ln_vision, queries, Q-Former, projection
    c.init.vision_checkpoint = "checkpoints/blip2-opt-2.7b"
    c.model.train_vision = True
    c.model.vision.remat = True
    # The 224-px checkpoint's position embeddings are interpolated to the 26 x 26 grid of 364 px in the
    # forward pass (HF interpolate_pos_encoding); LAVIS resizes the parameter once at load instead.
    c.data.image_size = 364
    c.data.text_mode = "opt"
    c.data.prompt = "a photo of "
    c.data.source_weighting = "sqrt_size"  # InstructBLIP's size-balanced sampling once sources are added
    c.data.train_sources = ml_collections.ConfigDict()
    c.data.train_sources.coco = sections.source_config("data/coco", prefix="coco_karpathy_train")
    c.optimizer.peak_lr = 1e-5
    c.optimizer.min_lr = 0.0
    c.optimizer.warmup_lr = 1e-8
    c.optimizer.warmup_steps = 1000
    c.optimizer.weight_decay = 0.05
    # LAVIS: 5 epochs of batch 16 per GPU (its GPU count is not in the config; 8 here: global 128) over
    # the 566,747 Karpathy-train caption pairs.
    c.train.total_steps = 5 * 566_747 // 128
    c.train.checkpoint_every = 2000
    c.eval.source = sections.source_config("data/coco", prefix="coco_karpathy_val")
    c.eval.num_beams = 5
    c.eval.max_new_tokens = 30


def _demo(c: ml_collections.ConfigDict, llm: str) -> None:
    """Tiny and fast: stage-1 demo sizes (configs/stage1.py:demo), the text_lm demo LLM, shapes data."""
    # The stage-1 demo's random frozen ViT: same sizes, seed and position-embedding spread.
    c.model.vision.update(hidden_size=96, intermediate_size=192, num_layers=2, num_heads=4, image_size=64,
                          patch_size=8, position_init_std=1.0)
    c.model.qformer.update(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256,
                           hidden_dropout=0.0, attention_dropout=0.0)
    c.model.num_query_tokens = 8
    c.model.frozen_dtype = "float32"
    c.model.llm_remat = False
    c.model.scan_layers = False
    c.model.llm_dropout = False  # the tiny LLM is fitted to the captions; its dropout only adds noise here
    c.train.total_steps = 1600
    c.train.log_every = 100
    c.train.checkpoint_every = 400
    c.optimizer.peak_lr = 1e-3
    c.optimizer.min_lr = 1e-4
    c.optimizer.warmup_lr = 1e-5
    c.optimizer.warmup_steps = 50
    c.data.train_sources.shapes = sections.source_config(DEMO_DATA, prefix="train")
    c.data.image_size = 64
    c.data.max_text_len = 24
    c.data.min_scale = 0.9
    c.data.hflip = False  # captions say "left of" / "right of": a flip would contradict them
    # The canonical caption ("left of" / "above"): the first object named is the left (top) one, so the
    # relation says which axis the scene lies along. With both phrasings the relation also depends on
    # which object the LLM chose to name first, which this tiny model does not learn in the budget
    # (held-out caption_exact 0.23 after 600 steps, against 0.47 with the canonical caption).
    c.data.caption_index = 0
    c.data.num_workers = 0
    c.data.read_threads = 2
    c.data.text_mode = "t5_prompt" if llm == "t5" else "opt"
    c.data.prompt = "a photo of" if llm == "t5" else "a photo of "
    # The random frozen ViT of the stage-1 demo: same seed and sizes give the same weights.
    c.seed = 42
    c.init.vision_checkpoint = ""
    c.init.stage1_checkpoint = DEMO_STAGE1
    # Greedy captions of the 100 held-out scenes after training (caption_exact, BLEU-4, CIDEr).
    c.eval.source = sections.source_config(DEMO_DATA, prefix="heldout")
    c.eval.batch_size = 50
    c.eval.max_new_tokens = 20  # a shapes caption is 13 tokens + "\n" (EOS)


def _demo_instruct(c: ml_collections.ConfigDict) -> None:
    """InstructBLIP on the shapes questions: `_demo`'s sizes, no stage 1 (the Q-Former, its text path
    included, starts fresh and learns from the questions alone), the VQA instruction records."""
    c.model.instruction_aware = True
    c.model.qformer_text.update(vocab_size=0, pad_token_id=0, max_position_embeddings=64)  # vocab: the data's
    c.init.stage1_checkpoint = ""
    c.data.train_sources.shapes = sections.source_config(DEMO_VQA_DATA, prefix="train")
    c.data.instruction_task = "vqa"
    c.data.qformer_tokenizer_path = f"{DEMO_VQA_DATA}/tokenizer"  # every word of the questions and templates
    c.data.caption_index = -1      # one question of the record per visit, drawn
    c.data.prompt = ""             # the drawn instruction is the prompt
    c.data.max_text_len = 32       # <s> + the longest template around a question (26 tokens) + answer "\n"
    c.data.max_instruction_len = 32  # [CLS] + that instruction (26 WordPieces) + [SEP]
    # 3000 steps: size questions leave the majority answer only after ~1500 (held-out, default seed:
    # 0.49 at step 500, 0.54 at 1000, 0.625 at 1500, 0.715 at 2000 and at 3000); colour sits at ~0.55 from
    # step 500 on and position at the majority throughout (README demo table).
    c.train.total_steps = 3000
    c.train.checkpoint_every = 1000
    c.eval.source = sections.source_config(DEMO_VQA_DATA, prefix="heldout")
    c.eval.max_new_tokens = 4      # a one-word answer and "\n" (EOS)


def _effnet(c: ml_collections.ConfigDict) -> None:
    """The demo with EfficientNet-Lite0 (ImageNet) as the frozen encoder, on all four shapes."""
    sections.use_efficientnet(c)
    # Train the caption's first token too: with LAVIS's count the prompt "a photo of " masks it, and
    # greedy captions then hang on whatever the text LM puts after "of" (one seed: caption_exact 0.38,
    # 57% of the captions the same).
    c.data.prompt_mask = "exact"
    data = sections.EFFNET_DEMO_DATA
    c.init.stage1_checkpoint = DEMO_EFFNET_STAGE1
    c.data.train_sources.shapes = sections.source_config(data, prefix="train")
    c.eval.source = sections.source_config(data, prefix="heldout")
