"""Per-layer cost of the DiT's self-attention over the rolling cache, bf16 against FP8 (first and second versions).

    python bench/bench_fp8_kv.py out.json            # GPU (Hopper, fa3_fwd), ~15 s

Self-Forcing's rolling shapes (q: a 3-frame block, 4680 tokens; k/v: the 21-frame cache, 32760 tokens; 12 heads
of 128; bf16), one layer's cache. Each variant runs `--reps` times back to back inside one CUDA graph (the
stream is captured, so launch gaps are what a graph has), and the replay is timed: ms per layer call.
  fa3             FA3 bf16 on the cache prefix (what attention: fa3 does)
  fa3_fp8_v1      quantise q, k, v per call (8 eager torch ops each), FA3 FP8 (the first version)
  pass            a denoising pass of the second version: the block's k/v staged into the e4m3 copy + q quantised
                  (fused kernels) + FA3 FP8 on the copy
  write           the write pass's extra: fold the block's amax into the scales, quantise it (and re-quantise the
                  grown heads: none here, the steady state)
  q_quant         q alone (three launches); fa3_fp8_kernel: FA3 FP8 alone
A block is 30 layers x (4 denoising passes + a write pass); the estimate printed of what FP8 saves a block against
fa3 is 30 * 5 * fa3 - 30 * (5 * pass + write) ms (the write pass's attention counted as a pass).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from graph_timing import graph_ms  # bench/, on the path as the script's folder

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, reps: int, replays: int = 10) -> float:
    return graph_ms(fn, reps, replays)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fp8_kv_micro.json")
    reps = 30
    from reactor_graph.kernels.fp8_head_quant import quantize
    from reactor_graph.models import attention as A
    from reactor_graph.models.fp8_kv_cache import Fp8KVCache
    from reactor_graph.models.wan_dit import KVCache, WanConfig

    tpf, h, d = 1560, 12, 128
    cfg = dataclasses.replace(WanConfig.wan_1_3b(), num_layers=1)
    cache = KVCache(cfg, batch_size=1, latent_hw=(60, 104), max_frames=21, frames_per_block=3,
                    dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    cache.kv.copy_(torch.randn(cache.kv.shape, device="cuda", dtype=torch.bfloat16, generator=g))
    fp8 = cache.fp8 = Fp8KVCache(cache)
    fp8.refresh_()
    start, end = 18 * tpf, 21 * tpf
    q, k, v = (torch.randn(1, 3 * tpf, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    fa3, fa3_fp8 = A.make_attention("fa3"), A.make_attention("fa3_fp8")
    kc, vc = cache.kv[0, 0, :, :end], cache.kv[0, 1, :, :end]
    q8, qd = quantize(q)
    k8, kd, v8, vd = fp8.keys_values(0, end)

    def new_pass():
        fp8.stage_(0, k, v, start, end)
        return fa3_fp8.attend_cache(q, fp8, 0, end)

    variants = {
        "fa3": lambda: fa3(q, kc, vc),
        "fa3_fp8_v1": lambda: fa3_fp8(q, kc, vc),
        "pass": new_pass,
        "write": lambda: fp8.write_(0, start, end),
        "q_quant": lambda: quantize(q),
        "fa3_fp8_kernel": lambda: A.Fa3Attention.__call__(fa3_fp8, q8, k8, v8, qd, kd, vd),
    }
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "reps": reps, "ms": {}}
    for name, fn in variants.items():
        res["ms"][name] = timed(fn, reps)
        print(f"{name:16s} {res['ms'][name]:.3f} ms a layer call", flush=True)
    m = res["ms"]
    res["block_ms_saved_estimate"] = {
        "v1": 30 * 5 * (m["fa3"] - m["fa3_fp8_v1"]),
        "v2": 30 * 5 * m["fa3"] - 30 * (5 * m["pass"] + m["write"]),
    }
    print(f"estimated ms a block saved against fa3 bf16 (30 layers x 5 passes): v1 "
          f"{res['block_ms_saved_estimate']['v1']:.1f}, v2 {res['block_ms_saved_estimate']['v2']:.1f}")
    out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
