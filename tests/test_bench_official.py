"""bench/bench_official.py at toy size on the CPU against a local official Self-Forcing checkout (skipped without
one: REACTOR_OFFICIAL_SRC, else .official/Self-Forcing at the repository root)."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(os.environ.get("REACTOR_OFFICIAL_SRC") or ROOT / ".official" / "Self-Forcing")
pytestmark = pytest.mark.skipif(not (SRC / "wan" / "modules" / "causal_model.py").is_file(),
                                reason=f"no official Self-Forcing checkout at {SRC} (set REACTOR_OFFICIAL_SRC)")


def test_bench_official_reports_both_sides_and_their_agreement(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_official_under_test", ROOT / "bench" / "bench_official.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "official.json"
    rc = mod.main([str(out), "--official-src", str(SRC), "--tiny", "--device", "cpu", "--blocks", "2",
                   "--warmup", "1", "--max-frames", "9", "--modes", "official_eager,ours_eager", "--fp32-check"])
    r = json.loads(out.read_text())
    assert rc == 0 and not r["errors"], r["errors"]
    assert set(r["modes"]) == {"official_eager", "ours_eager"}
    for m in r["modes"].values():
        assert len(m["ms"]) == 2 and m["ms_min"] > 0 and m["vs_eager_x0_rel_l2"] == 0.0  # eager is deterministic
    assert r["ratios"]["official_eager/ours_eager"] > 0
    a = r["agreement"]
    assert a["x0_norm"] > 1.0
    # bf16: their residual stream is bf16, ours float32; a wrong weight, cache or timestep would be O(1)
    assert 1e-5 < a["x0_rel_l2"] < 2e-2 and a["flow_step0_rel_l2"] < 2e-2
    assert a["cache_k_rel_l2_max"] < 3e-2 and a["cache_v_rel_l2_max"] < 3e-2
    assert a["fp32_flow_step0_rel_l2"] < 1e-5  # the same function: the bf16 gap is precision
    assert 0 < a["fp32_vs_bf16_ours_flow_rel_l2"] < 2e-2 and 0 < a["fp32_vs_bf16_official_flow_rel_l2"] < 2e-2
    assert r["phase"] == "fill2@6" and r["cache_tokens"] == 9 * 12
