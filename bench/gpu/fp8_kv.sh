#!/usr/bin/env bash
# Issue 22 on one H200, one call, ~4 min wall (<= 4.8 min by its timeouts): fa3_fp8 with the e4m3 copy of the KV
# cache (models/fp8_kv_cache.py, kernels/fp8_head_quant.py) against fa3 bf16.
#   1. GPU tests: the Triton quantisation kernels with a real e4m3 cast vs their torch reference (bit for bit), the
#      e4m3 cache copy in a stream (exact vs the bf16 cache), FA3 on it vs its reference, CUDA-graph capture;
#      test_attention.py's GPU tests (FA3 bf16/FP8 vs SDPA, capture, Dynamo)                       <= 50 s
#   2. the endless Self-Forcing stream (graphs/self_forcing.yaml, random weights, 21-frame cache rolling),
#      cudagraph, fa3 (the baseline) then fa3_fp8 in ONE process                                   <= 90 s
#   3. quality: 30-block stream per kernel against sdpa (latent rel L2 free/forced, decoded PSNR)  <= 120 s
#   4. per-layer cost in a CUDA graph: fa3, fa3_fp8 first version, the new pass / write / q quantisation
#                                                                                                   <= 15 s
# Everything lands in $OUT; a summary is printed at the end.
bash bench/device_setup.sh; export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 ))s"; }

echo "[$(el)] tests"
timeout 50 python3 -m pytest tests/kernels/test_fp8_head_quant.py tests/models/test_fp8_kv_cache.py \
  tests/models/test_attention.py -q -m gpu -p no:cacheprovider -rs > "$OUT/tests.log" 2>&1
echo "tests rc $?" >> "$OUT/tests.log"

echo "[$(el)] engine stream: fa3, fa3_fp8"
timeout 90 python3 bench/bench_self_forcing.py "$OUT/self_forcing_fp8_kv.json" --modes cudagraph \
  --attentions fa3,fa3_fp8 --warmup 7 --blocks 8 --no-per-node --no-flops > "$OUT/self_forcing_fp8_kv.log" 2>&1
echo "bench rc $?" >> "$OUT/self_forcing_fp8_kv.log"

echo "[$(el)] quality"
timeout 120 python3 bench/bench_attention_quality.py "$OUT/attention_quality_fp8_kv.json" --paths fa3,fa3_fp8 \
  --ref sdpa --blocks 30 --time-blocks 0 > "$OUT/attention_quality_fp8_kv.log" 2>&1
echo "quality rc $?" >> "$OUT/attention_quality_fp8_kv.log"

echo "[$(el)] per-layer cost"
timeout 15 python3 bench/bench_fp8_kv.py "$OUT/fp8_kv_micro.json" > "$OUT/fp8_kv_micro.log" 2>&1
echo "micro rc $?" >> "$OUT/fp8_kv_micro.log"

echo "===== summary ($(el) wall)"
tail -4 "$OUT/tests.log"
grep -E "^\[.*\] (attention |== |.*skipped|.*failed)|block p50|bench rc" "$OUT/self_forcing_fp8_kv.log" | cut -c1-220
grep -E "== |skipped|failed|quality rc|block 30/" "$OUT/attention_quality_fp8_kv.log" | cut -c1-260
cat "$OUT/fp8_kv_micro.log" | tail -9
