#!/usr/bin/env bash
# Issue 18 on the GPU machine, part of one call (about 2.5 minutes): where the time to the first frame goes.
# Fresh processes of the demo and of the Self-Forcing graph (random weights), tiered start, stopped after a few
# blocks: on empty caches, then again on the caches the first left (a restart's first frame does not wait for the
# compiled tier, so these are the restart's first frames). Each child writes a cProfile of its main thread up to
# its first frame, and `python -X importtime` of the start path's imports. Everything under $OUT/first_frame.
# Expects bench/device_setup.sh to have run (PYTHONPATH=/tmp/site).
D="$OUT/first_frame"; mkdir -p "$D"
{ echo "PYTHONDONTWRITEBYTECODE=$PYTHONDONTWRITEBYTECODE"; python3 -c "import sys, torch, os; print(sys.dont_write_bytecode, sys.pycache_prefix, os.access(os.path.dirname(torch.__file__), os.W_OK))"; ls -la "$(python3 -c "import torch, os; print(os.path.dirname(torch.__file__))")/__pycache__" | head -5; } > "$D/env.txt" 2>&1
python3 -X importtime -c "import torch, reactor_graph.loop, reactor_graph.plan" 2> "$D/importtime.txt"
sort -t'|' -k2 -n -r "$D/importtime.txt" | head -25 > "$D/importtime_top.txt"
timeout 60 python3 bench/bench_startup.py --graph graphs/demo.yaml --first-frames --restart-from tiered_fresh \
  --scenarios tiered_fresh,tiered_restart --blocks 20 --child-seconds 50 --root /tmp/rg-ff-demo \
  --profile-dir "$D/demo_prof" --json "$D/demo.json" 2>&1 | tee "$D/demo.log" | grep -v "^\s*$" | tail -4
timeout 130 python3 bench/bench_startup.py --graph graphs/self_forcing.yaml --random-weights --first-frames \
  --restart-from tiered_fresh --scenarios tiered_fresh,tiered_restart --blocks 3 --child-seconds 60 \
  --root /tmp/rg-ff-sf --profile-dir "$D/sf_prof" --json "$D/self_forcing.json" 2>&1 | tee "$D/self_forcing.log" \
  | grep -v "^\s*$" | tail -4
