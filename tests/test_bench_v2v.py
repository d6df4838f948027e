"""bench/bench_v2v.py (what bench/gpu/sdv2.sh runs on the GPU) at toy size on the CPU: both encoders, both
sessions, the JSON the lead reads, the summary table."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_v2v.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_v2v_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # two toy sessions per encoder on the CPU
@pytest.mark.parametrize("encoder,node", [("taehv", "taehv_encoder"), ("wan_vae", "wan_vae_encoder")])
def test_v2v_bench_at_toy_size(tmp_path, capsys, encoder, node):
    bench = _bench()
    out = tmp_path / f"{encoder}.json"
    bench.main([str(out), "--tiny", "--device", "cpu", "--modes", "bogus,eager", "--encoder", encoder,
                "--warmup", "2", "--blocks", "2", "--realtime-blocks", "4"])
    r = json.loads(out.read_text())
    assert r["encoder_node"] == node and r["mode"] == "eager" and "bogus" in r["mode_errors"]
    t = r["throughput"]
    assert t["blocks"] == 2 and t["frames"] == 24 and t["fps"] > 0 and t["block"]["n"] == 2
    rt = r["realtime"]
    assert rt["blocks"] == 4 and rt["not_live_blocks"] == 0
    assert 0 < rt["camera_frames_used"] and rt["camera_frames_used"] + rt["skipped"] <= rt["camera_frames_fed"]
    ready, shown = rt["camera_to_ready"], rt["camera_to_shown"]
    assert ready["n"] == shown["n"] == rt["camera_frames_used"] and 0 < ready["p50_ms"] <= shown["p50_ms"]
    assert rt["newest_frame_to_ready"]["n"] == 4 and rt["newest_frame_to_ready"]["p50_ms"] <= ready["p95_ms"]
    capsys.readouterr()
    bench.main(["--summary", str(out)])
    table = capsys.readouterr().out
    assert encoder in table and str(t["fps"]) in table
