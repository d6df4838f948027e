"""`reactor-graph bench`: where every millisecond of a block goes, per node, per compile mode, in one run.

JSON schema (version 1), stable:

    {"schema": 1, "graph": str, "device": str, "torch": str, "dtype": str, "blocks": int, "warmup": int,
     "frames_per_block": float,       # the most frames per measured block among the modes
     "modes": {MODE: {
         "mode": str,                 # the mode actually run (cudagraph falls back to eager off-GPU)
         "note": str,                 # why it differs from the one asked for, if it does
         "load_s": float, "compile_s": float, "capture_s": float,
         "ttff_s": float,             # session start -> first block on the host
         "block_ms": {"p50", "p95", "p99", "mean", "min", "max"},
         "hot_path_ms": {"p50", ...}, # device time of the hot path (CUDA events; host timer on CPU)
         "overhead_ms": float,        # block p50 - hot path p50: what the engine adds
         "fps": float,                # frames/s sustained, blocks handed on without waiting (as served)
         "fps_synced": float,         # frames/s when every block waits for its own host copy
         "frames_per_block": float,   # mean frames of the measured blocks
         "nodes_ms": {NODE: float},   # per-node p50 (eager: each node; compiled: prologue + "hot path")
         "peak_memory_mb": float|null,
         "recompiles": int, "graphs": int}},
     "ratios": {"A/B": float}}        # block p50 of A over block p50 of B, for every pair of modes run
"""
from __future__ import annotations

import queue
import statistics
import threading
import time
from typing import Any, Callable

import torch

from .compile import CompiledHotPath
from .loop import Engine

SCHEMA = 1


def _pcts(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)

    def pct(p):
        return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]

    return {"p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": statistics.fmean(s), "min": s[0], "max": s[-1]}


class _Timer:
    """Times a callable with CUDA events (device time) or perf_counter on the CPU."""

    def __init__(self, fn: Callable, cuda: bool, sink: list):
        self.fn, self.cuda, self.sink = fn, cuda, sink

    def __call__(self, *a, **kw):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.fn(*a, **kw)
            end.record()
            self.sink.append((start, end))
        else:
            t0 = time.perf_counter()
            out = self.fn(*a, **kw)
            self.sink.append(time.perf_counter() - t0)
        return out

    def millis(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self.sink]
        return [x * 1000 for x in self.sink]


