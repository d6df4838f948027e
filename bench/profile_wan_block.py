"""Where a Self-Forcing block's time goes on the GPU, and what the alternatives would give.

    python bench/profile_wan_block.py out.json [--layers 30] [--max-frames 21]

1. attention kernels alone at the rolling phase's shapes (q = one block, k/v = the full cache), per SDPA backend
   and layout, in TFLOP/s;
2. the DiT's linear layers in bf16 against FP8 (`torch._scaled_mm`, row-wise scales), with and without the cost
   of quantising the activations (1. and 2. with --micro);
3. one rolling-phase block of the 1.3B DiT as the node runs it (random weights, regional compile, one CUDA
   graph), and under the profiler: kernel time grouped into attention / matmul / elementwise /
   copies.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F


def bench_ms(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def attention_backends(lq: int, lk: int, heads=12, dim=128) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    flops = 4 * lq * lk * heads * dim
    # the engine's layout: [B, T, H, D] buffers, transposed views into SDPA
    q = torch.randn(1, lq, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, lk, heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, lk, heads, dim, device="cuda", dtype=torch.bfloat16)
    layouts = {"bthd_views": (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
               "bhtd_contig": (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                               v.transpose(1, 2).contiguous())}
    ref = None
    for lname, (qq, kk, vv) in layouts.items():
        for b in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            key = f"{b.lower()}/{lname}"
            try:
                with sdpa_kernel([getattr(SDPBackend, b)]):
                    o = F.scaled_dot_product_attention(qq, kk, vv)
                    ms = bench_ms(lambda: F.scaled_dot_product_attention(qq, kk, vv))
                if ref is None:
                    ref = o.float()
                err = (o.float() - ref).abs().max().item()
                out[key] = {"ms": ms, "tflops": flops / ms / 1e9, "max_err_vs_first": err}
            except Exception as exc:  # noqa: BLE001 -- report the backend as unavailable
                out[key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(key, out[key], flush=True)
    try:
        from torch.nn.attention.flex_attention import flex_attention

        fa = torch.compile(flex_attention, dynamic=False)
        qq, kk, vv = layouts["bhtd_contig"]
        fa(qq, kk, vv)
        ms = bench_ms(lambda: fa(qq, kk, vv))
        out["flex/bhtd_contig"] = {"ms": ms, "tflops": flops / ms / 1e9}
    except Exception as exc:  # noqa: BLE001
        out["flex/bhtd_contig"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    print("flex", out["flex/bhtd_contig"], flush=True)
    return out


def linear_fp8(m: int, shapes) -> dict:
    out = {}
    for kdim, ndim in shapes:
        a = torch.randn(m, kdim, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(ndim, kdim, device="cuda", dtype=torch.bfloat16) / kdim**0.5
        flops = 2 * m * kdim * ndim
        bf = bench_ms(lambda: F.linear(a, w))
        r = {"bf16_ms": bf, "bf16_tflops": flops / bf / 1e9}
        try:
            f8 = torch.float8_e4m3fn
            wmax = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
            ws = (wmax / 448.0)
            wq = (w.float() / ws).to(f8)  # [N, K]

            def quant(x):
                s = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
                return (x.float() / s).to(f8), s

            aq, as_ = quant(a)
            mm = lambda: torch._scaled_mm(aq, wq.t(), scale_a=as_, scale_b=ws.t(), out_dtype=torch.bfloat16)
            y = mm()
            ms = bench_ms(mm)
            qc = torch.compile(quant, dynamic=False)
            qc(a)

            def quant_mm():  # quantise once, then the FP8 product
                xq, xs = qc(a)
                return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)

            both = bench_ms(quant_mm)
            ref = F.linear(a, w).float()
            r.update(fp8_ms=ms, fp8_tflops=flops / ms / 1e9, fp8_with_quant_ms=both,
                     fp8_rel_err=((y.float() - ref).norm() / ref.norm()).item())
        except Exception as exc:  # noqa: BLE001
            r["fp8_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out[f"{m}x{kdim}->{ndim}"] = r
        print("linear", kdim, ndim, r, flush=True)
    return out


def categorize(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "cudnn", "sdpa")):
        return "attention"
    if any(s in n for s in ("gemm", "cutlass", "xmma", "nvjet", "sm90", "matmul", "wgmma")):
        return "matmul"
    if n.startswith("triton") or "triton" in n:
        return "triton (fused elementwise/norm)"
    if "copy" in n or "memcpy" in n or "cat" in n:
        return "copy"
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--max-frames", type=int, default=21)
    ap.add_argument("--sink", type=int, default=0)
    ap.add_argument("--micro", action="store_true", help="also the attention/linear micro-benchmarks")
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version(), flush=True)
    tpf = 30 * 52
    rep = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    if args.micro:
        rep["attention"] = attention_backends(3 * tpf, args.max_frames * tpf)
        rep["linear"] = linear_fp8(3 * tpf, [(1536, 1536), (1536, 8960), (8960, 1536)])
    rep["block"] = profile_node(args)
    Path(args.out).write_text(json.dumps(rep, indent=2))
    return 0


def profile_node(args) -> dict:
    """The block as the engine runs it: the node's regional compile, the rolling phase, one CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    from reactor_graph.node import GraphInfo
    from reactor_graph.nodes.wan_causal_dit import WanCausalDiT

    torch.manual_seed(0)
    cond = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    noise = torch.randn(16, 12, 60, 104, device="cuda", dtype=torch.bfloat16)
    params = WanCausalDiT.Params(config="1.3b", layers=args.layers, latent_size=[60, 104],
                                 timesteps=[1000, 750, 500, 250], shift=5.0, max_frames=args.max_frames,
                                 sink_frames=args.sink, rolling=True)
    node = WanCausalDiT("dit", params, GraphInfo(480, 832, 16))
    node.load(torch.device("cuda"), torch.bfloat16)
    node.phase = node.num_phases() - 1
    node.cache.kv.normal_()
    run = lambda: node._generate_regional(cond, noise, node.phase)  # noqa: E731
    r = {}
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    r["first_call_s"] = time.perf_counter() - t
    r["regional_no_graph_ms"] = bench_ms(run, 3, 1)
    s = torch.cuda.Stream()  # capture as the engine does: warm-up on a side stream, then one graph
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    r["cudagraph_ms"] = bench_ms(g.replay, 10, 2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    cats, names = defaultdict(float), defaultdict(float)
    for ev in prof.key_averages():
        t_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t_us and "CUDA" in str(ev.device_type):
            cats[categorize(ev.key)] += t_us / 1000
            names[ev.key[:120]] += t_us / 1000
    r["kernel_ms_by_category"] = dict(cats)
    r["kernel_ms_total"] = sum(cats.values())
    r["top_kernels_ms"] = dict(sorted(names.items(), key=lambda kv: -kv[1])[:30])
    print(json.dumps(r, indent=1), flush=True)
    return r


if __name__ == "__main__":
    sys.exit(main())
