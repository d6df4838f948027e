"""Chrome / Perfetto traces (open at ui.perfetto.dev or chrome://tracing) from a Probe's blocks.

One process per run (a bench mode, or a server's session), with threads:
  host      each block, its on-change nodes, the hot path, every hot node and the copy to the host, on the
            host clock (under cudagraph the replayed nodes are zero-length at the replay)
  device    the same spans on the device timeline (CUDA events; each block's spans are placed after the
            block's start mark on the host clock, so the two timelines share one origin, not one clock)
  commands  each command from its arrival to the end of the first block that shows it (`applied` marks
            the boundary it was applied at)
  stream    (server) each frame from the engine to the track: queued, encoded, sent

Events are complete ("X") events with microsecond `ts` and `dur`; spans of one block nest on each thread.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .hot_path import Probe

THREADS = {"host": 1, "device": 2, "commands": 3, "stream": 4, "encoder": 5}


def _us(seconds: float, origin: float) -> float:
    return round((seconds - origin) * 1e6, 3)


def events(probe: Probe, process: str, pid: int = 1, origin: float | None = None,
           stream: Iterable[dict] = ()) -> list[dict[str, Any]]:
    """Trace events of every block `probe` resolved (it resolves pending ones first)."""
    blocks = probe.resolve()
    if origin is None:
        origin = min((b["host_t0"] for b in blocks), default=0.0)
    out: list[dict[str, Any]] = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}]
    for name, tid in THREADS.items():
        out.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}})
    ends: dict[int, float] = {}
    for b in blocks:
        for name, kind, dev0, dev, host0, host in b["spans"]:
            args = {"block": b["index"], "kind": kind}
            title = f"block {b['index']}" if kind == "block" else name
            out.append({"ph": "X", "pid": pid, "tid": THREADS["host"], "name": title, "cat": kind,
                        "ts": _us(host0, origin), "dur": round(host * 1e6, 3), "args": args})
            if probe.cuda:
                out.append({"ph": "X", "pid": pid, "tid": THREADS["device"], "name": title, "cat": kind,
                            "ts": round(_us(b["host_t0"], origin) + dev0 * 1e3, 3), "dur": round(dev * 1e3, 3),
                            "args": args})
            if kind == "block":
                ends[b["index"]] = host0 + host
    for c in probe.commands:
        end = ends.get(c["block"], c["applied"])
        out.append({"ph": "X", "pid": pid, "tid": THREADS["commands"], "name": c["name"], "cat": "command",
                    "ts": _us(c["submitted"], origin), "dur": round(max(end - c["submitted"], 0.0) * 1e6, 3),
                    "args": {"params": c["params"], "applied_at_block": c["block"],
                             "wait_ms": (c["boundary"] - c["submitted"]) * 1000,
                             "to_frame_ms": (end - c["submitted"]) * 1000}})
        out.append({"ph": "i", "s": "t", "pid": pid, "tid": THREADS["commands"], "name": f"{c['name']} applied",
                    "ts": _us(c["applied"], origin)})
    for f in stream:  # {"name", "start", "end", "args"} on the host clock
        track = f.get("track", "stream")
        out.append({"ph": "X", "pid": pid, "tid": THREADS[track], "name": f["name"], "cat": track,
                    "ts": _us(f["start"], origin), "dur": round(max(f["end"] - f["start"], 0.0) * 1e6, 3),
                    "args": f.get("args", {})})
    return out


def write(path: str | Path, runs: dict[str, Probe], stream: dict[str, list[dict]] | None = None) -> int:
    """Write one trace of several runs (a process each, on one time origin). Returns the events written."""
    for p in runs.values():
        p.resolve()
    starts = [b["host_t0"] for p in runs.values() for b in p.blocks]
    origin = min(starts, default=0.0)
    evs: list[dict] = []
    for pid, (name, probe) in enumerate(runs.items(), 1):
        evs += events(probe, name, pid, origin, (stream or {}).get(name, ()))
    Path(path).write_text(json.dumps({"traceEvents": evs, "displayTimeUnit": "ms"}))
    return len(evs)
