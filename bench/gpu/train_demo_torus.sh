#!/usr/bin/env bash
# Issue 17, run 5: the demo trained from scratch with torus positions (`positions: torus` on the denoiser, a
# circular-padded decoder and encoder), the shape weighted in the loss and half the switches shape-only. Why: run
# 4a's samples break where a shape crosses the frame's edge, and the learnt position embedding is the cause
# (bench/RESULTS.md, issue 17). Two variants at once on the one GPU, each ending itself in time (--max-seconds):
#   a: autoencoder, then teacher forcing (shape weight 8, shape-only switches 0.5), no rollout stage
#   b: the same, and the model's own pictures as context more often (--self-context 0.8)
#
#   OUT=<folder that comes back> bash bench/gpu/train_demo_torus.sh     # LIMIT=seconds each (default 520)
#
# Back in $OUT: <v>_final.safetensors, <v>_logs.tgz (train.log, train_log.json, loss.png, autoencoder.pt),
# summary.txt, and the graph the weights go with (demo_torus.yaml).
bash bench/device_setup.sh; export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
: "${OUT:?set OUT to the folder that comes back}"
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-520}
EXTRA=${EXTRA:-}
W=$(mktemp -d /tmp/train17torus.XXXX)
mkdir -p "$W/a" "$W/b" "$OUT"
GRAPH=${GRAPH:-graphs/demo_torus.yaml}
python3 tools/demo_torus_graph.py graphs/demo.yaml "$GRAPH" || exit 1
cp "$GRAPH" "$OUT/demo_torus.yaml"
t0=$(date +%s)
COMMON=(--graph "$GRAPH" --device "$DEVICE" --no-eval --minutes "$(python3 -c "print($LIMIT / 60)")"
        --max-seconds "$LIMIT" --rollout-share 0 --shape-weight 8 --shape-switch 0.5)
run() {
  local v=$1; shift
  # shellcheck disable=SC2086
  timeout $((LIMIT + 40)) python3 tools/train_demo.py --out "$W/$v" "${COMMON[@]}" "$@" $EXTRA > "$W/$v/train.log" 2>&1
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
    grep -E "autoencoder|denoiser step|ms/step|probe|stopping|wrote|Error|error|Traceback" "$W/$v/train.log" | tail -n 14
  done
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
