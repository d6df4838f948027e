#!/usr/bin/env bash
# Issue 17: the demo model trained on its own streams (tools/train_demo.py stage 3), two variants at once on
# the one GPU (the model is tiny: one run leaves the H200 idle between its small kernels), each with its own
# wall-clock limit (--max-seconds) so that it ends, saves and logs in time. About 8.5 minutes in all (LIMIT
# 480 s of training each, in parallel, plus set-up and copies); from the repo root:
#
#   bash bench/gpu/train_demo.sh        # OUT=<folder that comes back>, set on the device machine
#
# Both start from the shipped weights (graphs/demo_weights.safetensors) and fit their own encoder to its
# frozen decoder first (25 s). Variant a: flow matching on the model's own streams (the expert's next block
# noised afresh, the pool's cache as context). Variant b: half of that, half Self-Forcing steps of the
# model's own chain against the expert aligned to where the model drew the shape, plus a pixel loss through
# the decoder and a position loss. (Why: bench/RESULTS.md, issue 17.)
#
# Back in $OUT (7 files): per variant <v>_final.safetensors (EMA weights at the end), <v>_best.safetensors
# (the EMA weights the stream probe scored best), <v>_logs.tgz (train.log, train_log.json, loss.png); and
# summary.txt. Knobs for a CPU dry run: DEVICE=cpu LIMIT=150 BATCH=4 EXTRA="--rollout-tf-batch 2 ...".
bash bench/device_setup.sh; export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4  # two processes on 16 cores
: "${OUT:?set OUT to the folder that comes back}"
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-480}  # seconds each training may run (its --max-seconds; the encoder fit is inside it)
BATCH=${BATCH:-512}  # sessions in each variant's streaming pool
EXTRA=${EXTRA:-}
W=$(mktemp -d /tmp/train17.XXXX)
mkdir -p "$W/a" "$W/b" "$OUT"
t0=$(date +%s)

COMMON=(--device "$DEVICE" --no-eval --max-seconds "$LIMIT" --enc-seconds 25
        --init-from graphs/demo_weights.safetensors --rollout-batch "$BATCH" --rollout-lr 1e-4
        --rollout-switch 0.05 --probe-every 60 --probe-seconds 30)
A=(--rollout-renoise 1.0)
B=(--rollout-renoise 0.5 --rollout-pixel 4 --rollout-pos 0.1 --rollout-align-px 1.5
   --rollout-step-probs 0.1,0.2,0.3,0.4)

run() {  # variant, its own args...
  local v=$1; shift
  # shellcheck disable=SC2086  # EXTRA is a list of words
  timeout $((LIMIT + 30)) python3 tools/train_demo.py --out "$W/$v" "${COMMON[@]}" "$@" $EXTRA > "$W/$v/train.log" 2>&1
  echo "variant $v: exit $? after $(( $(date +%s) - t0 )) s" >> "$W/status"
}
run a "${A[@]}" &
run b "${B[@]}" &
wait

for v in a b; do
  [ -f "$W/$v/demo_weights.safetensors" ] && cp "$W/$v/demo_weights.safetensors" "$OUT/${v}_final.safetensors"
  [ -f "$W/$v/demo_weights_best.safetensors" ] && cp "$W/$v/demo_weights_best.safetensors" "$OUT/${v}_best.safetensors"
  (cd "$W/$v" && tar czf "$OUT/${v}_logs.tgz" $(ls train.log train_log.json loss.png 2>/dev/null))
done

{
  echo "wall $(( $(date +%s) - t0 )) s after set-up; commit $(git rev-parse --short HEAD 2>/dev/null)"
  cat "$W/status" 2>/dev/null
  for v in a b; do
    echo "== variant $v"
    grep -E "encoder fitted|rollouts:|probe at|stopping|wrote|Error|error|Traceback" "$W/$v/train.log" | tail -n 25
    grep -E "rollout step" "$W/$v/train.log" | tail -n 3
  done
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
ls -la "$OUT"