def bench_mode(engine: Engine, mode: str, blocks: int, warmup: int, progress=None) -> dict[str, Any]:
    say = progress or (lambda m: None)
    cuda = engine.device.type == "cuda"
    engine.mode, engine.mode_note = mode, ""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.prepare_executor(progress=say)
    prep_s = time.perf_counter() - t0
    ex = engine.executor
    # Per-node timers: every hot node in eager; prologue nodes and the captured segment when compiled.
    timers: dict[str, _Timer] = {}
    originals = {}
    targets = engine.plan.hot if not isinstance(ex, CompiledHotPath) else ex.prologue
    for name in targets:
        node = engine.nodes[name]
        originals[name] = node.forward
        timers[name] = node.forward = _Timer(node.forward, cuda, [])
    hot_timer = _Timer(engine.executor, cuda, [])
    engine.executor = hot_timer
    lat: list[float] = []
    marks: list[float] = []
    frames_seen: list[int] = []
    session_start = [0.0]

    def on_block(b):
        b.video()  # latency: each block waits for its own host copy
        now = time.perf_counter()
        frames_seen.append(b.frames)
        lat.append((now - b.started) * 1000)
        marks.append(now)
        if b.index % 25 == 0:
            say(f"{mode}: block {b.index + 1}/{warmup + blocks}")

    def before(i):
        if i == 0:
            session_start[0] = time.perf_counter()

    try:
        res = engine.run_session(on_block, max_blocks=warmup + blocks, before_block=before)
    finally:
        for name, fn in originals.items():
            engine.nodes[name].forward = fn
        engine.executor = ex
    if not res.ok:
        raise RuntimeError(f"bench session in {mode} mode failed: {res.error}")
    sustained = _sustained_fps(engine, blocks, warmup)
    hot_ms = hot_timer.millis()[warmup:]
    block = _pcts(lat[warmup:])
    # Frames actually emitted by the measured blocks (a causal decoder's first block is shorter).
    measured_frames = sum(frames_seen[warmup:]) if warmup > 0 else sum(frames_seen)
    span = marks[-1] - marks[warmup - 1] if warmup > 0 else marks[-1] - session_start[0]
    nodes_ms = {n: _pcts(t.millis()[warmup:])["p50"] for n, t in timers.items()}
    if isinstance(ex, CompiledHotPath):
        nodes_ms["(captured hot path)" if ex.mode == "cudagraph" else "(compiled hot path)"] = _pcts(hot_ms)["p50"] - sum(nodes_ms.values())
    compile_s = ex.times["compile_s"] if isinstance(ex, CompiledHotPath) else 0.0
    return {
        "mode": engine.mode,
        "note": engine.mode_note,
        "load_s": sum(engine.load_times.values()),
        "prepare_s": prep_s,
        "compile_s": compile_s,
        "capture_s": ex.times["capture_s"] if isinstance(ex, CompiledHotPath) else 0.0,
        "ttff_s": (marks[0] - session_start[0]),
        "block_ms": block,
        "hot_path_ms": _pcts(hot_ms),
        "overhead_ms": block["p50"] - _pcts(hot_ms)["p50"],
        "fps": sustained,
        "fps_synced": measured_frames / span if span > 0 else 0.0,
        "frames_per_block": measured_frames / max(len(frames_seen[warmup:]) if warmup > 0 else len(frames_seen), 1),
        "nodes_ms": nodes_ms,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "recompiles": ex.recompiles if isinstance(ex, CompiledHotPath) else 0,
        "graphs": len(ex.graphs) if isinstance(ex, CompiledHotPath) else 0,
    }


def _sustained_fps(engine: Engine, blocks: int, warmup: int) -> float:
    """Frames/s when the loop hands blocks on without waiting, as a server does: a consumer thread waits for
    each host copy, at most a few blocks behind (a bounded queue, like the stream's), so the GPU work of the
    next block overlaps the copy and bookkeeping of this one."""
    handed: queue.Queue = queue.Queue(maxsize=4)
    marks: list[tuple[float, int]] = []

    def consume():
        while (b := handed.get()) is not None:
            b.video()
            marks.append((time.perf_counter(), b.frames))

    consumer = threading.Thread(target=consume, name="bench-consumer", daemon=True)
    consumer.start()
    try:
        engine.run_session(handed.put, max_blocks=warmup + blocks)
    finally:
        handed.put(None)
        consumer.join()
    measured = marks[warmup:] if warmup > 0 else marks
    if len(measured) < 2:
        return 0.0
    span = measured[-1][0] - (marks[warmup - 1][0] if warmup > 0 else measured[0][0])
    frames = sum(f for _, f in measured) if warmup > 0 else sum(f for _, f in measured[1:])
    return frames / span if span > 0 else 0.0


def run_bench(engine: Engine, modes: list[str], blocks: int = 50, warmup: int = 5, progress=None) -> dict[str, Any]:
    report = {
        "schema": SCHEMA, "graph": engine.plan.name, "device": str(engine.device),
        "device_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(engine.dtype).replace("torch.", ""),
        "blocks": blocks, "warmup": warmup, "modes": {}, "ratios": {},
    }
    for mode in modes:
        report["modes"][mode] = bench_mode(engine, mode, blocks, warmup, progress)
    report["frames_per_block"] = max(m["frames_per_block"] for m in report["modes"].values())
    names = list(report["modes"])
    for a in names:
        for b in names:
            if a != b:
                report["ratios"][f"{a}/{b}"] = report["modes"][a]["block_ms"]["p50"] / report["modes"][b]["block_ms"]["p50"]
    return report


