#!/usr/bin/env bash
# Issue 18 on the GPU machine, one call: start-up of the demo and of the Self-Forcing graph (fresh process,
# tiered start on empty caches until its compiled tier serves; then full and tiered restarts on those caches),
# then GPU tests (tiered start; issue 22's attention kernels) in what time is left. Everything under $OUT.
bash bench/device_setup.sh; export PYTHONPATH=/tmp/site
mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${BUDGET:-560}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
python3 -X importtime -c "import torch" 2> "$OUT/importtime_torch.txt"; tail -1 "$OUT/importtime_torch.txt"
timeout 270 python3 bench/bench_startup.py --graph graphs/demo.yaml --restart-from tiered_fresh \
  --scenarios tiered_fresh,full_restart,tiered_restart --child-seconds 200 --blocks 100 --root /tmp/rg-demo \
  --json "$OUT/startup_demo.json" 2>&1 | tee "$OUT/startup_demo.log"
T=$(( $(left) - 60 )); [ $T -gt 200 ] && T=200
timeout $T python3 bench/bench_startup.py --graph graphs/self_forcing.yaml --restart-from tiered_fresh \
  --scenarios tiered_fresh,full_restart,tiered_restart --child-seconds 120 --blocks 10 --root /tmp/rg-sf \
  --json "$OUT/startup_self_forcing.json" 2>&1 | tee "$OUT/startup_self_forcing.log"
T=$(left); [ $T -gt 70 ] && T=70
[ $T -gt 10 ] && timeout $T python3 -m pytest -q -p no:cacheprovider -rs tests/models/test_attention.py -m gpu \
  > "$OUT/fa3_tests.txt" 2>&1; echo "--- fa3 tests"; grep -E "passed|failed|FAILED|Error" "$OUT/fa3_tests.txt" | tail -8
T=$(left)
[ $T -gt 20 ] && timeout $T python3 -m pytest -q -p no:cacheprovider tests/test_tiers.py -m gpu > "$OUT/tier_tests.txt" 2>&1
echo "--- tier tests"; grep -E "passed|failed|FAILED|Error" "$OUT/tier_tests.txt" | tail -5
