#!/usr/bin/env bash
# The README's main job: BLIP-2 end to end on 2 CPU cores with no downloads (about 7 minutes).
#
#   bash launch/demo.sh
#
# 1. installs the runtime requirements into .venv (launch/setup.sh);
# 2. generates the shapes demo data if missing (demo_data/shapes: 10k training scenes of two squares,
#    100 held-out);
# 3. stage 1 (configs/stage1.py:demo): Q-Former representation learning on a frozen random ViT;
#    held-out image-text retrieval at the end (t2i_r1, i2t_r1, ...);
# 4. text_lm (configs/text_lm.py:demo_opt): trains the tiny OPT the demo freezes as its LLM;
# 5. stage 2 (configs/stage2.py:demo_opt): the Q-Former's queries become a soft visual prompt for that
#    frozen OPT ("a photo of" prompt); greedy captions of the held-out images at the end
#    (caption_exact, top_caption_share, bleu_4, cider).
# Every stage writes workdirs/<name>/ (checkpoints, metrics.jsonl, tensorboard) and appends its log to
# workdirs/<name>.log; its progress lines (step, loss, steps/s, ETA, evaluations) and any warning or
# error also show on the terminal (stderr; absl's INFO lines only go to the log). A re-run resumes each
# stage from its latest checkpoint; a finished stage trains nothing and only re-evaluates. The last
# line printed on stdout is stage 2's final metrics, one JSON object; the line before it is stage 1's.
set -euo pipefail
# Ctrl-C or SIGTERM: the running stage checkpoints and stops (the train loop handles both); then the
# script stops too, instead of starting the next stage. A re-run resumes.
trap 'echo "interrupted; bash launch/demo.sh resumes from the last checkpoints" >&2; exit 130' INT TERM
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
PY=.venv/bin/python
DATA=demo_data/shapes
mkdir -p workdirs

# Squares only: colour, size and position are what the demo's random frozen ViT lets the Q-Former read
# in minutes (blip2_jax/data/shapes.py says why). Regenerated only when the arguments changed.
"$PY" -m blip2_jax.data.shapes --out "$DATA" --num_heldout 100 --shapes square --if_changed

# show_progress LOG: appends stdin to LOG and copies it to stderr, less absl's INFO lines ("I1201 ...").
# Ctrl-C and SIGTERM are ignored here so that the stage, which checkpoints before it stops on either,
# can still write its last lines; the copy ends when the stage closes its stderr.
show_progress() {
  trap '' INT TERM
  tee -a "$1" | { grep --line-buffered -Ev '^I[0-9]{4} ' >&2 || true; }
}

# run_stage NAME CONFIG: trains one stage into workdirs/NAME; its final JSON line goes to workdirs/NAME.json.
run_stage() {
  local name=$1 config=$2 start
  start=$(date +%s)
  echo "== $name: python -m blip2_jax.main --config=$config --workdir=workdirs/$name (log: workdirs/$name.log)"
  echo "== $(date '+%F %T') python -m blip2_jax.main --config=$config --workdir=workdirs/$name" >>"workdirs/$name.log"
  # stdout (the final JSON line) to workdirs/NAME.out; stderr (progress) to the log and the terminal.
  if ! "$PY" -m blip2_jax.main --config="$config" --workdir="workdirs/$name" \
      2>&1 >"workdirs/$name.out" | (show_progress "workdirs/$name.log"); then
    echo "$name failed (its log: workdirs/$name.log)" >&2
    exit 1
  fi
  tail -n 1 "workdirs/$name.out" >"workdirs/$name.json"
  echo "== $name done in $(( $(date +%s) - start )) s"
}

run_stage demo_stage1 configs/stage1.py:demo
run_stage demo_text_lm_opt configs/text_lm.py:demo_opt
run_stage demo_stage2_opt configs/stage2.py:demo_opt

echo "stage 1 (held-out retrieval) and stage 2 (held-out greedy captions), final metrics:"
cat workdirs/demo_stage1.json
cat workdirs/demo_stage2_opt.json
