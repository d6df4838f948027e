"""`reactor-graph bench`: where every millisecond of a block goes, per node, per compile mode, in one run.

Each mode runs three sessions: the block as served (latency, then sustained frames/s), un-probed; then the
same blocks again with a Probe timing every node at its boundaries (hot_path.Probe: CUDA events, recorded
inside the captured graph under cudagraph; the host clock on the CPU). The probed hot path is reported next
to the un-probed one: their difference is what timing every node costs (`probe_cost_ms`).

JSON schema (version 2), stable:

    {"schema": 2, "graph": str, "device": str, "torch": str, "dtype": str, "blocks": int, "warmup": int,
     "frames_per_block": float,       # the most frames per measured block among the modes
     "modes": {MODE: {
         "mode": str,                 # the mode actually run (cudagraph falls back to eager off-GPU)
         "note": str,                 # why it differs from the one asked for, if it does
         "fallback": bool,            # it did: the row is labelled "MODE -> RAN: reason" and has no ratio
         "load_s": float, "compile_s": float, "capture_s": float,
         "ttff_s": float,             # session start -> first block on the host
         "block_ms": {"p50", "p95", "p99", "mean", "min", "max"},   # blocks where no prompt switch landed
         "hot_path_ms": {"p50", ...}, # device time of the hot path, un-probed (CUDA events; host timer on CPU)
         "overhead_ms": float,        # block p50 - hot path p50: what the engine adds
         "fps": float,                # frames/s sustained, blocks handed on without waiting (as served)
         "fps_synced": float,         # frames/s when every block waits for its own host copy
         "frames_per_block": float,   # mean frames of the measured blocks
         "nodes_ms": {NODE: float},   # per hot node p50 device time, probed, in every mode
         "nodes_sum_ms": float,       # p50 over blocks of the per-block sum of nodes_ms
         "probed_hot_path_ms": float, # p50 of the probed hot path (the span the nodes_ms sum sits in)
         "probe_cost_ms": float,      # probed - un-probed hot path p50: what timing every node costs
         "on_change": {NODE: {"first_ms": float, "steady_ms": float|null, "runs": int}},
                                      # first run of a session, and p50 of re-runs (prompt switches, or re-runs
                                      # forced after the measured blocks)
         "switch": {"every": int, "blocks": [int], "block_ms": float, "stall_ms": float} | null,
                                      # --switch N: a prompt switch lands every N measured blocks; its block
                                      # time (p50) and the stall over block_ms.p50
         "peak_memory_mb": float|null,
         "recompiles": int, "graphs": int}},
     "ratios": {"A/B": float}}        # block p50 of A over B, for every pair of modes that ran different
                                      # executors (a fallback is no mode of its own)
"""
from __future__ import annotations

import queue
import statistics
import threading
import time
from typing import Any, Callable

import torch

from .compile import CompiledHotPath
from .hot_path import Probe
from .loop import Engine

SCHEMA = 2
RERUNS = 3  # blocks after the measured ones where each on-change node is made to run again (its steady time)
PROMPTS = ("a red fox running through fresh snow, low tracking shot", "a blue whale gliding under the sea at dawn")


def _pcts(xs: list[float]) -> dict[str, float]:
    s = sorted(xs) or [0.0]

    def pct(p):
        return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]

    return {"p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": statistics.fmean(s), "min": s[0], "max": s[-1]}


