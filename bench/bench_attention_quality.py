"""How far the DiT's fast self-attention kernels and FP8 linears move the stream, and how much faster they are, DiT
only.

    python bench/bench_attention_quality.py out.json                        # 1.3B, 480x832, 30 blocks (GPU)
    python bench/bench_attention_quality.py out.json --device cpu --tiny    # a smoke test of the script
    python bench/bench_attention_quality.py out.json --ref fa3 --paths fa3+fp8,fa3_fp8+fp8   # FP8 linears

Same model (Wan2.1-1.3B shape, random weights `init_random_`, bf16), same text features, same noise per block
(seeded by block index) for every kernel. The reference is `--ref` (sdpa: PyTorch's choice, cuDNN on Hopper; or
cudnn). For each kernel of `--paths` (fa3, fa3_fp8, ...), over a `--blocks`-block stream (7 filling blocks, then the
21-frame cache rolling):
  * free: the kernel's own stream (its own KV cache all along): the relative L2 error of each block's clean latents
    against the reference's, so errors that compound through the cache are in it;
  * forced: before every block the kernel's cache is set to the reference's, so the error is that of one block;
  * decoded: PSNR of the free stream's frames against the reference's, both through a TAEHV decoder with random
    weights (frames in [-1, 1], peak-to-peak 2), one streaming decoder per stream.
A path `KERNEL+fp8` runs that kernel with the block linear layers in FP8 (reactor_graph/models/fp8_linear.py: e4m3
weights, activations quantised per token by the kernels that make them) on a converted copy of the same model; with
`--ref fa3` the error of `fa3+fp8` is the FP8 linears' alone. `--no-forced` skips the forced streams (half the
time).
Then DiT-only speed: one rolling block (the fullest cache: the endless stream's every block) captured in a CUDA graph
per kernel (eager kernels, no inductor) and replayed `--time-blocks` times: ms a block and the ratio to the reference.
Engine figures (compiled regions, the whole graph) are bench_self_forcing.py --attentions.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON report path")
    ap.add_argument("--paths", default="fa3,fa3_fp8", help="kernels to compare with the reference; fp8_ref: the "
                    "torch reference of FP8 attention (fa3_fp8's e4m3 inputs, dequantised, through SDPA), any device; "
                    "KERNEL+fp8: that kernel with the block linears in FP8")
    ap.add_argument("--no-forced", action="store_true", help="skip the forced streams (the one-block errors)")
    ap.add_argument("--ref", default="sdpa", help="reference kernel (sdpa or an SDPA backend: cudnn, flash, math)")
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--time-blocks", type=int, default=10, help="replays of the captured rolling block (0: none)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--latent-size", type=int, nargs=2, default=(60, 104))
    ap.add_argument("--max-frames", type=int, default=21)
    ap.add_argument("--fp8-scale", choices=["head", "tensor"], default="head")
    ap.add_argument("--no-decode", action="store_true", help="skip the decoded-frame PSNR")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny config on a small latent (a smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


class Stream:
    """One generator (the shared model, its own cache) and one decoder, with a kernel."""

    def __init__(self, name, path, attn, model, cfg, args, dtype, decoder):
        from reactor_graph.models.wan_dit import BlockCausalWan, FlowMatchSchedule, KVCache

        self.name, self.path, self.attn = name, path, attn
        self.cache = KVCache(cfg, batch_size=1, latent_hw=tuple(args.latent_size), max_frames=args.max_frames,
                             frames_per_block=3, rolling=True, dtype=dtype, device=args.device)
        self.gen = BlockCausalWan(model, self.cache, FlowMatchSchedule.self_forcing())
        self.decoder = copy.deepcopy(decoder) if decoder is not None else None

    def sdpa_context(self):
        import contextlib

        from torch.nn.attention import SDPBackend, sdpa_kernel

        from reactor_graph.models.attention import SDPA_BACKENDS

        b = SDPA_BACKENDS.get(self.path)
        return sdpa_kernel([getattr(SDPBackend, b)]) if b else contextlib.nullcontext()

    def block(self, noise, context, phase):
        self.gen.model.attn = self.attn
        with self.sdpa_context():
            return self.gen.generate_block(noise, context, phase)

    def copy_cache_from(self, other: "Stream") -> None:
        for a, b in ((self.cache.kv, other.cache.kv), (self.cache.latents, other.cache.latents),
                     (self.cache.cross, other.cache.cross), (self.cache.frame_offset, other.cache.frame_offset)):
            a.copy_(b)
        if self.cache.fp8 is not None:  # an FP8 kernel's e4m3 copy of the cache: quantised afresh from it
            self.cache.fp8.refresh_()

    def decode(self, x0):
        if self.decoder is None:
            return None
        return self.decoder.decode_block(x0.permute(0, 2, 1, 3, 4).to(next(self.decoder.parameters()).dtype))


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def psnr(a, b) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def time_rolling_block(stream: Stream, noise, replays: int) -> dict:
    """A rolling block captured in a CUDA graph and replayed (each replay rolls the cache on: a steady stream)."""
    import torch

    phase = stream.gen.phase_for_block(10**6)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        stream.block(noise, None, phase)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    stream.gen.model.attn = stream.attn
    with stream.sdpa_context(), torch.cuda.graph(graph):
        stream.gen.generate_block(noise, None, phase)
    graph.replay()
    torch.cuda.synchronize()
    ms = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    del graph
    ms.sort()
    return {"ms_p50": ms[len(ms) // 2], "ms_min": ms[0], "ms_max": ms[-1], "replays": replays}


def main() -> int:
    args = parse()
    import torch

    from reactor_graph.models.attention import (Fp8ReferenceAttention, fa3_unavailable, make_attention,
                                                 resolve_attention)
    from reactor_graph.models.fp8_linear import convert_linears_, fp8_matmul_unavailable
    from reactor_graph.models.taehv import TAEHVDecoder
    from reactor_graph.models.wan_dit import WanConfig, WanDiT, init_random_

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        say("no CUDA device here")
        return 2
    dtype = torch.bfloat16
    cfg = WanConfig.tiny() if args.tiny else WanConfig.wan_1_3b()
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    if args.tiny and tuple(args.latent_size) == (60, 104):
        args.latent_size = (8, 8)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    say(f"torch {torch.__version__}, {name}; fa3: {fa3_unavailable(dev) or 'available'}")
    with torch.device("meta"):
        model = WanDiT(cfg).to(dtype)
    model.to_empty(device=dev)
    init_random_(model, seed=args.seed)
    model.eval().requires_grad_(False)
    decoder = None
    if not args.no_decode:
        torch.manual_seed(args.seed)
        chans = (32, 16, 8, 8) if args.tiny else (256, 128, 64, 64)
        decoder = TAEHVDecoder(channels=chans).to(dev, dtype).eval().requires_grad_(False)

    report = {"device_name": name, "torch": torch.__version__, "args": vars(args), "config": dataclasses.asdict(cfg),
              "ref": args.ref, "paths": {}, "errors": {}}
    ref_path = resolve_attention(args.ref, dev)
    ref = Stream("ref", ref_path, make_attention(ref_path), model, cfg, args, dtype, decoder)
    streams = []
    fp8_model = None  # one FP8 copy of the model for every `+fp8` path
    for p in [p.strip() for p in args.paths.split(",") if p.strip()]:
        kernel, _, linears = p.partition("+")
        linears = linears or "bf16"
        try:
            if linears not in ("bf16", "fp8"):
                raise ValueError(f"linears {linears!r}: bf16 or fp8")
            if linears == "fp8" and fp8_matmul_unavailable(dev):
                raise ValueError(f"linears: fp8: {fp8_matmul_unavailable(dev)}")
            path = kernel if kernel == "fp8_ref" else resolve_attention(kernel, dev)
        except ValueError as exc:
            report["errors"][p] = str(exc)
            say(f"{p}: skipped: {exc}")
            continue
        attn = make_attention(path, args.fp8_scale) if path != "fp8_ref" else Fp8ReferenceAttention(args.fp8_scale)
        if linears == "fp8" and fp8_model is None:
            fp8_model = copy.deepcopy(model)
            convert_linears_(fp8_model)
        m = fp8_model if linears == "fp8" else model
        streams.append((p, Stream(f"{p} free", path, attn, m, cfg, args, dtype, decoder),
                        None if args.no_forced else Stream(f"{p} forced", path, attn, m, cfg, args, dtype, None)))
        report["paths"][p] = {"path": path, "linears": linears, "free_rel_l2": [], "forced_rel_l2": [],
                              "psnr_db": []}

    g = torch.Generator().manual_seed(args.seed)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(dev, dtype)
    h, w = args.latent_size
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(args.blocks):
            gb = torch.Generator().manual_seed(1000 + i)
            noise = torch.randn(4, 1, cfg.in_dim, 3, h, w, generator=gb).to(dev, dtype)
            phase = ref.gen.phase_for_block(i)
            ctx = context if i == 0 else None
            for _, _, forced in streams:  # the reference's cache before this block
                if forced is not None:
                    forced.copy_cache_from(ref)
            x_ref = ref.block(noise, ctx, phase)
            f_ref = ref.decode(x_ref)
            for p, free, forced in streams:
                r = report["paths"][p]
                x_free = free.block(noise, ctx, phase)
                r["free_rel_l2"].append(rel_l2(x_free, x_ref))
                if forced is not None:
                    r["forced_rel_l2"].append(rel_l2(forced.block(noise, ctx if i == 0 else None, phase), x_ref))
                if f_ref is not None:
                    r["psnr_db"].append(psnr(free.decode(x_free), f_ref))
            say(f"block {i + 1}/{args.blocks} ({phase.name}): " + "; ".join(
                f"{p} free {report['paths'][p]['free_rel_l2'][-1]:.4f}"
                + (f" forced {report['paths'][p]['forced_rel_l2'][-1]:.4f}"
                   if report['paths'][p]['forced_rel_l2'] else "")
                + (f" psnr {report['paths'][p]['psnr_db'][-1]:.1f} dB" if report['paths'][p]['psnr_db'] else "")
                for p, _, _ in streams))
            out.write_text(json.dumps(report, indent=2))  # a run cut short keeps the blocks it measured
    report["stream_s"] = time.perf_counter() - t
    for p, r in report["paths"].items():
        r["free_rel_l2_max"] = max(r["free_rel_l2"], default=None)
        r["forced_rel_l2_max"] = max(r["forced_rel_l2"], default=None)
        r["psnr_db_min"] = min(r["psnr_db"], default=None)
    out.write_text(json.dumps(report, indent=2))

    if args.time_blocks and dev.type == "cuda":
        gb = torch.Generator().manual_seed(7)
        noise = torch.randn(4, 1, cfg.in_dim, 3, h, w, generator=gb).to(dev, dtype)
        with torch.inference_mode():
            report["ref_timing"] = time_rolling_block(ref, noise, args.time_blocks)
            say(f"ref {ref_path}: rolling block {report['ref_timing']['ms_p50']:.1f} ms (DiT, captured)")
            for p, free, _ in streams:
                try:
                    tm = time_rolling_block(free, noise, args.time_blocks)
                except Exception as exc:  # keep the other kernels' figures
                    report["errors"][f"{p} timing"] = f"{type(exc).__name__}: {exc}"
                    say(f"{p} timing failed: {type(exc).__name__}: {exc}")
                    continue
                tm["speedup"] = report["ref_timing"]["ms_p50"] / tm["ms_p50"]
                report["paths"][p]["timing"] = tm
                say(f"{p}: rolling block {tm['ms_p50']:.1f} ms (DiT, captured), {tm['speedup']:.3f}x the reference")
        out.write_text(json.dumps(report, indent=2))
    for p, r in report["paths"].items():
        say(f"== {p} ({r['path']}, linears {r['linears']}) vs {ref_path}: latent rel L2 free max "
            f"{r['free_rel_l2_max']:.4f} (last {r['free_rel_l2'][-1]:.4f})"
            + (f", forced max {r['forced_rel_l2_max']:.4f}" if r["forced_rel_l2"] else "")
            + (f", decoded PSNR min {r['psnr_db_min']:.1f} dB" if r["psnr_db"] else "")
            + (f", DiT rolling block {r['timing']['ms_p50']:.1f} ms ({r['timing']['speedup']:.3f}x)"
               if "timing" in r else ""))
    say(f"wrote {out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
