#!/usr/bin/env bash
# Issue 18 on the GPU machine, one call: start-up of the demo (fresh/restart, full against tiered, a hot-path
# swap), then the GPU tests of the tiered start. Writes everything under $OUT.
bash bench/device_setup.sh; export PYTHONPATH=/tmp/site
mkdir -p "$OUT"
python3 -X importtime -c "import torch" 2> "$OUT/importtime_torch.txt"; tail -1 "$OUT/importtime_torch.txt"
timeout 450 python3 bench/bench_startup.py --graph graphs/demo.yaml --swap-graph bench/graphs/demo_swap.yaml \
  --child-seconds 200 --blocks 100 --root /tmp/rg-startup --json "$OUT/startup_demo.json" 2>&1 | tee "$OUT/startup_demo.log"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_tiers.py -m gpu 2>&1 | tail -15 > "$OUT/gpu_tests.txt"
echo "--- gpu tests"; tail -4 "$OUT/gpu_tests.txt"
