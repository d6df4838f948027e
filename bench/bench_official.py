"""The OFFICIAL Self-Forcing DiT next to ours: same weights, same inputs, per-block time and agreement.

    python bench/bench_official.py --official-src DIR out.json                  # 1.3B, 480x832, on the GPU
    python bench/bench_official.py --official-src DIR out.json --modes official_compile
    python bench/bench_official.py --official-src DIR out.json --tiny --device cpu   # a smoke test

DIR is a local checkout of github guandeh17/Self-Forcing (the user's; nothing is downloaded, nothing of it is in
this repository; bench/official_self_forcing.py says what is imported and what is stubbed).

The block: the last one of Self-Forcing's 81-frame clip, 3 latent frames [18, 21) against a KV cache holding the 18
before it (the fullest cache their inference reaches: global attention over the 21-frame clip, local_attn_size -1),
4 denoising steps at the warped timesteps (1000, 937.5, 833.3, 625) + the pass that caches the clean latents at
timestep 0, as their CausalInferencePipeline.inference does. 480x832 -> latents [16, 3, 60, 104], 4680 tokens a block.
Weights: our WanDiT (Wan2.1-1.3B shape) with seeded random weights (`init_random_`), loaded by name into their
CausalWanModel; bf16 on both sides. Inputs: one set of T5 features [1, 512, 4096] and one noise per step, seeded.
The 18 cached frames are made by OUR model (6 filling blocks) and copied into their cache dicts, so both read the
same cache.

Modes (`--modes`, in this order whatever the order given)
    official_eager     their model as their inference runs it (the DiT calls; the sampler arithmetic is shared)
    ours_eager         BlockCausalWan.generate_block at that phase
    ours_cudagraph     our engine's DiT path: the layers' qkv/finish pieces torch.compile'd (as the
                       wan_causal_dit node's `compile: regional`), the whole block captured in one CUDA graph
    official_compile   their model through nn.Module.compile(mode=--compile-mode), as their demo.py does
                       (`transformer.compile(mode="max-autotune-no-cudagraphs")`); their .item() calls break graphs
    ours_graph         as ours_cudagraph without inductor (eager kernels captured in a CUDA graph)
    ours_rolling       as ours_cudagraph in OUR endless stream's rolling phase (the cache rolled in place before
                       the block, which takes the same last slot): no official counterpart (their inference stops
                       at the 21-frame clip); run last, it moves our cache away from theirs
    ours_fast          as ours_cudagraph on the fast path: self-attention fa3_fp8 on the e4m3 cache copy, the block
                       linears in FP8 (models/fp8_linear.py); after every other mode, since it converts our model
Each mode: `--warmup` blocks, then `--blocks` timed blocks (CUDA events, synchronised after each block); p50/min/max.

Agreement (same noise, timesteps, text features, cache): relative L2 of ours against theirs for the first step's
flow (one DiT call), the block's x0 (all 4 steps), and the keys/values the block caches (max over layers); plus each
compiled/captured mode against its eager one. Their residual stream is bf16, ours float32 (Wan's): in float32
both agree to ~1e-7 (tests/models/test_official_self_forcing.py), so the bf16 figure is that precision gap.
`--fp32-check` repeats the step-0 call at full size with float32 copies of both models (the same cache and inputs,
upcast), and reports how far each bf16 side is from its float32 result.

The JSON is written after each mode. `--attention fa3`: FlashAttention-3 (fa3_fwd) for both sides' attention
(theirs self- and cross-attention, ours self-attention), instead of SDPA.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
MODES = ("official_eager", "ours_eager", "ours_cudagraph", "official_compile", "ours_graph", "ours_rolling", "ours_fast")
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON report path")
    ap.add_argument("--official-src", required=True, help="local checkout of github guandeh17/Self-Forcing")
    ap.add_argument("--modes", default="official_eager,ours_eager,ours_cudagraph",
                    help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--attention", choices=["sdpa", "fa3"], default="sdpa")
    ap.add_argument("--compile-mode", default="default",
                    help="official_compile's torch.compile mode (their demo: max-autotune-no-cudagraphs)")
    ap.add_argument("--blocks", type=int, default=5, help="timed blocks per mode")
    ap.add_argument("--warmup", type=int, default=2, help="blocks before timing (compiles, captures)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a quicker run)")
    ap.add_argument("--latent-size", type=int, nargs=2, default=(60, 104))
    ap.add_argument("--max-frames", type=int, default=21)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny config on an 8x6 latent (a smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32-check", action="store_true", help="also one DiT call of both models in float32 (the same "
                    "weights and cache, upcast): at full size, that the bf16 difference is precision only")
    ap.add_argument("--profile", action="store_true", help="one block of each eager side under torch.profiler: GPU "
                    "time by kernel category and the top kernels (the eager gap, kernel by kernel), into the JSON")
    return ap.parse_args(argv)


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


class Bench:
    def __init__(self, args):
        import torch

        import official_self_forcing as osf
        from reactor_graph.models.attention import Fa3Attention, sdpa_attention
        from reactor_graph.models.wan_dit import (BlockCausalWan, FlowMatchSchedule, KVCache, WanConfig, WanDiT,
                                                   init_random_)

        self.args, self.torch, self.osf = args, torch, osf
        self._regions = None
        self.dev = dev = torch.device(args.device)
        self.dtype = dtype = torch.bfloat16
        self.off = osf.load_official(args.official_src, args.attention)
        cfg = WanConfig.tiny() if args.tiny else WanConfig.wan_1_3b()
        if args.layers:
            cfg = dataclasses.replace(cfg, num_layers=args.layers)
        if args.tiny and tuple(args.latent_size) == (60, 104):
            args.latent_size = (8, 6)
        self.cfg = cfg
        h, w = args.latent_size
        fpb = 3
        with torch.device("meta"):
            ours = WanDiT(cfg).to(dtype)
        ours.to_empty(device=dev)
        init_random_(ours, seed=args.seed)
        self.ours = ours.eval().requires_grad_(False)
        if args.attention == "fa3":
            self.ours.attn = Fa3Attention()
        else:
            self.ours.attn = sdpa_attention
        self.theirs = osf.build_official(self.off, cfg, self.ours, dev, dtype)
        self.cache = KVCache(cfg, batch_size=1, latent_hw=(h, w), max_frames=args.max_frames, frames_per_block=fpb,
                             rolling=True, dtype=dtype, device=dev)
        self.gen = BlockCausalWan(self.ours, self.cache, FlowMatchSchedule.self_forcing())
        self.ocache = osf.OfficialCache(cfg, batch_size=1, tokens_per_frame=self.cache.tokens_per_frame,
                                        max_frames=args.max_frames, dtype=dtype, device=dev)
        # the last block of the clip, frames [max_frames - 3, max_frames): the last filling phase
        self.phase = self.cache.phases()[self.cache.num_blocks - 1]
        self.start = self.phase.start_frame
        g = torch.Generator().manual_seed(args.seed + 1)
        self.context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(dev, dtype)
        self.noise = torch.randn(4, 1, cfg.in_dim, fpb, h, w, generator=g).to(dev, dtype)
        self.prefix_noise = [torch.randn(4, 1, cfg.in_dim, fpb, h, w, generator=g).to(dev, dtype)
                             for _ in range(self.phase.index)]

    # -- state

    def fill_prefix(self) -> None:
        """Our model makes the blocks before the timed one; their cache gets the same keys/values."""
        torch = self.torch
        with torch.inference_mode():
            self.gen.set_context(self.context)
            for i, noise in enumerate(self.prefix_noise):
                self.gen.generate_block(noise, None, self.cache.phases()[i])
            n = self.phase.cache_start
            for i, c in enumerate(self.ocache.kv):
                c["k"][:, :n].copy_(self.cache.kv[i, 0, :, :n])
                c["v"][:, :n].copy_(self.cache.kv[i, 1, :, :n])
        self.sync()

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    # -- one block, each side

    def official_block(self):
        self.ocache.set_end(self.start)
        return self.osf.official_block(self.theirs, self.ocache, self.noise, self.context, self.start,
                                       self.gen.schedule)

    def ours_block(self, phase=None):
        return self.gen.generate_block(self.noise, None, phase or self.phase)

    def slot(self):
        n0, n1 = self.phase.cache_start, self.phase.cache_start + self.cache.block_tokens
        return n0, n1

    # -- agreement

    def agreement(self) -> dict:
        torch = self.torch
        out = {}
        with torch.inference_mode():
            self.ocache.set_end(self.start)
            t0 = self.gen.step_timestep(0)
            f_ours = self.ours.forward_block(self.noise[0], t0, None, self.cache, self.phase.cache_start)
            f_theirs = self.osf.official_forward(self.theirs, self.ocache, self.noise[0], t0.float(),
                                                 self.context, self.start)
            out["flow_step0_rel_l2"] = rel_l2(f_ours, f_theirs)
            self.f_ours, self.f_theirs = f_ours.clone(), f_theirs.clone()
            x_theirs = self.official_block()
            x_ours = self.ours_block()
            out["x0_rel_l2"] = rel_l2(x_ours, x_theirs)
            n0, n1 = self.slot()
            L = self.cfg.num_layers
            out["cache_k_rel_l2_max"] = max(rel_l2(self.cache.kv[i, 0, :, n0:n1], self.ocache.kv[i]["k"][:, n0:n1])
                                            for i in range(L))
            out["cache_v_rel_l2_max"] = max(rel_l2(self.cache.kv[i, 1, :, n0:n1], self.ocache.kv[i]["v"][:, n0:n1])
                                            for i in range(L))
            out["x0_norm"] = x_theirs.norm().item()
        self.x_ours, self.x_theirs = x_ours.clone(), x_theirs.clone()
        return out

    def fp32_check(self) -> dict:
        """The step-0 DiT call of float32 copies of both models on float32 copies of the cache and inputs."""
        import copy

        torch = self.torch
        from reactor_graph.models.wan_dit import BlockCausalWan, KVCache

        f32 = torch.float32
        ours = copy.deepcopy(self.ours).float()
        theirs = self.osf.build_official(self.off, self.cfg, ours, self.dev, f32)
        cache = KVCache(self.cfg, batch_size=1, latent_hw=self.cache.latent_hw, max_frames=self.cache.max_frames,
                        frames_per_block=3, rolling=True, dtype=f32, device=self.dev)
        oc = self.osf.OfficialCache(self.cfg, batch_size=1, tokens_per_frame=self.cache.tokens_per_frame,
                                    max_frames=self.cache.max_frames, dtype=f32, device=self.dev)
        n = self.phase.cache_start
        ctx = self.context.float()
        with torch.inference_mode():
            cache.kv[..., :n, :, :].copy_(self.cache.kv[..., :n, :, :])
            for i, c in enumerate(oc.kv):
                c["k"][:, :n].copy_(cache.kv[i, 0, :, :n])
                c["v"][:, :n].copy_(cache.kv[i, 1, :, :n])
            BlockCausalWan(ours, cache).set_context(ctx)
            oc.set_end(self.start)
            t0 = self.gen.step_timestep(0)
            f_ours = ours.forward_block(self.noise[0].float(), t0, None, cache, n)
            f_theirs = self.osf.official_forward(theirs, oc, self.noise[0].float(), t0.float(), ctx, self.start)
            r = {"fp32_flow_step0_rel_l2": rel_l2(f_ours, f_theirs),
                 "fp32_vs_bf16_ours_flow_rel_l2": rel_l2(self.f_ours, f_ours),
                 "fp32_vs_bf16_official_flow_rel_l2": rel_l2(self.f_theirs, f_theirs)}
        del ours, theirs, cache, oc
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        return r

    # -- timing

    def time(self, block, n: int, warmup: int) -> dict:
        torch = self.torch
        ms = []
        with torch.inference_mode():
            for _ in range(warmup):
                block()
            self.sync()
            for _ in range(n):
                if self.dev.type == "cuda":
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    x = block()
                    b.record()
                    b.synchronize()
                    ms.append(a.elapsed_time(b))
                else:
                    t = time.perf_counter()
                    x = block()
                    ms.append((time.perf_counter() - t) * 1e3)
        s = sorted(ms)
        return {"ms_p50": s[len(s) // 2], "ms_min": s[0], "ms_max": s[-1], "ms": ms, "blocks": n, "warmup": warmup,
                "_x": x}

    def captured(self, regional: bool, phase=None):
        """Our block captured in one CUDA graph (regional: the layers' pieces compiled first, as the engine)."""
        torch = self.torch
        from reactor_graph.models.wan_dit import WanBlock

        if regional:
            from reactor_graph.compile import compile_function

            if self._regions is None:  # once: a new torch.compile wrapper would compile again
                self._regions = (compile_function(WanBlock.qkv, "inductor"),
                                 compile_function(WanBlock.finish, "inductor"))
            qkv, finish = self._regions
            for blk in self.ours.blocks:
                blk.qkv = (lambda *a, _b=blk, **k: qkv(_b, *a, **k))
                blk.finish = (lambda *a, _b=blk, **k: finish(_b, *a, **k))
        t = time.perf_counter()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(s):
            for _ in range(max(1, self.args.warmup)):
                self.ours_block(phase)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode():
            with torch.cuda.graph(graph):
                out = self.ours_block(phase)
        self.sync()
        setup_s = time.perf_counter() - t

        def replay():
            graph.replay()
            return out

        return replay, graph, setup_s

    def profile(self, block) -> dict:
        """One block under torch.profiler (after one unprofiled): kernel time by category, top kernels."""
        torch = self.torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
        with torch.inference_mode():
            block()
            self.sync()
            with profile(activities=acts) as prof:
                t = time.perf_counter()
                block()
                self.sync()
                wall = (time.perf_counter() - t) * 1e3
        rows = []
        for e in prof.key_averages():
            if "CUDA" not in str(getattr(e, "device_type", "")):
                continue
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0) if us is None else us
            if us > 0:
                rows.append((e.key, us / 1e3, e.count))
        rows.sort(key=lambda r: -r[1])
        cats: dict[str, float] = {}
        for name, ms, _ in rows:
            cats[kernel_category(name)] = cats.get(kernel_category(name), 0.0) + ms
        return {"wall_ms": wall, "gpu_kernel_ms": sum(r[1] for r in rows), "kernel_launches": sum(r[2] for r in rows),
                "by_category_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
                "top": [[n[:160], round(ms, 3), c] for n, ms, c in rows[:40]]}

    def uncompile_ours(self) -> None:
        for blk in self.ours.blocks:
            blk.__dict__.pop("qkv", None)
            blk.__dict__.pop("finish", None)


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "sdpa", "attention", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "gemv")):
        return "gemm"
    if any(k in n for k in ("copy", "memcpy", "memset", "catarray", "fill")):
        return "copy/cat/fill"
    if any(k in n for k in ("norm", "reduce", "softmax")):
        return "norm/reduce"
    if any(k in n for k in ("elementwise", "vectorized", "unrolled", "triton")):
        return "elementwise"
    return "other"


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown modes {bad}; choose from {', '.join(MODES)}")
    modes = [m for m in MODES if m in modes]
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        say("no CUDA device here (use --device cpu --tiny for a smoke test)")
        return 2
    src = Path(args.official_src)
    commit = (src / "COMMIT").read_text().strip() if (src / "COMMIT").is_file() else None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    say(f"torch {torch.__version__}, {name}; official source {src} (commit {commit})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device_name": name, "torch": torch.__version__, "args": vars(args), "official_commit": commit,
              "modes": {}, "errors": {}}

    def write():
        out.write_text(json.dumps(report, indent=2, default=str))

    t = time.perf_counter()
    b = Bench(args)
    report.update(official_stubs=b.off.stubs, config=dataclasses.asdict(b.cfg), dtype=str(b.dtype),
                  latents=[b.cfg.in_dim, 3, *args.latent_size], block_tokens=b.cache.block_tokens,
                  cache_tokens=b.phase.cache_start + b.cache.block_tokens, phase=b.phase.name)
    say(f"models built ({time.perf_counter() - t:.1f} s); stubs: {'; '.join(b.off.stubs)}")
    b.fill_prefix()
    say(f"prefix: {b.phase.index} blocks made by our model, copied into their cache")
    report["agreement"] = b.agreement()
    say("agreement (ours vs official, bf16): " + ", ".join(f"{k} {v:.3g}" for k, v in report["agreement"].items()))
    write()
    if args.fp32_check:
        try:
            report["agreement"].update(b.fp32_check())
            say("fp32 check: " + ", ".join(f"{k} {v:.3g}" for k, v in report["agreement"].items() if "fp32" in k))
        except Exception as exc:
            report["errors"]["fp32_check"] = f"{type(exc).__name__}: {exc}"
            say(f"fp32 check FAILED: {type(exc).__name__}: {exc}")
        write()

    if args.profile:
        for side, block in (("official_eager", b.official_block), ("ours_eager", b.ours_block)):
            try:
                p = report.setdefault("profile", {})[side] = b.profile(block)
                cats = ", ".join(f"{k} {v:.1f}" for k, v in p["by_category_ms"].items())
                say(f"profile {side}: wall {p['wall_ms']:.1f} ms, kernels {p['gpu_kernel_ms']:.1f} ms in "
                    f"{p['kernel_launches']} launches; {cats}")
            except Exception as exc:
                report["errors"][f"profile {side}"] = f"{type(exc).__name__}: {exc}"
                say(f"profile {side} FAILED: {type(exc).__name__}: {exc}")
        write()

    for mode in modes:
        try:
            if mode in ("ours_cudagraph", "ours_graph", "ours_rolling") and dev.type != "cuda":
                raise RuntimeError("needs CUDA")
            extra = {}
            if mode == "official_eager":
                r = b.time(b.official_block, args.blocks, args.warmup)
                ref = b.x_theirs
            elif mode == "ours_eager":
                r = b.time(b.ours_block, args.blocks, args.warmup)
                ref = b.x_ours
            elif mode == "ours_fast":  # the fast path (last: it converts our model for good)
                if dev.type != "cuda":
                    raise RuntimeError("needs CUDA")
                from reactor_graph.models.attention import make_attention
                from reactor_graph.models.fp8_linear import convert_linears_

                b.ours.attn = make_attention("fa3_fp8")
                b.cache.fp8_for(b.ours.attn)  # the e4m3 cache copy, from the prefix our model made
                convert_linears_(b.ours)
                b._regions = None  # compile the converted layers afresh
                replay, graph, setup_s = b.captured(regional=True)
                extra["compile_and_capture_s"] = setup_s
                r = b.time(replay, args.blocks, 1)
                del graph
                ref = b.x_ours
            elif mode in ("ours_cudagraph", "ours_graph", "ours_rolling"):
                rolling = b.cache.phases()[-1] if mode == "ours_rolling" else None
                replay, graph, setup_s = b.captured(regional=mode != "ours_graph", phase=rolling)
                extra["compile_and_capture_s"] = setup_s
                r = b.time(replay, args.blocks, 1)
                del graph
                ref = None if rolling else b.x_ours
            else:  # official_compile
                import torch._dynamo

                for k in ("recompile_limit", "cache_size_limit"):
                    if hasattr(torch._dynamo.config, k):
                        setattr(torch._dynamo.config, k, max(getattr(torch._dynamo.config, k), 256))
                b.theirs.compile(mode=None if args.compile_mode == "default" else args.compile_mode)
                t = time.perf_counter()
                with torch.inference_mode():
                    b.official_block()
                b.sync()
                extra["first_block_s"] = time.perf_counter() - t
                r = b.time(b.official_block, args.blocks, max(0, args.warmup - 1))
                ref = b.x_theirs
            x = r.pop("_x")
            r.update(extra, vs_eager_x0_rel_l2=None if ref is None else rel_l2(x, ref))
            report["modes"][mode] = r
            say(f"{mode}: {r['ms_p50']:.1f} ms a block (min {r['ms_min']:.1f}, max {r['ms_max']:.1f}); "
                f"x0 vs its eager side {r['vs_eager_x0_rel_l2']}"
                + "".join(f", {k} {v:.1f}" for k, v in extra.items()))
        except Exception as exc:  # keep the other modes' figures
            report["errors"][mode] = f"{type(exc).__name__}: {exc}"
            say(f"{mode} FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        finally:
            b.uncompile_ours()  # the next mode runs our plain layers whatever this one left
        write()

    ms = {m: r["ms_p50"] for m, r in report["modes"].items()}
    ratios = {}
    for a, c in (("official_eager", "ours_eager"), ("official_eager", "ours_cudagraph"),
                 ("official_compile", "ours_cudagraph"), ("official_eager", "official_compile"),
                 ("ours_eager", "ours_cudagraph"), ("official_eager", "ours_graph"), ("official_eager", "ours_fast"),
                 ("official_compile", "ours_fast"), ("ours_cudagraph", "ours_fast")):
        if a in ms and c in ms:
            ratios[f"{a}/{c}"] = ms[a] / ms[c]
    report["ratios"] = ratios
    write()
    say("== per block (ms p50): " + ", ".join(f"{m} {v:.1f}" for m, v in ms.items()))
    say("== ratios (>1: the second is faster): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    say(f"== agreement: x0 rel L2 {report['agreement']['x0_rel_l2']:.3g}, step-0 flow "
        f"{report['agreement']['flow_step0_rel_l2']:.3g}, cached k/v {report['agreement']['cache_k_rel_l2_max']:.3g}"
        f"/{report['agreement']['cache_v_rel_l2_max']:.3g}")
    say(f"wrote {out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
