#!/usr/bin/env bash
# Issue 22 on one H200, one call, at most ~4 min wall: the OFFICIAL Self-Forcing DiT next to ours, same weights and
# inputs (bench/bench_official.py). Needs the official source carried at .official/Self-Forcing (python files of a
# guandeh17/Self-Forcing checkout; git-ignored, never committed).
#   1. tests/models/test_wan_dit_eager.py on CUDA (the eager fast paths bitwise against the plain forms)   <= 40 s
#   2. one process, JSON written after each step (a timeout loses only what is left)                       rest
#      agreement (bf16, and float32 copies of both: --fp32-check); one profiled eager block per side (GPU time by kernel category, top kernels); then
#      official_eager, ours_eager, ours_cudagraph (regional compile + CUDA graph), official_compile, ours_graph,
#      ours_rolling (our endless stream's rolling phase, captured: no official counterpart)
# Env: ATTN=sdpa|fa3 (both sides' attention kernel, default sdpa), COMPILE_MODE (official_compile's torch.compile
# mode, default "default"; their demo uses max-autotune-no-cudagraphs, which autotunes for minutes).
T0=$(date +%s)  # the wall budget includes the set-up
bash bench/device_setup.sh; export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
el() { echo "$(( $(date +%s) - T0 ))"; }
SRC=.official/Self-Forcing
ATTN=${ATTN:-sdpa}
if [ ! -f "$SRC/wan/modules/causal_model.py" ]; then echo "no official source at $SRC: carry .official"; exit 2; fi

echo "[$(el)s] tests"
timeout 40 python3 -m pytest tests/models/test_wan_dit_eager.py -q -p no:cacheprovider -rs > "$OUT/tests.log" 2>&1
echo "tests rc $?" >> "$OUT/tests.log"; tail -2 "$OUT/tests.log"

LEFT=$(( 225 - $(el) ))
echo "[$(el)s] bench ($ATTN), ${LEFT}s left"
timeout "$LEFT" python3 bench/bench_official.py "$OUT/official_$ATTN.json" --official-src "$SRC" --attention "$ATTN" \
  --modes official_eager,ours_eager,ours_cudagraph,official_compile,ours_graph,ours_rolling --blocks 5 --warmup 2 \
  --compile-mode "${COMPILE_MODE:-default}" --profile --fp32-check > "$OUT/official_$ATTN.log" 2>&1
echo "bench rc $?" >> "$OUT/official_$ATTN.log"

echo "===== summary ($(el)s wall)"
grep -E "FAILED|agreement|fp32 check|profile |: [0-9.]+ ms a block|bench rc" "$OUT/official_$ATTN.log" | cut -c1-260
python3 - "$OUT/official_$ATTN.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ms = {m: v["ms_p50"] for m, v in r["modes"].items()}
print("per block ms p50:", {m: round(v, 1) for m, v in ms.items()})
for a, b in (("official_eager", "ours_eager"), ("official_eager", "ours_cudagraph"),
             ("official_compile", "ours_cudagraph"), ("ours_eager", "ours_cudagraph")):
    if a in ms and b in ms:
        print(f"{a}/{b} = {ms[a] / ms[b]:.3f}")
print("agreement:", {k: round(v, 5) for k, v in r.get("agreement", {}).items()})
for side, p in r.get("profile", {}).items():
    print(f"profile {side}: wall {p['wall_ms']:.1f} ms, kernels {p['gpu_kernel_ms']:.1f} ms, {p['kernel_launches']} launches,",
          {k: round(v, 1) for k, v in p["by_category_ms"].items()})
    for name, ms, n in p["top"][:10]:
        print(f"    {ms:8.2f} ms {n:6d}x {name[:110]}")
print("errors:", r.get("errors"))
PY
