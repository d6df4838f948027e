"""bench's JSON has every documented field on the CPU, and the plot is written."""
import json

from typer.testing import CliRunner

from reactor_graph.cli import app

FIELDS = {"mode", "note", "load_s", "compile_s", "capture_s", "ttff_s", "block_ms", "hot_path_ms", "overhead_ms", "fps_synced",
          "fps", "nodes_ms", "peak_memory_mb", "recompiles", "graphs"}


def test_bench_json_and_plot_on_cpu(write_graph, tiny_yaml, tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    res = CliRunner().invoke(app, ["bench", str(write_graph(tiny_yaml)), "--blocks", "4", "--warmup", "1",
                                   "--compile", "eager,cudagraph", "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["schema"] == 1 and report["frames_per_block"] == 2 and set(report["modes"]) == {"eager", "cudagraph"}
    for mode in report["modes"].values():
        assert FIELDS <= set(mode)
        assert set(mode["block_ms"]) == {"p50", "p95", "p99", "mean", "min", "max"}
        assert mode["block_ms"]["p50"] > 0 and mode["fps"] > 0 and mode["ttff_s"] > 0
        assert set(mode["nodes_ms"]) == {"noise", "denoise", "decode", "out"}
    assert report["modes"]["cudagraph"]["mode"] == "eager" and "needs a CUDA GPU" in report["modes"]["cudagraph"]["note"]
    assert "eager/cudagraph" in report["ratios"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


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
