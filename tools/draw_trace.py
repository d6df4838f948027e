"""Draw one block of a reactor-graph trace (`bench --trace`, `run --trace`) as a timeline picture.

  python tools/draw_trace.py trace.json --block 20 -o block20.png

One row per track of the trace (host, device, commands, stream, encoder), spans nested by kind (block > on-change /
hot path / copy > nodes), the frames of the block through the frame queue and the encoder after it. For a quick
look or a report where a trace viewer (ui.perfetto.dev, chrome://tracing) cannot be opened; the file itself opens
in either.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEPTH = {"block": 0, "hot_path": 1, "on_change": 1, "copy": 1, "node": 2}


def block_spans(trace: dict, block: int, process: int | None = None) -> tuple[list[dict], dict[int, str]]:
    """The X events of `block` (by their `block` arg) in process `process` (default: the first), and thread names."""
    evs = trace["traceEvents"]
    pid = process if process is not None else min(e["pid"] for e in evs if e["ph"] == "X")
    names = {e["tid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"
             and e["pid"] == pid}
    spans = [e for e in evs if e["ph"] == "X" and e["pid"] == pid and (e.get("args") or {}).get("block") == block]
    if not spans:
        raise SystemExit(f"no spans of block {block} in process {pid}")
    return spans, names


def draw(trace: dict, block: int, out: Path, process: int | None = None) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans, names = block_spans(trace, block, process)
    t0 = min(e["ts"] for e in spans)
    rows = sorted({e["tid"] for e in spans})
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.9 * len(rows)))
    colours = {"block": "#cfd8dc", "hot_path": "#90caf9", "on_change": "#ffcc80", "copy": "#a5d6a7",
               "node": "#42a5f5", "stream": "#ce93d8", "encoder": "#f48fb1", "command": "#fff59d"}
    for r, tid in enumerate(rows):
        for e in (e for e in spans if e["tid"] == tid):
            depth = DEPTH.get(e["cat"], 0)
            y = len(rows) - 1 - r + 0.75 - 0.25 * depth
            x, w = (e["ts"] - t0) / 1000, e["dur"] / 1000  # ms
            ax.broken_barh([(x, max(w, 1e-3))], (y - 0.11, 0.22), color=colours.get(e["cat"], "#bdbdbd"),
                           edgecolor="#37474f", linewidth=0.4)
            ax.text(x + w / 2, y, e["name"], ha="center", va="center", fontsize=6, clip_on=True)
    ax.set_yticks([len(rows) - 1 - r + 0.5 for r in range(len(rows))])
    ax.set_yticklabels([names.get(t, str(t)) for t in rows])
    ax.set_ylim(0, len(rows))
    ax.set_xlabel(f"ms from the start of block {block}")
    ax.set_title(f"block {block}: {len(spans)} spans")
    ax.grid(axis="x", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=140)
    plt.close(fig)
    return spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--block", type=int, default=1)
    ap.add_argument("--process", type=int, default=None, help="pid in the trace (bench: one per mode)")
    ap.add_argument("-o", "--out", type=Path, default=Path("block.png"))
    args = ap.parse_args()
    spans = draw(json.loads(args.trace.read_text()), args.block, args.out, args.process)
    print(f"wrote {args.out}: {len(spans)} spans of block {args.block}")


if __name__ == "__main__":
    main()