def _p50(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


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


def switch_command(engine: Engine) -> tuple[str, str, int | None] | None:
    """(command, param, max_length) of a command that sets a str slot an on-change node reads (the prompt)."""
    plan = engine.plan
    read = {src.name for n in plan.on_change for src in plan.wiring.bindings[n].values() if src.node is None}
    for name, cmd in plan.commands.items():
        for slot, value in cmd.spec.set.items():
            param = value[1:] if isinstance(value, str) and value.startswith("$") else None
            spec = cmd.spec.params.get(param) if param else None
            if slot in read and spec is not None and spec.type == "str" and not spec.enum:
                return name, param, spec.max_length
    return None


def _switch_blocks(every: int, warmup: int, blocks: int) -> list[int]:
    return list(range(warmup + every - 1, warmup + blocks, every)) if every > 0 else []


def _session(engine: Engine, n: int, lands: list[int], rerun_from: int | None = None, say=None, label=""):
    """Run `n` blocks (each waits for its host copy); a prompt switch lands at each block of `lands`; from
    block `rerun_from` on, every on-change node runs again each block. Returns (latencies ms, marks, frames)."""
    lat, marks, frames = [], [], []
    cmd = switch_command(engine) if lands else None
    if lands and cmd is None:
        raise RuntimeError("--switch: this graph has no command that sets a prompt an on-change node reads")
    start = [0.0]

    def before(i):
        if i == 0:
            start[0] = time.perf_counter()
        if rerun_from is not None and i >= rerun_from:
            for name in engine.plan.on_change:
                engine.forget(name)

    def on_block(b):
        b.video()
        now = time.perf_counter()
        lat.append((now - b.started) * 1000)
        marks.append(now)
        frames.append(b.frames)
        if b.index + 1 in lands:  # lands at the next boundary
            name, param, limit = cmd
            text = PROMPTS[len([x for x in lands if x <= b.index + 1]) % 2]
            engine.submit(name, {param: text[:limit] if limit else text})
        if say and b.index % 25 == 0:
            say(f"{label}: block {b.index + 1}/{n}")

    res = engine.run_session(on_block, max_blocks=n, before_block=before)
    if not res.ok:
        raise RuntimeError(f"bench session ({label}) failed: {res.error}")
    return lat, marks, frames, start[0]


def bench_mode(engine: Engine, mode: str, blocks: int, warmup: int, progress=None, switch: int = 0,
               probe: Probe | None = None, per_node: bool = True) -> dict[str, Any]:
    """One mode: un-probed latency and sustained sessions, then a probed one (per-node times, on-change
    nodes). `probe`: the one to record into (bench --trace keeps it); a new one otherwise. per_node=False
    skips the probed session (a compiled mode builds its executor again for it): nodes_ms and on_change are
    then empty and the probed figures 0."""
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
    compiled = isinstance(ex, CompiledHotPath)
    lands = _switch_blocks(switch, warmup, blocks)
    hot_timer = _Timer(ex, cuda, [])
    engine.executor = hot_timer
    try:
        lat, marks, frames_seen, session_start = _session(engine, warmup + blocks, lands, say=say, label=mode)
    finally:
        engine.executor = ex
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    sustained = _sustained_fps(engine, blocks, warmup)

    # the same blocks again, every node timed at its boundaries
    probe = probe or Probe(engine.device)
    if per_node:
        if compiled:
            say(f"{mode}: compiling the hot path again, split at node boundaries, to time every node")
        engine.use_probe(probe, progress=say)
        try:
            _session(engine, warmup + blocks + RERUNS, lands, rerun_from=warmup + blocks, say=say,
                     label=f"{mode} probed")
        finally:
            engine.use_probe(None, executor=ex)
    per_block = probe.resolve() if per_node else []
    measured = [b for b in per_block if warmup <= b["index"] < warmup + blocks and b["index"] not in lands]
    nodes_ms = {n: _p50([d for b in measured for (nm, k, _, d, _, _) in b["spans"] if nm == n and k == "node"])
                for n in engine.plan.hot} if per_node else {}
    sums = [sum(d for (_, k, _, d, _, _) in b["spans"] if k == "node") for b in measured]
    probed_hot = [d for b in measured for (_, k, _, d, _, _) in b["spans"] if k == "hot_path"]
    on_change = {}
    for n in engine.plan.on_change if per_node else ():
        runs = [(b["index"], d) for b in per_block for (nm, k, _, d, _, _) in b["spans"] if nm == n and k == "on_change"]
        first = [d for i, d in runs if i == 0]
        on_change[n] = {"first_ms": first[0] if first else None, "steady_ms": _p50([d for i, d in runs if i > 0]),
                        "runs": len(runs)}

    hot_ms = _pcts(hot_timer.millis()[warmup:])
    keep = [i for i in range(warmup, len(lat)) if i not in lands]
    block = _pcts([lat[i] for i in keep])
    # Frames actually emitted by the measured blocks (a causal decoder's first block is shorter).
    measured_frames = sum(frames_seen[warmup:]) if warmup > 0 else sum(frames_seen)
    span = marks[-1] - marks[warmup - 1] if warmup > 0 else marks[-1] - session_start
    sw = None
    if lands:
        sw_ms = statistics.median(lat[i] for i in lands)
        sw = {"every": switch, "blocks": lands, "block_ms": sw_ms, "stall_ms": sw_ms - block["p50"]}
    probed_p50 = _p50(probed_hot) or 0.0
    return {
        "mode": engine.mode,
        "note": engine.mode_note,
        "fallback": engine.mode != mode,
        "load_s": sum(v for k, v in engine.load_times.items() if k != "(hot path)"),
        "prepare_s": prep_s,
        "compile_s": ex.times["compile_s"] if compiled else 0.0,
        "capture_s": ex.times["capture_s"] if compiled else 0.0,
        "ttff_s": (marks[0] - session_start),
        "block_ms": block,
        "hot_path_ms": hot_ms,
        "overhead_ms": block["p50"] - hot_ms["p50"],
        "fps": sustained,
        "fps_synced": measured_frames / span if span > 0 else 0.0,
        "frames_per_block": measured_frames / max(len(frames_seen[warmup:]) if warmup > 0 else len(frames_seen), 1),
        "nodes_ms": nodes_ms,
        "nodes_sum_ms": _p50(sums) or 0.0,
        "probed_hot_path_ms": probed_p50,
        "probe_cost_ms": probed_p50 - hot_ms["p50"] if per_node else 0.0,
        "on_change": on_change,
        "switch": sw,
        "peak_memory_mb": peak,
        "recompiles": ex.recompiles if compiled else 0,
        "graphs": len(ex.graphs) if compiled else 0,
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


def default_modes(device: torch.device) -> list[str]:
    """What bench compares unless told: on a GPU every mode; on a CPU eager only (compiling there takes
    minutes and cudagraph would fall back to eager)."""
    return ["eager", "compile", "cudagraph"] if device.type == "cuda" else ["eager"]


def label(mode: str, r: dict[str, Any]) -> str:
    """A row's mode as it ran: `cudagraph -> eager: no CUDA` for a fallback."""
    if not r.get("fallback"):
        return mode
    why = "no CUDA" if "CUDA" in (r.get("note") or "") else (r.get("note") or "fell back")
    return f"{mode} -> {r['mode']}: {why}"


def run_bench(engine: Engine, modes: list[str], blocks: int = 50, warmup: int = 5, progress=None,
              switch: int = 0, probes: dict[str, Probe] | None = None, per_node: bool = True) -> dict[str, Any]:
    """`probes`: filled with each mode's Probe (its marks make a trace, see trace.py). per_node: see
    bench_mode."""
    report = {
        "schema": SCHEMA, "graph": engine.plan.name, "device": str(engine.device),
        "device_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(engine.dtype).replace("torch.", ""),
        "blocks": blocks, "warmup": warmup, "modes": {}, "ratios": {},
    }
    for mode in modes:
        probe = Probe(engine.device)
        report["modes"][mode] = bench_mode(engine, mode, blocks, warmup, progress, switch=switch, probe=probe,
                                           per_node=per_node)
        if probes is not None:
            probes[mode] = probe
    report["frames_per_block"] = max(m["frames_per_block"] for m in report["modes"].values())
    # ratios between different executors only: a fallback ran another mode's executor under its name
    ran = [name for name, r in report["modes"].items() if not r["fallback"]]
    for a in ran:
        for b in ran:
            if a != b:
                report["ratios"][f"{a}/{b}"] = report["modes"][a]["block_ms"]["p50"] / report["modes"][b]["block_ms"]["p50"]
    return report


def plot(report: dict[str, Any], path) -> None:
    """Per-node stacked bars per mode (hot nodes, then the engine overhead), on-change nodes (first run and
    steady state), and the block-time distribution per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    labels = [label(m, report["modes"][m]).replace(": ", "\n") for m in modes]
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4.5))
    nodes = list(dict.fromkeys(n for m in modes for n in report["modes"][m]["nodes_ms"]))
    bottoms = [0.0] * len(modes)
    for node in nodes:
        vals = [report["modes"][m]["nodes_ms"].get(node) or 0.0 for m in modes]
        ax1.bar(labels, vals, bottom=bottoms, label=node)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    over = [max(report["modes"][m]["block_ms"]["p50"] - b, 0.0) for m, b in zip(modes, bottoms)]
    ax1.bar(labels, over, bottom=bottoms, label="engine overhead", color="lightgrey", hatch="//")
    ax1.set_ylabel("ms per block (p50)")
    ax1.set_title(f"{report['graph']} on {report['device_name']}: where a block goes")
    ax1.legend(fontsize=8)
    oc = list(dict.fromkeys(n for m in modes for n in report["modes"][m].get("on_change", {})))
    width = 0.8 / max(2 * len(oc), 1)
    for j, node in enumerate(oc):
        for k, key in enumerate(("first_ms", "steady_ms")):
            vals = [(report["modes"][m].get("on_change", {}).get(node, {}).get(key) or 0.0) for m in modes]
            xs = [i + (2 * j + k) * width - 0.4 + width / 2 for i in range(len(modes))]
            ax3.bar(xs, vals, width, label=f"{node} {key[:-3].replace('_', ' ')}", hatch="" if k == 0 else "..")
    ax3.set_xticks(range(len(modes)), labels)
    ax3.set_ylabel("ms per run")
    ax3.set_title("on-change nodes: first run, steady state")
    if oc:
        ax3.legend(fontsize=8)
    ax2.boxplot([[report["modes"][m]["block_ms"][k] for k in ("min", "p50", "p95", "p99", "max")] for m in modes])
    ax2.set_xticks(range(1, len(modes) + 1), labels)
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
