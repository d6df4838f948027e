"""One Wan DiT layer's linear layers, bf16 against FP8 with the quantisation included: ms, and the error.

    python bench/bench_fp8_linears.py out.json                       # 1.3B layer, 4680 tokens (a 3-frame block)
    python bench/bench_fp8_linears.py out.json --device cpu --tokens 96 --dim 128 --ffn 256 --reps 2   # smoke test

A layer of the 1.3B DiT (random weights, `init_random_`) on one block's tokens (3 latent frames of 60x104 -> 4680).
Each piece is captured in a CUDA graph `--reps` times over and replayed; ms is a replay / reps (eager kernels, no
inductor), the median of `--replays`:
  bf16:  q, k, v (one modulated input), o, cross q, cross o, FFN (first matmul with cuBLASLt's GELU epilogue, as the
         DiT runs it), second FFN matmul; and, for what the fused kernels replace, the three LayerNorm(+modulate)
         -> bf16 steps compiled by inductor as the DiT's regions compile them (`--no-inductor` skips it).
  fp8:   the same linears as `Fp8Linear`s plus every quantisation: modulate_quant (LayerNorm + modulation + e4m3,
         twice), layernorm_quant (cross-attention q), the per-row quantisation of the two attention outputs, and
         bias + GELU + e4m3 between the FFN matmuls; with and without `use_fast_accum`.
Totals per layer, and x `--calls` (149: 4 denoising passes x 30 layers + the cache pass's 29) for a block's worth.
Errors: rel L2 of each FP8 output against the bf16 one on the same inputs.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import graph_ms  # noqa: E402

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=4680)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--ffn", type=int, default=8960)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--reps", type=int, default=20, help="calls per captured graph")
    ap.add_argument("--replays", type=int, default=7)
    ap.add_argument("--calls", type=int, default=149, help="layer calls per Self-Forcing block")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--device", default="cuda")
    return ap.parse_args()


def timer(device):
    import torch

    def ms(fn, reps, replays) -> float:
        if device.type != "cuda":
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t) * 1000 / reps
        return graph_ms(fn, reps, replays)

    return ms


def main() -> int:
    args = parse()
    import torch

    from reactor_graph.models import fp8_linear as fl
    from reactor_graph.models.wan_dit import WanBlock, WanConfig, _modulate

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        say("no CUDA device here")
        return 2
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    say(f"torch {torch.__version__}, {name}; {args.tokens} tokens, dim {args.dim}, ffn {args.ffn}")
    cfg = WanConfig(dim=args.dim, ffn_dim=args.ffn, num_heads=args.heads, num_layers=1)
    torch.manual_seed(0)
    with torch.device(dev):
        blk = WanBlock(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in blk.named_parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            elif "bias" in n:
                p.normal_(0, 0.02)
    blk.eval().requires_grad_(False)
    f8 = copy.deepcopy(blk)
    for path in fl.FP8_LINEARS:
        fl._set(f8, path, fl.Fp8Linear.from_linear(fl._get(f8, path)))
    b, L, d, f = 1, args.tokens, args.dim, args.frames
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(b, L, d, generator=g) * 2).to(dev)  # the float32 residual stream
    m = (torch.randn(b, f, 6, d, generator=g) * 0.3).to(dev)
    att = torch.randn(b, L, d, generator=g).to(dev, torch.bfloat16)  # attention outputs, [B, L, H*D]
    cro = torch.randn(b, L, d, generator=g).to(dev, torch.bfloat16)
    ms = timer(dev)
    R, P = args.reps, args.replays
    rep: dict = {"device_name": name, "torch": torch.__version__, "args": vars(args), "bf16": {}, "fp8": {},
                 "fp8_fast_accum": {}, "error": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sa, ca, ffn = blk.self_attn, blk.cross_attn, blk.ffn
    eps = blk.norm1.eps

    with torch.no_grad():
        # inputs of the bf16 linears, made once (their cost is the norm row below)
        h1 = _modulate(blk.norm1(x), m[:, :, 0:1], m[:, :, 1:2], f).to(torch.bfloat16)
        h3 = blk.norm3(x).to(torch.bfloat16)
        h2 = _modulate(blk.norm2(x), m[:, :, 3:4], m[:, :, 4:5], f).to(torch.bfloat16)
        hid = torch.nn.functional.gelu(ffn[0](h2), approximate="tanh")

        def ffn0_bf16():
            if dev.type == "cuda":
                return torch._addmm_activation(ffn[0].bias, h2.view(-1, d), ffn[0].weight.t(), use_gelu=True)
            return torch.nn.functional.gelu(ffn[0](h2), approximate="tanh")

        bf16 = {"q": lambda: sa.q(h1), "k": lambda: sa.k(h1), "v": lambda: sa.v(h1), "o": lambda: sa.o(att),
                "cross_q": lambda: ca.q(h3), "cross_o": lambda: ca.o(cro), "ffn0_gelu": ffn0_bf16,
                "ffn2": lambda: ffn[2](hid)}
        for k, fn in bf16.items():
            rep["bf16"][k] = ms(fn, R, P)
        rep["bf16"]["linears_total"] = sum(rep["bf16"].values())
        say("bf16 ms: " + ", ".join(f"{k} {v:.3f}" for k, v in rep["bf16"].items()))
        out.write_text(json.dumps(rep, indent=2))

        if not args.no_inductor and dev.type == "cuda":
            def norms(x, m):
                return (_modulate(blk.norm1(x), m[:, :, 0:1], m[:, :, 1:2], f).to(torch.bfloat16),
                        blk.norm3(x).to(torch.bfloat16),
                        _modulate(blk.norm2(x), m[:, :, 3:4], m[:, :, 4:5], f).to(torch.bfloat16))

            t = time.perf_counter()
            cn = torch.compile(norms, dynamic=False)
            cn(x, m)
            rep["bf16"]["norms_inductor"] = ms(lambda: cn(x, m), R, P)
            rep["bf16"]["total_with_norms"] = rep["bf16"]["linears_total"] + rep["bf16"]["norms_inductor"]
            say(f"bf16 norms (inductor, compiled in {time.perf_counter() - t:.0f}s): "
                f"{rep['bf16']['norms_inductor']:.3f} ms")
            out.write_text(json.dumps(rep, indent=2))

        # FP8: inputs quantised by the fused kernels (timed separately and in the total)
        q1 = fl.modulate_quant(x, m[:, :, 0:1], m[:, :, 1:2], f, eps)
        q3 = fl.layernorm_quant(x, blk.norm3.weight, blk.norm3.bias, eps)
        q2 = fl.modulate_quant(x, m[:, :, 3:4], m[:, :, 4:5], f, eps)
        y0 = f8.ffn[0](q2, bias=False)
        qh = fl.gelu_quant(y0, f8.ffn[0].bias)
        fsa, fca, fff = f8.self_attn, f8.cross_attn, f8.ffn
        quant = {"modulate_quant_1": lambda: fl.modulate_quant(x, m[:, :, 0:1], m[:, :, 1:2], f, eps),
                 "layernorm_quant_3": lambda: fl.layernorm_quant(x, blk.norm3.weight, blk.norm3.bias, eps),
                 "modulate_quant_2": lambda: fl.modulate_quant(x, m[:, :, 3:4], m[:, :, 4:5], f, eps),
                 "quantize_attn_out": lambda: fl.quantize_rows(att),
                 "quantize_cross_out": lambda: fl.quantize_rows(cro),
                 "gelu_quant": lambda: fl.gelu_quant(y0, fff[0].bias)}
        mm = {"q": lambda: fsa.q(q1), "k": lambda: fsa.k(q1), "v": lambda: fsa.v(q1),
              "o": lambda: fsa.o(fl.quantize_rows(att)), "cross_q": lambda: fca.q(q3),
              "cross_o": lambda: fca.o(fl.quantize_rows(cro)), "ffn0": lambda: fff[0](q2, bias=False),
              "ffn2": lambda: fff[2](qh)}
        for k, fn in quant.items():
            rep["fp8"][f"quant:{k}"] = ms(fn, R, P)
        for key in ("fp8", "fp8_fast_accum"):
            for mod in f8.modules():
                if isinstance(mod, fl.Fp8Linear):
                    mod.fast_accum = key == "fp8_fast_accum"
            for k, fn in mm.items():
                rep[key][f"mm:{k}"] = ms(fn, R, P)
            # o and cross_o above include their input's quantisation; the matmuls alone:
            mm_only = sum(v for k, v in rep[key].items() if k.startswith("mm:")) - (
                rep["fp8"]["quant:quantize_attn_out"] + rep["fp8"]["quant:quantize_cross_out"])
            rep[key]["matmuls_total"] = mm_only
            rep[key]["quant_total"] = sum(v for k, v in rep["fp8"].items() if k.startswith("quant:"))
            rep[key]["total"] = rep[key]["matmuls_total"] + rep[key]["quant_total"]

            def layer():  # everything in sequence, as the block runs it
                a1 = fl.modulate_quant(x, m[:, :, 0:1], m[:, :, 1:2], f, eps)
                fsa.q(a1), fsa.k(a1), fsa.v(a1), fsa.o(att)
                fca.q(fl.layernorm_quant(x, blk.norm3.weight, blk.norm3.bias, eps)), fca.o(cro)
                a2 = fl.modulate_quant(x, m[:, :, 3:4], m[:, :, 4:5], f, eps)
                return fff[2](fl.gelu_quant(fff[0](a2, bias=False), fff[0].bias))

            rep[key]["layer_in_sequence"] = ms(layer, R, P)
            say(f"{key} ms: " + ", ".join(f"{k} {v:.3f}" for k, v in rep[key].items()))
            out.write_text(json.dumps(rep, indent=2))
        for mod in f8.modules():
            if isinstance(mod, fl.Fp8Linear):
                mod.fast_accum = False

        def rel(a, b):
            return ((a.float() - b.float()).norm() / b.float().norm()).item()

        rep["error"] = {"q": rel(fsa.q(q1), sa.q(h1)), "o": rel(fsa.o(att), sa.o(att)),
                        "cross_q": rel(fca.q(q3), ca.q(h3)), "cross_o": rel(fca.o(cro), ca.o(cro)),
                        "ffn": rel(fff[2](qh), ffn[2](hid))}
        say("rel L2 error fp8 vs bf16: " + ", ".join(f"{k} {v:.4f}" for k, v in rep["error"].items()))

    base = rep["bf16"].get("total_with_norms", rep["bf16"]["linears_total"])
    for key in ("fp8", "fp8_fast_accum"):
        rep[key]["speedup_vs_bf16"] = base / rep[key]["total"]
    rep["block_estimate_ms"] = {"bf16": base * args.calls, "fp8": rep["fp8"]["total"] * args.calls,
                                "fp8_fast_accum": rep["fp8_fast_accum"]["total"] * args.calls}
    what = "linears + inductor norms" if "total_with_norms" in rep["bf16"] else "linears"
    say(f"per layer: bf16 {base:.3f} ms ({what})"
        f", fp8 {rep['fp8']['total']:.3f} ms incl. quantisation ({rep['fp8']['speedup_vs_bf16']:.2f}x), fast accum "
        f"{rep['fp8_fast_accum']['total']:.3f} ms; x{args.calls} a block: " + ", ".join(
            f"{k} {v:.1f} ms" for k, v in rep["block_estimate_ms"].items()))
    out.write_text(json.dumps(rep, indent=2))
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
