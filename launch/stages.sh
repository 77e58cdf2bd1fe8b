# The demos' stage runner (sourced by launch/demo.sh and launch/demo_instruct.sh; they set PY, WORK and
# SEED first).

# show_progress LOG: appends stdin to LOG and copies it to stderr, less absl's INFO lines ("I1201 ...").
# Ctrl-C and SIGTERM are ignored here so that the stage, which checkpoints before it stops on either,
# can still write its last lines; the copy ends when the stage closes its stderr.
show_progress() {
  trap '' INT TERM
  tee -a "$1" | { grep --line-buffered -Ev '^I[0-9]{4} ' >&2 || true; }
}

# run_stage NAME CONFIG [FLAGS...]: trains one stage into $WORK/NAME; its final JSON line goes to $WORK/NAME.json.
run_stage() {
  local name=$1 config=$2 start
  shift 2
  [ -z "$SEED" ] || set -- --config.seed="$SEED" "$@"
  start=$(date +%s)
  echo "== $name: python -m blip2_jax.main --config=$config --workdir=$WORK/$name $* (log: $WORK/$name.log)"
  echo "== $(date '+%F %T') python -m blip2_jax.main --config=$config --workdir=$WORK/$name $*" >>"$WORK/$name.log"
  # stdout (the final JSON line) to $WORK/NAME.out; stderr (progress) to the log and the terminal.
  if ! "$PY" -m blip2_jax.main --config="$config" --workdir="$WORK/$name" "$@" \
      2>&1 >"$WORK/$name.out" | (show_progress "$WORK/$name.log"); then
    echo "$name failed (its log: $WORK/$name.log)" >&2
    exit 1
  fi
  tail -n 1 "$WORK/$name.out" >"$WORK/$name.json"
  echo "== $name done in $(( $(date +%s) - start )) s"
}
