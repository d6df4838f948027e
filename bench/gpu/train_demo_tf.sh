#!/usr/bin/env bash
# Issue 17, run 4: more teacher forcing from the shipped weights, with the shape weighted in the loss and
# shape-only prompt switches (tools/train_demo.py --tf-continue --shape-weight --shape-switch; why: bench/RESULTS.md,
# issue 17, "fourth run"). Two variants at once on the one GPU, each ending itself in time (--max-seconds):
#   a: shape weight 8, half the switches shape-only
#   b: the same, and the model's own pictures as context more often (--self-context 0.8)
#
#   bash bench/gpu/train_demo_tf.sh        # OUT=<folder that comes back>; LIMIT=seconds each (default 400)
#
# Back in $OUT: <v>_final.safetensors, <v>_logs.tgz (train.log, train_log.json, loss.png), summary.txt.
bash bench/device_setup.sh; export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
: "${OUT:?set OUT to the folder that comes back}"
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-400}
EXTRA=${EXTRA:-}
W=$(mktemp -d /tmp/train17tf.XXXX)
mkdir -p "$W/a" "$W/b" "$OUT"
t0=$(date +%s)
COMMON=(--device "$DEVICE" --no-eval --max-seconds "$LIMIT" --enc-seconds 40 --init-from graphs/demo_weights.safetensors
        --tf-continue --lr 2e-4 --shape-weight 8 --shape-switch 0.5)
run() {
  local v=$1; shift
  # shellcheck disable=SC2086
  timeout $((LIMIT + 30)) python3 tools/train_demo.py --out "$W/$v" "${COMMON[@]}" "$@" $EXTRA > "$W/$v/train.log" 2>&1
  echo "variant $v: exit $? after $(( $(date +%s) - t0 )) s" >> "$W/status"
}
run a &
run b --self-context 0.8 &
wait
for v in a b; do
  [ -f "$W/$v/demo_weights.safetensors" ] && cp "$W/$v/demo_weights.safetensors" "$OUT/${v}_final.safetensors"
  (cd "$W/$v" && tar czf "$OUT/${v}_logs.tgz" $(ls train.log train_log.json loss.png autoencoder.pt 2>/dev/null))
done
{
  echo "wall $(( $(date +%s) - t0 )) s"
  cat "$W/status" 2>/dev/null
  for v in a b; do
    echo "== variant $v"
    grep -E "encoder fitted|denoiser step|ms/step|stopping|wrote|Error|error|Traceback" "$W/$v/train.log" | tail -n 12
  done
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
