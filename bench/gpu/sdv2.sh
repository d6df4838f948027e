#!/usr/bin/env bash
# Issue 14 on the GPU machine, one call, at most 5 minutes wall: graphs/streamdiffusion_v2.yaml at full size
# (480x832, UMT5-XXL, Wan2.1-1.3B causal DiT, 12 camera frames a block) with random weights, cudagraph (compile if
# capture fails): frames/s and camera frame -> output latency (p50/p95) from synthetic frames fed into the video
# slot (bench/bench_v2v.py), with the TAEHV encoder, then with the Wan2.1 VAE encoder in the time left.
# Writes under $OUT: sdv2_taehv_h200.json/.log, sdv2_wan_vae_h200.json/.log, summary.txt, commit.txt.
bash bench/device_setup.sh; export PYTHONPATH=/tmp/site
START=$(date +%s)
BUDGET=${SDV2_BUDGET:-270}   # seconds for both runs after the setup (the setup is seconds: carried wheels)
EXTRA=${SDV2_EXTRA:-}        # for a CPU rehearsal only, e.g. "--tiny --device cpu --modes eager"
mkdir -p "$OUT"
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
run() {  # encoder, seconds
  timeout -k 5 "$2" python3 bench/bench_v2v.py "$OUT/sdv2_$1_h200.json" --encoder "$1" --deadline $(( $2 - 8 )) \
    $EXTRA 2>&1 | tee "$OUT/sdv2_$1_h200.log" | grep -v "^\s*$" | tail -n 4
  echo "--- $1: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START )) s"
}
T=$(( $(left) < 135 ? $(left) : 135 ))
run taehv "$T"
T=$(( $(left) - 3 ))
if [ "$T" -gt 40 ]; then run wan_vae "$T"; else echo "--- wan_vae: skipped, ${T} s left"; fi
timeout 20 python3 bench/bench_v2v.py --summary "$OUT"/sdv2_*_h200.json | tee "$OUT/summary.txt"
echo "total $(( $(date +%s) - START )) s after the setup"
