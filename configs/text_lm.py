"""Text-only LM pretraining of the demo's tiny LLM on the shapes captions (no image).

`python -m blip2_jax.main --config=configs/text_lm.py:demo_opt --workdir=workdirs/demo_text_lm_opt`

Variants:
  demo_opt  a 2-layer OPT (d=128) on `</s> a photo of caption "\\n"` (causal LM, EOS "\\n", the prompt
            out of the loss), half of the sequences with a context in front (`context_prob`),
            400 steps, batch 64;
  demo_opt_effnet  demo_opt on the scenes of all four shapes (`demo_data/shapes4`): the LLM of the
            EfficientNet demo (configs/stage2.py:demo_opt_effnet).
  demo_t5   a 2+2-layer T5 (d=128, gated GELU, untied head) on "a photo of" -> caption (the stage-2
            demo's captioning form), 400 steps, batch 64.
  demo_instruct_llama  a 2-layer LLaMA (d=128, 4 heads / 2 K/V heads, RoPE) on the text of VQA instruction
            tuning (`demo_data/shapes_vqa`, `python -m blip2_jax.data.shapes_vqa`): `<s> instruction
            answer "\\n"`, an InstructBLIP VQA template around each question, the answer's words as the
            context half of the time; the frozen LLM of configs/stage2.py:demo_instruct.
At the end the LM and its tokenizer are written to `<workdir>/hf` (a Hugging Face directory), which
`configs/stage2.py:demo_opt` / `demo_t5` load as `init.llm_checkpoint` and `data.tokenizer_path`.
The tokenizer (byte-level BPE trained on the training captions) is built on first use at
`data.tokenizer_path`. Fields: blip2_jax/config_sections.py.
"""
import ml_collections

from blip2_jax import config_sections as sections

DEMO_DATA = "demo_data/shapes"  # written by `python -m blip2_jax.data.shapes --out demo_data/shapes`
# The InstructBLIP demo's questions: `python -m blip2_jax.data.shapes_vqa --out demo_data/shapes_vqa --shapes square`
VQA_DEMO_DATA = "demo_data/shapes_vqa"
VARIANTS = ("demo_opt", "demo_t5", "demo_opt_effnet", "demo_instruct_llama")
WORKDIRS = {"opt": "workdirs/demo_text_lm_opt", "t5": "workdirs/demo_text_lm_t5"}
# The stage-2 demos' captioning prompts (OPT: a prefix, with LAVIS's trailing space; T5: encoder text).
PROMPTS = {"opt": "a photo of ", "t5": "a photo of"}


def get_config(arg: str = "demo_opt") -> ml_collections.ConfigDict:
    arg = arg or "demo_opt"
    if arg not in VARIANTS:
        raise ValueError(f"configs/text_lm.py: unknown variant {arg!r} ({', '.join(VARIANTS)})")
    llm = arg.split("_")[-1] if arg.startswith("demo_instruct") else arg.split("_")[1]
    data = {"demo_opt_effnet": sections.EFFNET_DEMO_DATA, "demo_instruct_llama": VQA_DEMO_DATA}.get(arg, DEMO_DATA)
    c = sections.experiment_config("text_lm")
    c.seed = 7
    c.model = sections.text_lm_model(llm)
    c.build_tokenizer = True      # train a byte-level BPE on the training captions if data.tokenizer_path is missing
    c.tokenizer_vocab_size = 384  # its vocabulary size (256 bytes + specials + merges)
    c.export_dir = ""             # where the final HF directory goes; "" = <workdir>/hf
    c.eval_source = sections.source_config(data, prefix="heldout")  # held-out LM loss ("" path: none)
    c.eval_max_captions = 256     # held-out captions in that one evaluation batch
    # Fraction of training sequences that carry the caption's content words as context in front (where
    # stage 2 puts the visual prompt), so the frozen LM learns to follow what precedes its text
    # (blip2_jax/train/text_lm.py `WithContext`); 0 = captions alone.
    c.context_prob = 0.5
    c.context_drop_words = "a an the of"  # words left out of that context (space-separated)

    c.data.train_sources.shapes = sections.source_config(data, prefix="train")
    c.data.text_mode = "t5_prompt" if llm == "t5" else "opt"
    c.data.prompt = PROMPTS.get(llm, "")
    c.data.max_text_len = 24  # room for the context: 7 words "\n" + </s> prompt caption "\n" (23 tokens)
    c.data.tokenizer_path = f"{data}/tokenizer_{llm}"
    c.data.caption_index = 0  # the canonical caption, as the stage-2 demo (configs/stage2.py)

    c.train.batch_size = 64
    c.train.total_steps = 400
    c.train.log_every = 50
    c.train.checkpoint_every = 0
    c.train.eval_every = 0
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.peak_lr = 2e-3
    c.optimizer.warmup_lr = 1e-5
    c.optimizer.min_lr = 1e-4
    c.optimizer.warmup_steps = 40
    c.optimizer.weight_decay = 0.01
    c.mesh.data = -1
    if arg == "demo_instruct_llama":
        _instruct(c, data)
    return c


def _instruct(c: ml_collections.ConfigDict, data: str) -> None:
    """The text of VQA instruction tuning without the image (train/text_lm.py): every question of the
    instruction records in a drawn VQA template, the answer as the target."""
    c.data.instruction_task = "vqa"
    c.data.qformer_tokenizer_path = f"{data}/tokenizer"  # the instruction encoder's (unused by the LM itself)
    c.data.caption_index = -1       # every question of a record, not one
    c.data.max_text_len = 32        # the answer's context "\n" + <s> + the longest template with a question + answer "\n"
    c.tokenizer_vocab_size = 512    # the templates' words get their merges
    c.context_drop_words = ""       # the context is the answer itself
    c.train.total_steps = 400
