#!/usr/bin/env bash
# InstructBLIP instruction tuning end to end on 2 CPU cores with no downloads: questions about the shapes
# scenes, a tiny LLaMA trained here as the frozen LLM, held-out answer accuracy against the majority answer.
#
#   bash launch/demo_instruct.sh              # the configs' seeds, in workdirs/
#   DEMO_SEED=1 bash launch/demo_instruct.sh  # every stage with --config.seed=1, in workdirs/seed1/ (the
#                                             # README's ranges: the default run and DEMO_SEED=1, 2)
#
# 1. installs the runtime requirements into .venv (launch/setup.sh);
# 2. generates the questions if missing (demo_data/shapes_vqa: 10k training scenes of two squares, 100
#    held-out scenes, six questions each about the colour, size and position of either square, e.g. "what
#    colour is the left square?" -> "red"; python -m blip2_jax.data.shapes_vqa);
# 3. text_lm (configs/text_lm.py:demo_instruct_llama): trains the tiny LLaMA the demo freezes, on the text
#    of instruction tuning without the image (InstructBLIP's VQA templates around the questions);
# 4. instruction tuning (configs/stage2.py:demo_instruct): the instruction-aware Q-Former learns, from
#    scratch, to read the image the question asks about for that frozen LLaMA (random frozen ViT); greedy
#    answers to the 600 held-out questions at the end: vqa_acc against majority_baseline, overall and per
#    question type.
# Every stage writes $WORK/<name>/ and appends its log to $WORK/<name>.log; progress lines show on the
# terminal as in launch/demo.sh. A re-run resumes each stage from its latest checkpoint. The last line
# printed on stdout is the instruction-tuning stage's final JSON (vqa_acc, majority_baseline, ...).
set -euo pipefail
trap 'echo "interrupted; bash launch/demo_instruct.sh resumes from the last checkpoints" >&2; exit 130' INT TERM
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
PY=.venv/bin/python
DATA=demo_data/shapes_vqa
SEED=${DEMO_SEED:-}
WORK=workdirs
[ -z "$SEED" ] || WORK=workdirs/seed$SEED
mkdir -p "$WORK"

# Squares only: the random frozen ViT reads colour, size and position, not shape (blip2_jax/data/shapes.py).
"$PY" -m blip2_jax.data.shapes_vqa --out "$DATA" --shapes square --if_changed

# show_progress and run_stage NAME CONFIG [FLAGS...], as launch/demo.sh.
source launch/stages.sh  # (the script runs from the repository root)

run_stage demo_instruct_text_lm_llama configs/text_lm.py:demo_instruct_llama
run_stage demo_instruct configs/stage2.py:demo_instruct \
  --config.init.llm_checkpoint="$WORK/demo_instruct_text_lm_llama/hf" \
  --config.data.tokenizer_path="$WORK/demo_instruct_text_lm_llama/hf"

echo "instruction tuning (held-out answer accuracy against the majority answer):"
cat "$WORK/demo_instruct.json"
