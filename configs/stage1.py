"""Stage 1 (representation learning, frozen image encoder): ITC + ITM + ITG over one Q-Former.

`python -m blip2_jax.main --config=configs/stage1.py[:variant] --workdir=DIR [--config.x=y ...]`

Variants:
  vit_g  (default) the paper: EVA ViT-g/14 (39 blocks, frozen, bf16), BERT-base Q-Former with 32
         queries and cross-attention every 2 layers, batch 1680, 250k steps, 224 px, AdamW
         (0.9, 0.98), wd 0.05, peak LR 1e-4 -> 1e-5 cosine after 2k warmup steps.
  vit_l  the same with CLIP ViT-L/14 (23 of 24 blocks, quick-GELU, ln_pre), batch 2320.
  vit_g_coco_ft  LAVIS retrieval_coco_ft: the pretrained model fine-tuned on COCO with the ViT unfrozen,
         364 px, ITC soft targets over same-image pairs, LR 1e-5 -> 0 (no layer-wise LR decay).
  demo   a tiny model on the bundled shapes data that trains on 2 CPU cores in minutes; its frozen
         ViT is randomly initialised (random frozen patch features carry colour and position).
  vit_g_v5p32, vit_l_v5p32, vit_g_coco_ft_v5p32  the paper variants with the settings planned for a v5p-32
         slice (`PLANNED`; docs/pod_planning.md).
The paper-scale variants scan each tower's layers (`model.scan_layers=True`); the demo unrolls them.
Every field is documented where it is defined: blip2_jax/config_sections.py.
"""
import ml_collections

from blip2_jax import config_sections as sections

DEMO_DATA = "demo_data/shapes"  # written by `python -m blip2_jax.data.shapes --out demo_data/shapes`


# Paper variants planned for a TPU slice by `python -m blip2_jax.plan` (docs/pod_planning.md has each
# plan's per-chip memory, compile time and command): variant -> (paper variant, settings).
# v5p-32 (16 chips of 95 GiB, --topology=v5p:2x2x4): FSDP over the 16 chips, the paper's global batch
# split 16 ways (1680, 2320 and 112 are multiples of 16, not of 32: a v5p-64 would need mesh.tensor=2).
V5P_32 = {"mesh.data": 1, "mesh.fsdp": 16, "mesh.tensor": 1}
PLANNED = {
    "vit_g_v5p32": ("vit_g", V5P_32),
    "vit_l_v5p32": ("vit_l", V5P_32),
    "vit_g_coco_ft_v5p32": ("vit_g_coco_ft", V5P_32),
}