def plot(report: dict[str, Any], path) -> None:
    """Per-node stacked bars per mode, and the block-time distribution per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    nodes = sorted({n for m in modes for n in report["modes"][m]["nodes_ms"]})
    bottoms = [0.0] * len(modes)
    for node in nodes:
        vals = [report["modes"][m]["nodes_ms"].get(node, 0.0) for m in modes]
        ax1.bar(modes, vals, bottom=bottoms, label=node)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    over = [max(report["modes"][m]["overhead_ms"], 0.0) for m in modes]
    ax1.bar(modes, over, bottom=bottoms, label="engine overhead", color="lightgrey", hatch="//")
    ax1.set_ylabel("ms per block (p50)")
    ax1.set_title(f"{report['graph']} on {report['device_name']}: where a block goes")
    ax1.legend(fontsize=8)
    ax2.boxplot([[report["modes"][m]["block_ms"][k] for k in ("min", "p50", "p95", "p99", "max")] for m in modes])
    ax2.set_xticks(range(1, len(modes) + 1), modes)
    for i, m in enumerate(modes, 1):
        r = report["modes"][m]
        ax2.annotate(f"p50 {r['block_ms']['p50']:.2f} ms\n{r['fps']:.0f} fps", (i, r["block_ms"]["p50"]), fontsize=8,
                     xytext=(8, 0), textcoords="offset points")
    ax2.set_ylabel("block latency, ms")
    ax2.set_title("block time distribution (min, p50, p95, p99, max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def swap_scenario(engine: Engine, every: int = 10, progress=None) -> list[dict[str, Any]]:
    """Swap through every `swap:` command of the graph and back, `every` blocks apart, in one session.
    A swap's stall is the latency of the block it landed in minus the median block latency."""
    plan = engine.plan
    steps: list[tuple[str, str]] = []
    for cmd in plan.commands.values():
        for target, alt in cmd.spec.swap.items():
            steps += [(target, alt), (target, target)]
    if not steps:
        return []
    lat: list[float] = []
    landed: list[tuple[int, dict]] = []

    def on_block(b):
        b.video()
        lat.append((time.perf_counter() - b.started) * 1000)
        i = b.index + 1
        if i % every == 0 and i // every <= len(steps):
            target, alt = steps[i // every - 1]
            engine.request_swap(target, alt, reply=lambda r, i=i: landed.append((i, r)))
            if progress:
                progress(f"swap {target} -> {alt}")

    engine.run_session(on_block, max_blocks=every * (len(steps) + 1) + 1)
    base = statistics.median(lat)
    out = []
    for i, r in landed:
        out.append({"node": r.get("node"), "now": r.get("now"), "ok": r["ok"], "error": r.get("error"),
                    "recaptured": r.get("recaptured", False), "stall_ms": max(lat[i] - base, 0.0) if i < len(lat) else None,
                    "swap_ms": r.get("stall_ms"), "block_p50_ms": base})
    return out


def bench_host(host, blocks: int = 50, warmup: int = 5) -> dict[str, Any]:
    """A wrapped Reactor model (compat.ModelHost) is one opaque loop: time it block to block."""
    marks: list[float] = []
    t0 = [0.0]

    def before(i):
        if i == 0:
            t0[0] = time.perf_counter()

    def on_block(b):
        b.video()
        marks.append(time.perf_counter())

    res = host.run_session(on_block, max_blocks=warmup + blocks, before_block=before)
    if not res.ok:
        raise RuntimeError(f"bench session failed: {res.error}")
    gaps = [(b - a) * 1000 for a, b in zip(marks[warmup:], marks[warmup + 1:])] or [0.0]
    frames = host.stats.frames // max(host.stats.blocks, 1)
    span = marks[-1] - marks[warmup]
    return {"schema": SCHEMA, "graph": host.name, "device": "model", "blocks": blocks, "warmup": warmup,
            "frames_per_block": frames,
            "modes": {"model": {"mode": "model", "block_ms": _pcts(gaps), "ttff_s": marks[0] - t0[0],
                                "fps": (len(marks) - warmup - 1) * frames / span if span > 0 else 0.0}}}
