"""bench's JSON has every documented field on the CPU, and the plot is written."""
import json
from pathlib import Path

from typer.testing import CliRunner

from reactor_graph.cli import app

import pytest
import torch
from rich.console import Console

from reactor_graph import cli

FIELDS = {"mode", "note", "fallback", "load_s", "compile_s", "capture_s", "ttff_s", "block_ms", "hot_path_ms",
          "overhead_ms", "fps_synced", "fps", "nodes_ms", "nodes_sum_ms", "probed_hot_path_ms", "probe_cost_ms",
          "on_change", "switch", "peak_memory_mb", "recompiles", "graphs"}
HOT = {"noise", "denoise", "decode", "out"}


def test_bench_json_plot_trace_on_cpu(write_graph, tiny_yaml, tmp_path, monkeypatch):
    """Every hot node and the on-change node are timed; a fallback is labelled and gets no ratio; the
    tables fit 80 columns without a terminal; the trace is valid Chrome trace JSON."""
    monkeypatch.setattr(cli, "out", Console(width=80))
    out, png, trace = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "t.json"
    res = CliRunner().invoke(app, ["bench", str(write_graph(tiny_yaml)), "--blocks", "4", "--warmup", "1",
                                   "--compile", "eager,cudagraph", "--json", str(out), "--plot", str(png),
                                   "--trace", str(trace), "--switch", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["schema"] == 2 and report["frames_per_block"] == 2 and set(report["modes"]) == {"eager", "cudagraph"}
    for mode in report["modes"].values():
        assert FIELDS <= set(mode)
        assert set(mode["block_ms"]) == {"p50", "p95", "p99", "mean", "min", "max"}
        assert mode["block_ms"]["p50"] > 0 and mode["fps"] > 0 and mode["ttff_s"] > 0
        assert set(mode["nodes_ms"]) == HOT and all(v > 0 for v in mode["nodes_ms"].values())
        cond = mode["on_change"]["cond"]
        assert cond["first_ms"] > 0 and cond["steady_ms"] > 0 and cond["runs"] >= 3
        assert mode["switch"]["every"] == 2 and mode["switch"]["blocks"] == [2, 4]
        assert 0 < mode["nodes_sum_ms"] <= mode["probed_hot_path_ms"] * 1.001
    cg = report["modes"]["cudagraph"]
    assert cg["mode"] == "eager" and cg["fallback"] and "needs a CUDA GPU" in cg["note"]
    assert report["ratios"] == {}  # the fallback ran eager's executor: no ratio between the two
    text = res.output
    assert "cudagraph -> eager: no" in text and "ratios" not in text
    assert "cond (on change)" in text and "denoise" in text
    table = [line for line in text.splitlines() if any(c in line for c in "│┃━─")]
    assert len(table) > 12 and "…" not in "".join(table) and max(len(line) for line in table) <= 80
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["args"]["name"] for e in events if e["name"] == "process_name"} == {"eager", "cudagraph"}
    assert any(e["name"] == "set_prompt" and e["cat"] == "command" for e in events if e["ph"] == "X")


def test_bench_defaults_to_eager_on_cpu(write_graph, tiny_yaml, tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(app, ["bench", str(write_graph(tiny_yaml)), "--blocks", "2", "--warmup", "0",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert list(json.loads(out.read_text())["modes"]) == ["eager"]


def test_bench_missing_output_folder_is_named_before_loading(write_graph, tiny_yaml, tmp_path):
    res = CliRunner().invoke(app, ["bench", str(write_graph(tiny_yaml)), "--json", str(tmp_path / "no" / "b.json")])
    assert res.exit_code == 2 and f"folder {tmp_path / 'no'} does not exist" in res.output


def _block_spans(probe):
    for b in probe.resolve():
        yield b["index"], {(n, k): (h0, h0 + h, d) for (n, k, _, d, h0, h) in b["spans"]}


def test_compile_mode_times_every_node_on_cpu(tiny_engine):
    """compile mode (aot_eager): every hot node timed; per block their sum is the probed hot path within
    20% + 2 ms (what is left is the engine between nodes), and the un-probed run is reported next to it."""
    from reactor_graph.bench import bench_mode
    from reactor_graph.hot_path import Probe

    engine = tiny_engine(compile="compile", compile_backend="aot_eager")
    probe = Probe(engine.device)
    r = bench_mode(engine, "compile", blocks=4, warmup=1, probe=probe)
    assert r["mode"] == "compile" and not r["fallback"] and r["recompiles"] == 0
    assert set(r["nodes_ms"]) == HOT and all(v > 0 for v in r["nodes_ms"].values())
    assert r["on_change"]["cond"]["first_ms"] > 0
    ratios = []
    for index, spans in _block_spans(probe):
        hot = spans[("hot path", "hot_path")][2]
        total = sum(spans[(n, "node")][2] for n in HOT)
        assert total <= hot * 1.001
        ratios.append((hot - total) / (hot * 0.2 + 2.0))
    assert sorted(ratios)[len(ratios) // 2] <= 1.0, ratios
    assert r["probe_cost_ms"] == pytest.approx(r["probed_hot_path_ms"] - r["hot_path_ms"]["p50"])
    # the un-probed executor is back in place, and no compile of it happened again
    assert engine.probe is None and engine.executor.probe is None


def test_trace_spans_nest_and_cover_every_node(tiny_engine, tmp_path):
    from reactor_graph import trace
    from reactor_graph.hot_path import Probe

    engine = tiny_engine()
    probe = Probe(engine.device)
    engine.use_probe(probe)
    assert engine.run_session(lambda b: b.video(), max_blocks=3).ok
    engine.use_probe(None)
    path = tmp_path / "t.json"
    trace.write(path, {"eager": probe})
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    blocks = [e for e in events if e["cat"] == "block"]
    assert [e["name"] for e in blocks] == ["block 0", "block 1", "block 2"]
    for blk in blocks:
        inside = [e for e in events if e["cat"] != "block" and e["args"].get("block") == blk["args"]["block"]]
        for e in inside:  # every span of a block lies within it
            assert blk["ts"] <= e["ts"] and e["ts"] + e["dur"] <= blk["ts"] + blk["dur"] + 0.01
        hot = next(e for e in inside if e["cat"] == "hot_path")
        nodes = {e["name"]: e for e in inside if e["cat"] == "node"}
        assert set(nodes) == HOT  # every hot node of each block, inside the hot path
        assert all(hot["ts"] <= e["ts"] and e["ts"] + e["dur"] <= hot["ts"] + hot["dur"] + 0.01 for e in nodes.values())
        assert ("cond" in {e["name"] for e in inside if e["cat"] == "on_change"}) == (blk["args"]["block"] == 0)
    # the picture of one block (tools/draw_trace.py) holds that block's spans: every node, nothing of another block
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from draw_trace import draw

    drawn = draw(json.loads(path.read_text()), 0, tmp_path / "block0.png")
    assert (tmp_path / "block0.png").stat().st_size > 1000
    assert HOT | {"cond"} <= {e["name"] for e in drawn} and {e["args"]["block"] for e in drawn} == {0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudagraph_per_node_times_and_probe_cost_on_gpu(tiny_engine, tiny_yaml):
    """Under cudagraph the probe's events are recorded inside the captured graph: every node gets a device
    time, they sum to no more than the probed hot path, and the probe's cost is measured (and small)."""
    from reactor_graph.bench import bench_mode

    engine = tiny_engine(tiny_yaml.replace("device: cpu", "device: cuda"), compile="cudagraph")
    r = bench_mode(engine, "cudagraph", blocks=20, warmup=3)
    assert r["mode"] == "cudagraph" and r["graphs"] >= 1 and r["recompiles"] == 0
    assert set(r["nodes_ms"]) == HOT and all(v > 0 for v in r["nodes_ms"].values())
    assert r["nodes_sum_ms"] <= r["probed_hot_path_ms"] * 1.001
    assert r["probe_cost_ms"] < max(0.5, 0.25 * r["hot_path_ms"]["p50"])


def test_bench_rejects_unknown_mode(write_graph, tiny_yaml):
    res = CliRunner().invoke(app, ["bench", str(write_graph(tiny_yaml)), "--compile", "eager,fast"])
    assert res.exit_code == 2 and "unknown compile mode(s) fast" in res.output


def test_bench_swap_scenario_reports_each_swap(tiny_engine):
    from reactor_graph.bench import swap_scenario
    from reactor_graph.node import registry

    engine = tiny_engine(registry()["test_paint"].GRAPH.replace("SECONDS", "0.0"))
    swaps = swap_scenario(engine, every=3)
    done = [(s["node"], s["now"]) for s in swaps]
    assert done == [("cond", "const"), ("cond", "cond"), ("cond", "cond"), ("cond", "cond"),
                    ("paint", "paint_neg"), ("paint", "paint")]
    assert all(s["ok"] and s["stall_ms"] is not None for s in swaps)
