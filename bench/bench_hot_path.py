"""The hot path per block: eager vs compile vs cudagraph, and the engine against a bare CUDA-graph replay.

One device call:  source bench/device_setup.sh && python3 bench/bench_hot_path.py [GRAPH] --json out.json

The bare baseline replays the engine's own captured graph for the steady phase in a tight loop (with the
same per-block synchronisation a stream needs), so the ratio engine/bare is what the engine adds around
the same compute: prologue nodes, input copies, the host copy, bookkeeping.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch

from reactor_graph.bench import _pcts, run_bench
from reactor_graph.cli import demo_path
from reactor_graph.loop import Engine
from reactor_graph.plan import load_plan


def bare_replay(engine: Engine, n: int = 200) -> dict:
    ex = engine.executor
    key = ex.key_of(engine.phases(10_000))  # the steady phase
    graph = ex.graphs[key]
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    # Back to back, as a stream runs: the period of one replay with nothing around it.
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    period = (time.perf_counter() - t0) * 1000 / n
    wall, dev = [], []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        wall.append((time.perf_counter() - t0) * 1000)
        dev.append(s.elapsed_time(e))
    return {"wall_ms": _pcts(wall), "device_ms": _pcts(dev), "period_ms": period}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("graph", nargs="?", default=str(demo_path()))
    ap.add_argument("--blocks", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--modes", default="eager,compile,cudagraph")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engine = Engine(load_plan(args.graph), device="cuda", dtype=args.dtype, compile="eager").load(print)
    report = run_bench(engine, args.modes.split(","), args.blocks, args.warmup, progress=print)
    if "cudagraph" in report["modes"]:
        bare = bare_replay(engine)
        report["bare_cudagraph"] = bare
        mode = report["modes"]["cudagraph"]
        # Sustained: the engine's block period (frames/s over frames per block) against back-to-back replays.
        period = 1000 * mode["frames_per_block"] / mode["fps"]
        report["engine_period_ms"] = period
        report["ratios"]["cudagraph/bare"] = period / bare["period_ms"]
        report["ratios"]["cudagraph_latency/bare_latency"] = mode["block_ms"]["p50"] / bare["wall_ms"]["p50"]
    try:
        report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        report["commit"] = "?"
    report["date"] = time.strftime("%Y-%m-%d")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