def get_config(arg: str = "vit_g") -> ml_collections.ConfigDict:
    if arg in PLANNED:
        variant, settings = PLANNED[arg]
        c = get_config(variant)
        c.update_from_flattened_dict(settings)
        return c
    arg = arg or "vit_g"
    if arg not in ("vit_g", "vit_l", "vit_g_coco_ft", "demo", "demo_effnet"):
        raise ValueError(f"configs/stage1.py: unknown variant {arg!r} (vit_g, vit_l, vit_g_coco_ft, demo, demo_effnet)")
    c = sections.experiment_config("stage1")
    c.seed = 42
    c.model = sections.stage1_model()
    c.loss = sections.stage1_loss()
    c.init = sections.stage1_init()
    c.eval = sections.stage1_eval()
    c.data.text_mode = "stage1"
    c.data.max_text_len = 32

    c.optimizer.peak_lr = 1e-4
    c.optimizer.min_lr = 1e-5
    c.optimizer.warmup_steps = 2000
    c.train.total_steps = 250_000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.eval_every = 10_000
    c.eval.k_test = 128
    c.data.image_size = 224
    c.data.tokenizer_path = "checkpoints/bert-base-uncased"
    c.data.num_workers = 16
    c.init.qformer_checkpoint = "checkpoints/bert-base-uncased"
    c.mesh.data = -1
    c.model.scan_layers = True  # paper scale: one compiled block per tower (the demo stays unrolled)

    if arg == "vit_g":
        c.train.batch_size = 1680
        c.init.vision_checkpoint = "checkpoints/blip2-itm-vit-g"
        c.mesh.fsdp = 1
    elif arg == "vit_g_coco_ft":
        _retrieval_finetune(c)
    elif arg == "vit_l":
        c.train.batch_size = 2320
        c.model.vision.update(style="clip", hidden_size=1024, intermediate_size=4096, num_layers=23,
                              num_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu")
        c.init.vision_checkpoint = "checkpoints/clip-vit-large-patch14"
    else:
        _demo(c)
        if arg == "demo_effnet":
            _effnet(c)
    return c


def _retrieval_finetune(c: ml_collections.ConfigDict) -> None:
    """LAVIS retrieval_coco_ft.yaml: the pretrained stage-1 model fine-tuned on COCO with the ViT
    unfrozen (float32, gradient checkpointing), same-image pairs as ITC soft targets and excluded from
    ITM negatives, 364 px, LR 1e-5 -> 0 after 1k warmup, 5 epochs.

    Layer-wise LR decay: the yaml says `lr_layer_decay: 0.95`, and `get_optimizer_params` puts a
    per-block `lr_scale` in each param group, but no LAVIS scheduler reads `lr_scale` (each sets every
    group's lr), so LAVIS trains every ViT block at the same LR. This variant does what LAVIS does
    (`optimizer.vit_layer_decay = 1.0`); `--config.optimizer.vit_layer_decay=0.95` gives the decay the
    yaml intends (block i of 39 at lr * 0.95**(39 - i))."""
    c.init.stage1_checkpoint = "checkpoints/blip2-itm-vit-g"  # HF Blip2ForImageTextRetrieval dir
    c.init.vision_checkpoint = "checkpoints/blip2-itm-vit-g"
    c.init.qformer_checkpoint = ""
    c.model.train_vision = True
    c.optimizer.vit_layer_decay = 1.0  # what LAVIS applies (see the docstring); 0.95 = the yaml's intent
    c.model.vision.remat = True
    c.data.image_size = 364  # the 224-px position embeddings are interpolated in the forward pass
    c.data.train_sources = ml_collections.ConfigDict()
    c.data.train_sources.coco = sections.source_config("data/coco", prefix="coco_karpathy_train")
    c.loss.itc_image_id_targets = True
    c.loss.itm_exclude_same_image = True
    c.optimizer.peak_lr = 1e-5
    c.optimizer.min_lr = 0.0
    c.optimizer.warmup_lr = 1e-8
    c.optimizer.warmup_steps = 1000
    # LAVIS: batch 14 per GPU (GPU count not in the config; 8 here: global 112), 5 epochs over the
    # 566,747 Karpathy-train caption pairs.
    c.train.batch_size = 112
    c.train.total_steps = 5 * 566_747 // 112
    c.train.checkpoint_every = 2000
    c.eval.source = sections.source_config("data/coco", prefix="coco_karpathy_val")
    c.eval.k_test = 128
    c.mesh.fsdp = 1


def _demo(c: ml_collections.ConfigDict) -> None:
    """Tiny and fast: trains and evaluates in a few minutes on 2 CPU cores."""
    # Random frozen ViT: position embeddings drawn at std 1 so the patch features carry where they are
    # (at HF's 0.02 they vanish under the content; held-out t2i R@1 0.585 -> 0.67 at the same cost).
    c.model.vision.update(hidden_size=96, intermediate_size=192, num_layers=2, num_heads=4, image_size=64,
                          patch_size=8, position_init_std=1.0)
    c.model.qformer.update(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256,
                           max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
    c.model.num_query_tokens = 8
    c.model.embed_dim = 64
    c.model.frozen_dtype = "float32"
    c.train.batch_size = 48
    c.train.total_steps = 400
    c.train.log_every = 50
    c.train.checkpoint_every = 100
    c.train.eval_every = 0
    c.optimizer.peak_lr = 1e-3
    c.optimizer.min_lr = 1e-4
    c.optimizer.warmup_lr = 1e-5
    c.optimizer.warmup_steps = 50
    c.data.train_sources.shapes = sections.source_config(DEMO_DATA, prefix="train")
    c.data.image_size = 64
    c.data.max_text_len = 16
    c.data.min_scale = 0.9
    c.data.hflip = False  # captions say "left of" / "right of": a flip would contradict them
    c.data.tokenizer_path = DEMO_DATA + "/tokenizer"
    c.data.num_workers = 0
    c.data.read_threads = 2
    c.eval.source = sections.source_config(DEMO_DATA, prefix="heldout")
    c.eval.k_test = 0
    c.eval.batch_size = 50
    c.init.vision_checkpoint = ""
    c.init.qformer_checkpoint = ""
    c.model.scan_layers = False



def _effnet(c: ml_collections.ConfigDict) -> None:
    """The demo with a pretrained frozen encoder: EfficientNet-Lite0 (ImageNet) instead of the random
    ViT, on scenes of all four shapes (what launch/demo.sh runs)."""
    sections.use_efficientnet(c)
    data = sections.EFFNET_DEMO_DATA
    c.data.train_sources.shapes = sections.source_config(data, prefix="train")
    c.data.tokenizer_path = data + "/tokenizer"
    c.eval.source = sections.source_config(data, prefix="heldout")
