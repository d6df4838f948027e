"""Self-Forcing's configuration at full size on one GPU: eager against cudagraph, per node, frames/s, TTFF.

    python bench/bench_self_forcing.py bench/results/self_forcing_h100.json          # both modes, ~4-7 min
    python bench/bench_self_forcing.py out.json --quick                              # 2 layers: a smoke test
    python bench/bench_self_forcing.py out.json --modes cudagraph                    # one mode per run also works

Loads graphs/self_forcing.yaml (UMT5-XXL -> Wan2.1-1.3B causal DiT, 4 steps, 3 latent frames a block, 21-frame
KV cache, TAEHV, yuv420p emit; 480x832) with every `weights` random (the lead's `--random-weights` convention:
`use_random_weights` in nodes/wan_causal_dit.py), on cuda in bfloat16, and runs
`reactor_graph.bench.run_bench(engine, [mode], blocks, warmup)` once per mode, eager with few blocks (about 0.5 s
a block) and cudagraph with more. The warm-up covers the 7 filling blocks, so the measured blocks are all in the
rolling phase: the cost of every block of an endless stream (the fullest cache). The JSON is written after each
mode, so a run cut short keeps what it measured; progress lines carry the elapsed time.

Also reported: the UMT5 encode (an on-change node, once per prompt), the DiT's FLOPs per block (FlopCounterMode on
the meta device) and the throughput they imply, and frames/s from the block p50 (12 frames a rolling block).
`--rolling false` measures Self-Forcing's own clips instead: the cache fills over 7 blocks and the sequence
restarts (81 frames a clip, 9 in its first block); measure a multiple of 7 blocks (`--blocks 42`).

`--lora-swap RANK`: the DiT gets a random LoRA of that rank on every block linear (LongLive's targets; 256 is
LongLive's rank) merged at load, and a second one as an in-place alternative (`swap_into`); after each mode a session
swaps to it mid-stream: the swap's stall (the in-place rewrite of the merged weights, synchronised), the block it
lands in against the others, and that nothing recompiled or recaptured. The LoRA files go to a temporary folder.

`--attentions sdpa,fa3,fa3_fp8`: each mode once per self-attention kernel of the DiT, in the same process, the first
one the baseline (rows `MODE+KERNEL`, `attention` in the JSON: kernel asked -> resolved, frames/s and block p50 and
their ratio to the baseline). `--linears bf16,fp8` does the same for the DiT's block linear layers (bf16, or FP8 with
the activation quantisation fused: nodes/wan_causal_dit.py `linears`), crossed with the kernels (rows
`MODE+KERNEL+LINEARS` where both vary); `--pairs fa3/bf16,fa3/fp8,fa3_fp8/fp8` names the (kernel, linears) pairs
instead of the full cross. `--no-per-node` skips the probed session of each mode (a compiled mode compiles and
captures again for it) to keep such a run short. The kernels' quality: bench/bench_attention_quality.py.

No network: nothing is downloaded. Needs torch with CUDA, triton (transformers only for a UMT5 `tokenizer:` folder).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ("auto", "sdpa", "cudnn", "flash", "efficient", "math", "fa3", "fa3_fp8")  # models/attention.py CHOICES
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON report path")
    ap.add_argument("--graph", default=str(ROOT / "graphs" / "self_forcing.yaml"))
    ap.add_argument("--quick", action="store_true", help="2 DiT layers and 2 UMT5 layers: a smoke test")
    ap.add_argument("--layers", type=int, default=None, help="DiT layers (random weights; default: the config's)")
    ap.add_argument("--modes", default="eager,cudagraph", help="comma-separated: eager, compile, cudagraph")
    ap.add_argument("--eager-blocks", type=int, default=8, help="measured blocks in eager mode")
    ap.add_argument("--blocks", type=int, default=40, help="measured blocks in compiled modes")
    ap.add_argument("--warmup", type=int, default=7, help="blocks before measuring (7: all filling phases)")
    ap.add_argument("--backend", default="inductor", help="engine compile backend (none: capture eager code)")
    ap.add_argument("--dit-compile", choices=["regional", "whole"], default="regional",
                    help="how compiled modes compile the DiT (see nodes/wan_causal_dit.py)")
    ap.add_argument("--attention", default="auto", choices=list(ATTENTION),
                    help="the DiT's self-attention kernel (see nodes/wan_causal_dit.py)")
    ap.add_argument("--attentions", default=None, metavar="A,B,...",
                    help="run every mode once per kernel, the first the baseline (overrides --attention)")
    ap.add_argument("--linears", default="bf16", metavar="bf16,fp8",
                    help="run every mode once per block-linears choice (crossed with --attentions), the first the "
                         "baseline")
    ap.add_argument("--pairs", default=None, metavar="KERNEL/LINEARS,...",
                    help="explicit (self-attention kernel, linears) pairs, e.g. fa3/bf16,fa3/fp8,fa3_fp8/fp8 "
                         "(overrides --attentions and --linears)")
    ap.add_argument("--no-per-node", action="store_true", help="skip each mode's probed (per-node) session")
    ap.add_argument("--decoder", choices=["taehv", "wan_vae"], default="taehv")
    ap.add_argument("--rolling", choices=["graph", "true", "false"], default="graph",
                    help="false: Self-Forcing's own clips (the cache fills over 7 blocks, then the sequence "
                         "restarts: what its published frames/s measure); true: an endless rolling cache")
    ap.add_argument("--device", default="cuda", help="cpu runs too (with --graph graphs/wan_tiny.yaml)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    ap.add_argument("--switch", action="store_true",
                    help="after each mode, a session with a set_prompt mid-stream: the block it lands in vs the others")
    ap.add_argument("--lora-swap", type=int, default=0, metavar="RANK",
                    help="with a LoRA of this rank merged, measure an in-place LoRA swap mid-stream (LongLive: 256)")
    return ap.parse_args()


def write_loras(engine_cfg, rank: int, folder: Path) -> list[str]:
    """Two random peft-style LoRAs (LongLive's key layout) for every linear of the DiT's blocks, bf16."""
    import torch
    from safetensors.torch import save_file

    from reactor_graph.models.wan_dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(engine_cfg)
    names = []
    for i in range(2):
        g = torch.Generator().manual_seed(100 + i)
        sd = {}
        for n, m in model.named_modules():
            if n.startswith("blocks.") and isinstance(m, torch.nn.Linear):
                out_f, in_f = m.weight.shape
                sd[f"base_model.model.{n}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * in_f ** -0.5
                                                             ).to(torch.bfloat16)
                sd[f"base_model.model.{n}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 1e-3
                                                             ).to(torch.bfloat16)
        path = folder / f"lora_{i}.safetensors"
        save_file(sd, str(path))
        names.append(str(path))
    return names


def build_engine(args):
    import torch

    from reactor_graph.loop import Engine
    from reactor_graph.weights import use_random_weights
    from reactor_graph.plan import build_plan
    from reactor_graph.spec import load_spec

    ls = load_spec(args.graph)
    changed = use_random_weights(ls)
    nodes = ls.spec.nodes
    dit = next(n for n, s in nodes.items() if s.type == "wan_causal_dit")
    text = next((n for n, s in nodes.items() if s.type == "umt5_encoder"), None)
    dec = next((n for n, s in nodes.items() if s.type in ("taehv_decoder", "wan_vae_decoder")), None)
    layers = 2 if args.quick else args.layers
    if layers:
        nodes[dit].params["layers"] = layers
        if text:
            nodes[text].params["layers"] = layers
    nodes[dit].params["compile"] = args.dit_compile
    nodes[dit].params["attention"] = args.attention
    if args.rolling != "graph":
        nodes[dit].params["rolling"] = args.rolling == "true"
    if dec and args.decoder == "wan_vae":
        nodes[dec].type, nodes[dec].params = "wan_vae_decoder", {"weights": "random"}
    if args.lora_swap:
        import tempfile

        from reactor_graph.nodes.wan_causal_dit import wan_config
        from reactor_graph.spec import NodeSpec

        cfg = wan_config(nodes[dit].params.get("config", "1.3b"), layers)
        say(f"writing two rank-{args.lora_swap} LoRAs")
        a, b = write_loras(cfg, args.lora_swap, Path(tempfile.mkdtemp(prefix="lora_bench_")))
        nodes[dit].params.update(lora=a, lora_swap="device")
        alt = dict(nodes[dit].params, lora=b, swap_into=dit)
        alt.pop("lora_swap")
        ls.spec.alternatives[f"{dit}_lora_b"] = NodeSpec.model_validate(
            {"type": "wan_causal_dit", "params": alt, "in": dict(nodes[dit].in_)})
    plan = build_plan(ls)
    say(f"graph {plan.name}: random weights for {', '.join(changed)}; DiT layers {layers or 'all'}; "
        f"hot path {plan.hot}, on change {plan.on_change}")
    engine = Engine(plan, device=args.device, dtype=args.dtype, compile="eager", compile_backend=args.backend)
    t = time.perf_counter()
    engine.load(progress=say)
    sync()
    mem = f"; device memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB" if engine.device.type == "cuda" else ""
    say(f"loaded in {time.perf_counter() - t:.1f}s; per node: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in engine.load_times.items()) + mem)
    return engine, dit, text, dec


def time_text_encoder(engine, name: str | None) -> dict | None:
    import torch

    if name is None:
        return None
    node = engine.nodes[name]
    ms = []
    with torch.inference_mode():
        for i in range(4):
            sync()
            t = time.perf_counter()
            node.forward(f"a corgi running along a sunny beach, take {i}")
            sync()
            ms.append((time.perf_counter() - t) * 1000)
    res = {"first_ms": ms[0], "ms": sorted(ms[1:])[1]}
    say(f"UMT5 encode (on change, eager): first {ms[0]:.1f} ms, then {res['ms']:.1f} ms")
    return res


def dit_flops(engine, dit: str) -> dict:
    """FLOPs of one block, first and rolling phase; exact for any depth from a 1- and a 2-layer count."""
    from reactor_graph.nodes.wan_causal_dit import block_flops

    p = engine.nodes[dit].params
    node = engine.nodes[dit]
    depth = node.cfg.num_layers
    key = dict(config=p.config, latent_size=tuple(p.latent_size), frames_per_block=p.frames_per_block,
               max_frames=p.max_frames, steps=node.num_steps)
    one, two = block_flops(**key, layers=1), block_flops(**key, layers=2)
    out = {k: one[k] + (depth - 1) * (two[k] - one[k]) for k in one}
    say("DiT FLOPs per block: " + ", ".join(f"{k} {v / 1e12:.4g} TFLOP" for k, v in out.items()))
    return out


def summarize(mode: str, r: dict, steady_frames: int, flops: dict | None,
              all_rolling: bool) -> dict:
    extra = {}
    fps = r["fps"]
    # run_bench counts each measured block's own frames (the 9-frame first block of a clip included): no
    # correction is needed. (A correction by the mean frames of *all* blocks, warm-up included, overstated
    # rolling runs by 12/11 in an earlier version of this script; RESULTS used block p50 figures.)
    extra["fps_steady"] = fps
    extra["fps_from_block_p50"] = (r["frames_per_block"] if not all_rolling else steady_frames) / (
        r["block_ms"]["p50"] / 1000)
    if flops and all_rolling:  # the measured blocks are all in the rolling phase
        rolling = next((v for k, v in flops.items() if k.startswith("block_rolling")), None)
        if rolling:
            extra["dit_tflops_per_s"] = rolling / (r["hot_path_ms"]["p50"] / 1000) / 1e12
    say(f"== {mode} ({r['mode']}{': ' + r['note'] if r['note'] else ''})")
    say(f"   block p50 {r['block_ms']['p50']:.1f} ms  p95 {r['block_ms']['p95']:.1f}  p99 {r['block_ms']['p99']:.1f}"
        f"  | hot path p50 {r['hot_path_ms']['p50']:.1f} ms  | engine overhead {r['overhead_ms']:.2f} ms")
    say(f"   frames/s sustained: {fps:.1f} ({r['frames_per_block']:.2f} frames a measured block); "
        f"from block p50: {extra['fps_from_block_p50']:.1f}")
    say(f"   time to first frame {r['ttff_s'] * 1000:.0f} ms | compile {r['compile_s']:.1f}s capture "
        f"{r['capture_s']:.1f}s | graphs {r['graphs']} recompiles {r['recompiles']} | peak memory "
        f"{(r['peak_memory_mb'] or 0) / 1024:.1f} GiB")
    say("   per node p50 ms: " + ", ".join(f"{k} {v:.2f}" for k, v in r["nodes_ms"].items()))
    if "dit_tflops_per_s" in extra:
        say(f"   DiT throughput ~{extra['dit_tflops_per_s']:.4g} TFLOP/s (rolling block FLOPs / hot path p50)")
    return extra


def prompt_switch(engine, warmup: int, after: int = 6) -> dict:
    """One session; a new prompt is submitted after block `warmup` and lands at the next boundary. Block times
    are the gaps between consecutive blocks reaching the host (each waits for its frames)."""
    marks: list[float] = []
    switch_at = warmup + 1

    def on_block(b):
        b.video()
        marks.append(time.perf_counter())
        if b.index == warmup:
            engine.submit("set_prompt", {"prompt": "a red fox running through fresh snow, low tracking shot"})

    res = engine.run_session(on_block, max_blocks=warmup + after)
    if not res.ok:
        raise RuntimeError(res.error)
    gaps = [(b, (marks[b] - marks[b - 1]) * 1000) for b in range(1, len(marks))]
    others = sorted(ms for b, ms in gaps if b >= 2 and b != switch_at)
    median = others[len(others) // 2]
    switch_ms = dict(gaps)[switch_at]
    say(f"   prompt switch: block {switch_at} took {switch_ms:.1f} ms against a median of {median:.1f} ms "
        f"(stall {switch_ms - median:.1f} ms)")
    return {"switch_block": switch_at, "switch_block_ms": switch_ms, "median_block_ms": median,
            "stall_ms": switch_ms - median, "block_ms": dict(gaps)}


def lora_swap(engine, dit: str, warmup: int, after: int = 6) -> dict:
    """One session; the LoRA alternative is swapped in after block `warmup` (in place), and back at the end."""
    ex = engine.executor
    compiles = dict(getattr(ex, "compiles", {}) or {})
    recompiles = getattr(ex, "recompiles", 0)
    regions = engine.nodes[dit].region_compiles
    marks: list[float] = []
    swap_at = warmup + 1

    def on_block(b):
        b.video()
        marks.append(time.perf_counter())
        if b.index == warmup:
            engine.request_swap(dit, f"{dit}_lora_b")

    res = engine.run_session(on_block, max_blocks=warmup + after)
    if not res.ok:
        raise RuntimeError(res.error)
    swap = engine.stats.swaps[-1]
    gaps = [(b, (marks[b] - marks[b - 1]) * 1000) for b in range(1, len(marks))]
    others = sorted(ms for b, ms in gaps if b >= 2 and b != swap_at)
    median = others[len(others) // 2]
    out = {"swap": swap, "swap_block_ms": dict(gaps)[swap_at], "median_block_ms": median,
           "recompiled": getattr(ex, "recompiles", 0) != recompiles or dict(getattr(ex, "compiles", {}) or {}) != compiles,
           "region_recompiled": engine.nodes[dit].region_compiles != regions}
    say(f"   LoRA swap: stall {swap['stall_ms']:.1f} ms (in place {swap.get('in_place')}, recaptured "
        f"{swap['recaptured']}); block {swap_at} took {out['swap_block_ms']:.1f} ms against a median of {median:.1f} ms")
    engine.request_swap(dit, dit)  # back, for the next mode
    engine.run_session(lambda b: None, max_blocks=1)
    return out


def attention_list(args) -> list[str]:
    kernels = [a.strip() for a in (args.attentions or args.attention).split(",") if a.strip()]
    bad = [a for a in kernels if a not in ATTENTION]
    if bad:
        raise SystemExit(f"--attentions: unknown {', '.join(bad)}; choose from {', '.join(ATTENTION)}")
    return kernels


LINEARS = ("bf16", "fp8")  # nodes/wan_causal_dit.py LINEARS


def path_pairs(args) -> list[tuple[str, str]]:
    """The (self-attention kernel, linears) pairs to run, in order; the first is the baseline."""
    if args.pairs:
        pairs = []
        for item in (p.strip() for p in args.pairs.split(",") if p.strip()):
            att, _, lin = item.partition("/")
            pairs.append((att, lin or "bf16"))
    else:
        lins = [x.strip() for x in args.linears.split(",") if x.strip()]
        pairs = [(att, lin) for att in attention_list(args) for lin in lins]
    bad = [f"{a}/{lin}" for a, lin in pairs if a not in ATTENTION or lin not in LINEARS]
    if bad or not pairs:
        raise SystemExit(f"--pairs/--linears: unknown {', '.join(bad) or '(none given)'}; kernels "
                         f"{', '.join(ATTENTION)}, linears {', '.join(LINEARS)}")
    return pairs


def compare_kernels(report: dict, mode: str) -> None:
    """Each kernel's row of `mode` against the first kernel's (the baseline), into report['attention']."""
    rows = [(k, v) for k, v in report["attention"].items() if k.startswith(mode + "+") and k in report["modes"]]
    if not rows:
        return
    base_key = rows[0][0]
    base = report["modes"][base_key]["block_ms"]["p50"]
    for k, v in rows:
        m = report["modes"][k]
        v.update(fps=m["fps"], block_ms_p50=m["block_ms"]["p50"], hot_path_ms_p50=m["hot_path_ms"]["p50"],
                 baseline=base_key, speedup=base / m["block_ms"]["p50"])


def main() -> int:
    args = parse()
    sys.stdout.reconfigure(line_buffering=True)
    import torch
    import torch._dynamo

    # Each phase key is compiled with its own backend closure, and Dynamo keeps at most `recompile_limit` (8)
    # entries per code object: 8 phases in one compiled mode fit exactly, a second compiled mode in the same
    # process would silently run eager. Room for several modes:
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    from reactor_graph.bench import run_bench

    if not torch.cuda.is_available() and args.device.startswith("cuda"):
        say("no CUDA device here; this bench is for the GPU machine")
        return 2
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    try:  # the version only: importing transformers would cost seconds and pull in Dynamo
        from importlib.metadata import PackageNotFoundError, version
        trv = version("transformers")
    except PackageNotFoundError:
        trv = None
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    say(f"torch {torch.__version__}, triton {tv}, transformers {trv}, python {platform.python_version()}, {name}")
    engine, dit, text, dec = build_engine(args)
    text_ms = time_text_encoder(engine, text)
    flops = None if args.no_flops else dit_flops(engine, dit)
    dit_node = engine.nodes[dit]
    steady = dit_node.params.frames_per_block * 4 if dec else dit_node.params.frames_per_block
    report: dict = {"graph": args.graph, "args": vars(args), "device_name": name, "torch": torch.__version__,
                    "triton": tv, "transformers": trv, "umt5_ms": text_ms, "dit_flops": flops,
                    "dit_phases": dit_node.num_phases(), "modes": {}, "extra": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    status = 0
    pairs = path_pairs(args)
    vary_att, vary_lin = len({a for a, _ in pairs}) > 1, len({lin for _, lin in pairs}) > 1
    runs = [(mode, att, lin) for att, lin in pairs
            for mode in [m.strip() for m in args.modes.split(",") if m.strip()]]
    for mode, att, lin in runs:
        key = mode + (f"+{att}" if vary_att else "") + (f"+{lin}" if vary_lin else "")
        blocks = args.eager_blocks if mode == "eager" else args.blocks
        try:
            path = dit_node.set_attention(att)
            # the bf16 layers are kept aside while in fp8, so a later pair can come back to them
            linears = dit_node.set_linears(lin, keep=True)
        except ValueError as exc:
            report.setdefault("errors", {})[key] = str(exc)
            say(f"{key}: skipped: {exc}")
            status = 1
            continue
        report.setdefault("attention", {})[key] = {"asked": att, "path": path, "linears": linears}
        say(f"--- {key}: {args.warmup} warm-up + {blocks} measured blocks; self-attention {path} (asked {att}), "
            f"linears {linears}")
        t = time.perf_counter()
        try:
            r = run_bench(engine, [mode], blocks=blocks, warmup=args.warmup, progress=say,
                          per_node=not args.no_per_node)
        except Exception as exc:  # keep what the other modes measured; say where this one broke
            traceback.print_exc()
            report.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
            out.write_text(json.dumps(report, indent=2))
            say(f"{key} failed after {time.perf_counter() - t:.0f}s: {type(exc).__name__}: {exc}")
            status = 1
            continue
        m = r["modes"][mode]
        report["modes"][key] = m
        all_rolling = dit_node.params.rolling and args.warmup >= dit_node.num_phases() - 1
        report["extra"][key] = summarize(key, m, steady, flops, all_rolling)
        report["extra"][key]["wall_s"] = time.perf_counter() - t
        if args.switch:
            report["extra"][key]["prompt_switch"] = prompt_switch(engine, args.warmup)
        if args.lora_swap:
            report["extra"][key]["lora_swap"] = lora_swap(engine, dit, args.warmup)
        report["extra"][key]["dit_region_compiles"] = dit_node.region_compiles
        if len(pairs) > 1:
            compare_kernels(report, mode)
        for k in ("schema", "device", "dtype", "frames_per_block"):
            report[k] = r.get(k)
        names = list(report["modes"])
        report["ratios"] = {f"{a}/{b}": report["modes"][a]["block_ms"]["p50"] / report["modes"][b]["block_ms"]["p50"]
                            for a in names for b in names if a != b}
        out.write_text(json.dumps(report, indent=2))
        say(f"wrote {out} ({key} took {time.perf_counter() - t:.0f}s)")
    for k, v in report.get("ratios", {}).items():
        say(f"ratio {k}: {v:.2f}x (block p50)")
    for k, v in report.get("attention", {}).items():
        if "fps" in v:
            say(f"attention {k}: {v['path']}, linears {v.get('linears', 'bf16')}: {v['fps']:.1f} frames/s, "
                f"block p50 {v['block_ms_p50']:.1f} ms, "
                f"{v['speedup']:.3f}x the baseline {v['baseline']}")
    out.write_text(json.dumps(report, indent=2))
    say("done" if status == 0 else "done, with errors")
    return status


if __name__ == "__main__":
    sys.exit(main())
