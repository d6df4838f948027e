"""Start-up as a user meets it: fresh processes, from spawn to the first frame on the host, full against tiered.

  python3 bench/bench_startup.py --graph graphs/demo.yaml --json out.json [--swap-graph bench/graphs/demo_swap.yaml]

Each scenario is a new Python process (`child`), timed from the parent's spawn (imports, CUDA init, loading,
compiling/capturing, the first block copied to the host). "fresh" gives it empty inductor, Triton, CUDA and
reactor-graph compile caches; "restart" reuses the caches an earlier scenario filled. In order:

  full_fresh      --start full on empty caches (the "before": everything compiles before the first frame)
  tiered_fresh    --start tiered on empty caches: first frame from the eager code, stops after a few blocks
  full_restart    --start full, caches of full_fresh
  tiered_restart  --start tiered, the same caches; runs until the compiled tier serves, then the steady blocks
  tiered_wiped    --start tiered, empty inductor/Triton caches but full_fresh's reactor-graph compile cache
  swap            (--swap-graph) tiered, caches of full_fresh; a hot-path swap and back once compiled

Steady block time is the median of the session's back-to-back blocks (Stats.last_block_s: boundary to
host copy) after the switch, against full_restart's in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(args) -> None:
    spawn = float(os.environ["RG_SPAWN_T"])
    prof = None
    if args.profile:  # where the main thread's time goes up to the first frame (imports included)
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        watch_imports(args.profile + ".imports")
    import logging

    import torch  # noqa: F401

    from reactor_graph.loop import Engine
    from reactor_graph.plan import build_plan
    from reactor_graph.spec import load_spec
    from reactor_graph.weights import use_random_weights

    t_import = time.time() - spawn
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(message)s")
    ls = load_spec(args.graph)
    if args.random_weights:
        use_random_weights(ls)
    engine = Engine(build_plan(ls), start=args.start, compile=args.compile).load()
    t_loaded = time.time() - spawn
    load_times = {k: round(v, 3) for k, v in engine.load_times.items()}
    rec: dict = {"start": args.start, "graph": args.graph, "mode": engine.mode, "import_s": t_import,
                 "loaded_s": t_loaded, "load_times": load_times}
    blocks: list[dict] = []
    swap_at: dict = {}
    tier = engine.executor if hasattr(engine.executor, "status") else None
    deadline = time.time() + args.max_seconds

    def on_block(b):
        now = time.time() - spawn
        if b.index == 0:
            b.video()  # on the host: the first frame a viewer could get
            rec["first_frame_s"] = time.time() - spawn
            if prof is not None:
                prof.disable()
                write_profile(prof, args.profile)
        serving = engine.serving()["serving"]
        blocks.append({"i": b.index, "t": now, "ms": engine.stats.last_block_s * 1000, "serving": serving})
        if b.index in swap_at.get("blocks", {}):
            swap_at["blocks"][b.index]()

    stop = engine._stop

    def before(i):
        compiled = tier is None or tier.serving == "compiled"
        if time.time() > deadline:
            rec["timed_out"] = True
            stop.set()
        elif args.stop_early and i >= args.blocks:
            stop.set()
        elif compiled and "compiled_from" not in rec:
            rec["compiled_from"] = i
            rec["compiled_s"] = time.time() - spawn
            if args.swap:
                target, alt = args.swap.split(":")
                n = i + args.blocks
                swap_at["blocks"] = {
                    n: lambda: engine.request_swap(target, alt, reply=lambda r: swap_at.setdefault("replies", []).append(r)),
                    n + 20: lambda: engine.request_swap(target, target,
                                                        reply=lambda r: swap_at.setdefault("replies", []).append(r))}
                swap_at["land"] = (n + 1, n + 21)
        elif "compiled_from" in rec and i >= rec["compiled_from"] + args.blocks + (45 if args.swap else 0):
            stop.set()

    res = engine.run_session(on_block, before_block=before)
    rec["session"] = {"reason": res.reason, "error": res.error}
    if tier is not None:
        rec["tier"] = tier.status()
    after = [b["ms"] for b in blocks if "compiled_from" in rec and b["i"] >= rec["compiled_from"] + 5
             and not (swap_at.get("land") and any(0 <= b["i"] - x < 3 for x in swap_at["land"]))]
    rec["steady_block_ms"] = statistics.median(after) if after else None
    rec["first_blocks_ms"] = [round(b["ms"], 2) for b in blocks[:5]]
    rec["blocks"] = len(blocks)
    rec["serving_changes"] = [(b["i"], b["serving"]) for k, b in enumerate(blocks)
                              if k == 0 or blocks[k - 1]["serving"] != b["serving"]]
    if swap_at.get("land"):
        base = rec["steady_block_ms"] or 0.0
        rec["swaps"] = [{"reply": r, "landing_block_ms": next((b["ms"] for b in blocks if b["i"] == x), None),
                         "stall_ms": next((b["ms"] - base for b in blocks if b["i"] == x), None)}
                        for r, x in zip(swap_at.get("replies", []), swap_at["land"])]
    print("RESULT " + json.dumps(rec), flush=True)
    sys.stderr.flush()
    os._exit(0)  # a compile still under way in the background must not hold (or abort) the exit


WATCHED = ("torch._dynamo", "torch.distributed.fsdp", "sympy", "transformers", "torch._inductor", "triton",
           "torch._higher_order_ops.triton_kernel_wrap", "aiortc", "av")


def watch_imports(path: str) -> None:
    """Append to `path`, for each module in WATCHED, the thread and the stack that imported it first (which
    code on the way to the first frame pulls in the heavy modules)."""
    import threading
    import traceback

    seen: set[str] = set()

    class Watch:
        @staticmethod
        def find_spec(name, *_):
            if name in WATCHED and name not in seen:
                seen.add(name)
                stack = "".join(traceback.format_stack(limit=40)[:-1])
                with open(path, "a") as f:
                    f.write(f"== {name} at {time.time() - float(os.environ['RG_SPAWN_T']):.2f} s, thread "
                            f"{threading.current_thread().name}\n{stack}\n")
            return None

    sys.meta_path.insert(0, Watch)


def write_profile(prof, path: str) -> None:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(30)
    Path(path).write_text(buf.getvalue())


def caches(root: Path, name: str, reuse: str | None = None, keep_rg: str | None = None) -> dict[str, str]:
    base = root / (reuse or name)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(base / "inductor"), "TRITON_CACHE_DIR": str(base / "triton"),
           "CUDA_CACHE_PATH": str(base / "cuda"),
           "REACTOR_GRAPH_CACHE_DIR": str(root / (keep_rg or reuse or name) / "reactor-graph"),
           # Python's own bytecode cache: an installed package has it (pip writes it); a machine whose
           # site-packages cannot take it recompiles torch's sources in every process (seconds)
           "PYTHONPYCACHEPREFIX": str(base / "pycache")}
    if reuse is None:
        shutil.rmtree(base, ignore_errors=True)
    return env


def scenario(args, name: str, env_dirs: dict, start: str, graph: str, extra: list[str]) -> dict:
    env = {**os.environ, **env_dirs}
    if args.no_pycache:
        env.pop("PYTHONPYCACHEPREFIX")
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    cmd = [sys.executable, __file__, "child", "--graph", graph, "--start", start, "--compile", args.compile,
           "--blocks", str(args.blocks), "--max-seconds", str(args.child_seconds), *extra,
           *(["--random-weights"] if args.random_weights else [])]
    t0 = time.time()
    env["RG_SPAWN_T"] = repr(t0)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_seconds + 120)
    wall = time.time() - t0
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    rec = json.loads(line[7:]) if line else {"error": (p.stderr or p.stdout)[-2000:]}
    rec.update(scenario=name, process_s=wall, rc=p.returncode, log_tail=p.stderr[-3000:])
    first = rec.get("first_frame_s")
    print(f"{name:15s} first frame {first if first is None else round(first, 1)} s, compiled from "
          f"{rec.get('compiled_s') and round(rec['compiled_s'], 1)} s, steady {rec.get('steady_block_ms') and round(rec['steady_block_ms'], 3)} ms"
          f", process {wall:.1f} s", flush=True)
    if "error" in rec:
        print(rec["error"][-800:], flush=True)
    if rec.get("session", {}).get("error") or (rec.get("tier") or {}).get("error"):
        print("  session:", rec["session"], "tier:", rec.get("tier"), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("child")
    c.add_argument("--graph", required=True)
    c.add_argument("--start", default="tiered")
    c.add_argument("--compile", default=None)
    c.add_argument("--blocks", type=int, default=100)
    c.add_argument("--max-seconds", type=float, default=400)
    c.add_argument("--stop-early", action="store_true", help="stop after --blocks without waiting for compile")
    c.add_argument("--swap", default=None, help="TARGET:ALTERNATIVE, once the compiled tier serves")
    c.add_argument("--random-weights", action="store_true")
    c.add_argument("--profile", default=None, help="write a cProfile of the way to the first frame here")
    ap.add_argument("--graph", default="graphs/demo.yaml")
    ap.add_argument("--swap-graph", default=None)
    ap.add_argument("--swap", default="decode:decode_other")
    ap.add_argument("--compile", default="cudagraph")
    ap.add_argument("--blocks", type=int, default=100)
    ap.add_argument("--child-seconds", type=float, default=400)
    ap.add_argument("--scenarios", default="full_fresh,tiered_fresh,full_restart,tiered_restart,tiered_wiped,swap")
    ap.add_argument("--root", default=None, help="cache folders (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--restart-from", default="full_fresh", choices=("full_fresh", "tiered_fresh"),
                    help="whose filled caches the restart scenarios reuse (tiered_fresh: it then runs until "
                         "its compiled tier serves, and full_fresh need not run)")
    ap.add_argument("--random-weights", action="store_true", help="(children) random weights for every node")
    ap.add_argument("--first-frames", action="store_true",
                    help="every child stops after --blocks: first frames only (a restart then reuses the Triton "
                         "and CUDA caches of tiered_fresh, not a finished compile)")
    ap.add_argument("--no-pycache", action="store_true",
                    help="children use the interpreter's own bytecode caching (no per-scenario PYTHONPYCACHEPREFIX)")
    ap.add_argument("--profile-dir", default=None, help="(children) a cProfile to the first frame, per scenario")
    args = ap.parse_args()
    if args.cmd == "child":
        return child(args)
    import tempfile

    root = Path(args.root or tempfile.mkdtemp(prefix="rg-startup-"))
    want = args.scenarios.split(",")
    runs = []
    w = "B" if args.restart_from == "tiered_fresh" else "A"  # whose caches the restarts reuse
    plans = {
        "full_fresh": (lambda: caches(root, "A"), "full", args.graph, []),
        "tiered_fresh": (lambda: caches(root, "B"), "tiered", args.graph, [] if w == "B" else ["--stop-early"]),
        "full_restart": (lambda: caches(root, w, reuse=w), "full", args.graph, []),
        "tiered_restart": (lambda: caches(root, w, reuse=w), "tiered", args.graph, []),
        "tiered_wiped": (lambda: caches(root, "C", keep_rg=w), "tiered", args.graph, []),
        "swap": (lambda: caches(root, w, reuse=w), "tiered", args.swap_graph or args.graph,
                 ["--swap", args.swap]),
    }
    for name in want:
        if name == "swap" and not args.swap_graph:
            continue
        dirs, start, graph, extra = plans[name]
        if args.first_frames and "--stop-early" not in extra:
            extra = [*extra, "--stop-early"]
        if args.profile_dir:
            Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
            extra = [*extra, "--profile", str(Path(args.profile_dir) / f"{name}.txt")]
        runs.append(scenario(args, name, dirs(), start, graph, extra))
    import torch

    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "compile": args.compile, "graph": args.graph, "runs": runs,
           "date": time.strftime("%Y-%m-%d")}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    by = {r["scenario"]: r for r in runs}
    if "full_restart" in by and "tiered_restart" in by and by["tiered_restart"].get("steady_block_ms"):
        out["steady_ratio_tiered_over_full"] = by["tiered_restart"]["steady_block_ms"] / by["full_restart"][
            "steady_block_ms"]
        print(f"steady block, tiered (compiled tier) / full: {out['steady_ratio_tiered_over_full']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
