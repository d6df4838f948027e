#!/usr/bin/env bash
# Issue 17: the demo model trained on its own streams (tools/train_demo.py stage 3), two variants at once on
# the one GPU (the model is tiny: one run leaves most of the H200 idle between its kernels), each with its
# own wall-clock limit so that it ends, saves and logs in time. About 8.5 minutes in all; from the repo root:
#
#   bash bench/gpu/train_demo.sh        # OUT=<folder> set by the device tool
#
# Back in $OUT (8 files): per variant <v>_final.safetensors (EMA weights at the end), <v>_best.safetensors
# (the EMA weights the stream probe scored best), <v>_logs.tgz (train.log, train_log.json, loss.png), and
# summary.txt. Variant a starts from the shipped weights, b from the second run's (both share the decoder).
bash bench/device_setup.sh; export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the folder that comes back}"
LIMIT=${LIMIT:-440}  # seconds each training may run (its --max-seconds), the encoder fit included
W=/tmp/train17
mkdir -p "$W/a" "$W/b" "$OUT"
t0=$(date +%s)

# What both variants share: the loss that keeps shapes sharp (bench/RESULTS.md, issue 17, third run).
COMMON=(--device cuda --no-eval --max-seconds "$LIMIT" --enc-seconds 25 --rollout-batch 512
        --rollout-latent 1.0 --rollout-pixel 4.0 --rollout-pos 0.05 --rollout-align-px 1.5
        --rollout-step-probs 0.1,0.2,0.3,0.4 --rollout-switch 0.05 --probe-every 45 --probe-seconds 30)

run() {  # variant, weights to start from, extra args
  local v=$1 init=$2; shift 2
  timeout $((LIMIT + 40)) python3 tools/train_demo.py --out "$W/$v" --init-from "$init" "${COMMON[@]}" "$@" \
    > "$W/$v/train.log" 2>&1
  echo "variant $v exit $?" >> "$W/status"
}
run a graphs/demo_weights.safetensors &
run b bench/results/demo_weights_rollout_run2.safetensors &
wait

for v in a b; do
  [ -f "$W/$v/demo_weights.safetensors" ] && cp "$W/$v/demo_weights.safetensors" "$OUT/${v}_final.safetensors"
  [ -f "$W/$v/demo_weights_best.safetensors" ] && cp "$W/$v/demo_weights_best.safetensors" "$OUT/${v}_best.safetensors"
  tar czf "$OUT/${v}_logs.tgz" -C "$W/$v" $(cd "$W/$v" && ls train.log train_log.json loss.png 2>/dev/null)
done

{
  echo "wall $(( $(date +%s) - t0 )) s after setup; git $(git rev-parse --short HEAD 2>/dev/null)"
  cat "$W/status" 2>/dev/null
  for v in a b; do
    echo "== variant $v"
    grep -E "encoder fitted|rollouts:|probe at|stopping|wrote|Error|error" "$W/$v/train.log" | tail -n 25
  done
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
ls -la "$OUT"
