"""Our block-causal WanDiT against the OFFICIAL Self-Forcing CausalWanModel, same weights and inputs, tiny size.

Needs a local checkout of github guandeh17/Self-Forcing (never committed, never downloaded here): the folder in
REACTOR_OFFICIAL_SRC, else .official/Self-Forcing at the repository root; skipped when neither exists (so CI skips
it). bench/official_self_forcing.py loads it; bench/bench_official.py is the full-size bench.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from reactor_graph.models.wan_dit import BlockCausalWan, FlowMatchSchedule, KVCache, WanConfig, WanDiT, init_random_

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(os.environ.get("REACTOR_OFFICIAL_SRC") or ROOT / ".official" / "Self-Forcing")
pytestmark = pytest.mark.skipif(not (SRC / "wan" / "modules" / "causal_model.py").is_file(),
                                reason=f"no official Self-Forcing checkout at {SRC} (set REACTOR_OFFICIAL_SRC)")
H_LAT, W_LAT, FPB, MAX_FRAMES = 8, 6, 3, 9  # 12 tokens a frame, 3 blocks: the cache fills completely


def _official():
    name = "official_self_forcing_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "official_self_forcing.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _both(dtype):
    torch.manual_seed(0)
    osf = _official()
    off = osf.load_official(SRC, "sdpa")
    cfg = WanConfig.tiny()
    ours = init_random_(WanDiT(cfg).to(dtype), seed=1).eval().requires_grad_(False)
    theirs = osf.build_official(off, cfg, ours, "cpu", dtype)
    return osf, cfg, ours, theirs


def _stream(dtype) -> list[dict[str, float]]:
    """Every block of a 9-frame clip on both sides; per block: x0, and the keys/values it cached (all layers)."""
    osf, cfg, ours, theirs = _both(dtype)
    tpf = H_LAT * W_LAT // 4
    cache = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=MAX_FRAMES, frames_per_block=FPB,
                    rolling=False, dtype=dtype)
    gen = BlockCausalWan(ours, cache, FlowMatchSchedule.self_forcing())
    oc = osf.OfficialCache(cfg, batch_size=1, tokens_per_frame=tpf, max_frames=MAX_FRAMES, dtype=dtype,
                           device="cpu")
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(1, 5, cfg.text_dim, generator=g).to(dtype)  # shorter than text_len: both pad with zeros
    out = []
    with torch.no_grad():
        gen.set_context(ctx)
        for b in range(MAX_FRAMES // FPB):
            noise = torch.randn(4, 1, cfg.in_dim, FPB, H_LAT, W_LAT, generator=g).to(dtype)
            x_ours = gen.generate_block(noise, None, gen.phase_for_block(b))
            x_theirs = osf.official_block(theirs, oc, noise, ctx, b * FPB, gen.schedule)
            s = slice(b * FPB * tpf, (b + 1) * FPB * tpf)
            out.append({
                "x0": rel(x_ours, x_theirs),
                "k": max(rel(cache.kv[i, 0, :, s], oc.kv[i]["k"][:, s]) for i in range(cfg.num_layers)),
                "v": max(rel(cache.kv[i, 1, :, s], oc.kv[i]["v"][:, s]) for i in range(cfg.num_layers)),
                "x0_norm": x_theirs.norm().item(),
            })
    return out


def test_rolling_steps_match_the_official_model_in_float32():
    """4 denoising steps + the cache pass per block, 3 blocks (each reading the ones before): the same numbers
    up to float32 rounding (their RoPE runs in float64, ours applies float64 angles in float32)."""
    for r in _stream(torch.float32):
        assert r["x0_norm"] > 1.0  # a real output, not zeros on both sides
        assert r["x0"] < 1e-5 and r["k"] < 1e-5 and r["v"] < 1e-5, r


def test_bf16_differs_only_by_their_bf16_residual_stream():
    """In bf16 their residual stream, modulation and time embedding are bf16 (their autocast to float32 is
    commented out), ours float32 (as Wan): the outputs differ by bf16 rounding, well under 2%, not more."""
    rs = _stream(torch.bfloat16)
    for r in rs:
        assert r["x0"] < 2e-2 and r["k"] < 3e-2 and r["v"] < 3e-2, r
    assert max(r["x0"] for r in rs) > 1e-4  # the difference is real: this test would notice a bf16 ours


def test_a_weight_that_does_not_map_fails_loudly():
    osf, cfg, ours, theirs = _both(torch.float32)
    sd = dict(ours.state_dict())
    sd["blocks.0.self_attn.extra.weight"] = sd.pop("blocks.0.self_attn.q.weight")
    with pytest.raises(ValueError, match="missing .*blocks.0.self_attn.q.weight.*unexpected.*extra"):
        osf.official_state_dict(sd, theirs)
    sd = dict(ours.state_dict())
    sd["head.modulation"] = sd["head.modulation"][:, :1]
    with pytest.raises(ValueError, match="shape mismatches.*head.modulation"):
        osf.official_state_dict(sd, theirs)
