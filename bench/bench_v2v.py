"""StreamDiffusionV2's graph (graphs/streamdiffusion_v2.yaml) with random weights: frames/s and camera frame ->
output latency, for one encoder per run.

    python bench/bench_v2v.py OUT.json --encoder taehv                 # full size on a GPU, cudagraph
    python bench/bench_v2v.py OUT.json --encoder wan_vae               # the Wan2.1 VAE encoder instead
    python bench/bench_v2v.py OUT.json --tiny --device cpu --blocks 3  # toy size on the CPU (a smoke test)
    python bench/bench_v2v.py --summary A.json B.json                  # the table of finished runs

The engine is built from the graph file with every `weights` random (`--random-weights`); `--encoder wan_vae`
puts the graph's declared alternative `encode_wan_vae` in place of `encode` (the alternative is dropped either
way, so only the measured encoder is loaded). Compile modes are tried in `--modes` order (default cudagraph,
then compile): the first that loads (compile + capture of every phase key) is measured, and a failure's error is
kept in the JSON.

Two sessions, each after `--warmup` blocks (8: the DiT's 7 cache-filling phases and its first rolling block, so
every measured block is the rolling phase, the cost of an endless stream):

1. throughput: blocks back to back, 12 fresh synthetic camera frames fed into the video slot before each block
   (what a camera faster than the model gives): frames/s = output frames / wall time of the measured blocks,
   block time p50/p95 (boundary -> the block's frames on the host), time to the first frame.
2. real time: a camera thread feeds frames at `--camera-fps` (the graph's 16), stamped when fed; the output is
   played at the graph's fps from a lossless queue sized as the server sizes it when a model takes a camera
   (`just_in_time_frames`: what plays while one block is made, at least `--queue` frames, the server's
   input_queue_frames), so the engine waits for room as it does when serving. For every camera frame a
   measured block read for the first time (the newest T of the slot): arrival -> that block's frames on the host
   (`ready`) and -> the block's first frame played (`shown`), p50/p95; frames replaced before any block read
   them are counted as skipped. WebRTC (encode, network, decode) is not included: bench/bench_camera.py
   measures the whole loop on the CPU demo.

The JSON is rewritten after each stage, so a run cut short (the GPU script's timeouts) keeps what it measured;
progress lines carry the elapsed time. No network: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from reactor_graph.server.media_in import just_in_time_frames  # no aiortc/av at import: runs on the GPU box

ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()
perf = time.perf_counter


def say(msg: str) -> None:
    print(f"[{perf() - T0:7.1f}s] {msg}", flush=True)


def pcts(values_s: list[float]) -> dict:
    v = sorted(values_s)
    if not v:
        return {"n": 0}
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"n": len(v), "p50_ms": round(pick(0.5) * 1000, 1), "p95_ms": round(pick(0.95) * 1000, 1),
            "max_ms": round(v[-1] * 1000, 1), "mean_ms": round(statistics.mean(v) * 1000, 1)}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="JSON report path")
    ap.add_argument("--graph", default=str(ROOT / "graphs" / "streamdiffusion_v2.yaml"))
    ap.add_argument("--encoder", choices=["taehv", "wan_vae"], default="taehv")
    ap.add_argument("--modes", default="cudagraph,compile", help="compile modes to try, in order")
    ap.add_argument("--backend", default="inductor", help="engine compile backend")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: the graph's (bfloat16; float32 with --tiny)")
    ap.add_argument("--warmup", type=int, default=8, help="blocks before measuring in each session")
    ap.add_argument("--blocks", type=int, default=12, help="measured blocks, throughput session")
    ap.add_argument("--realtime-blocks", type=int, default=16, help="measured blocks, real-time session")
    ap.add_argument("--camera-fps", type=float, default=None, help="default: the graph's fps")
    ap.add_argument("--queue", type=int, default=2,
                    help="the fewest output frames queued before the engine waits (the server's input_queue_frames)")
    ap.add_argument("--compare-fixed-queue", action="store_true",
                    help="a second real-time session with the output queue fixed at --queue frames")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from start: the real-time session is shortened or skipped to end by then")
    ap.add_argument("--tiny", action="store_true", help="the graph at toy size (CPU smoke test)")
    ap.add_argument("--summary", nargs="+", metavar="JSON", help="print the table of finished runs and exit")
    args = ap.parse_args(argv)
    if not args.summary and not args.out:
        ap.error("the JSON report path is required")
    return args


# ------------------------------------------------------------------------------------------------ the graph
def tiny(ls) -> None:
    """The graph at toy size: 64x64 frames, the tiny Wan config, small encoders/decoder, a small text encoder."""
    from reactor_graph.spec import NodeSpec

    s = ls.spec
    s.size, s.dtype = (64, 64), "float32"
    for slot in s.slots.values():
        if slot.type == "video":
            slot.size = (64, 64)
    n = s.nodes
    n["rgb"].params["size"] = [64, 64]
    n["text"] = NodeSpec.model_validate({"type": "text_encoder", "params": {"dim": 32, "max_tokens": 8, "heads": 2},
                                         "in": dict(n["text"].in_)})
    n["noise"].params["shape"] = [16, 12, 8, 8]
    n["dit"].params.update(config="tiny", latent_size=[8, 8], max_frames=9)
    n["decode"].params["channels"] = [16, 8, 8, 8]
    for ns in [*n.values(), *s.alternatives.values()]:
        if ns.type == "taehv_encoder":
            ns.params["width"] = 8
        elif ns.type == "wan_vae_encoder":
            ns.params["dim"] = 4


def build_plan(args):
    from reactor_graph.plan import build_plan as build
    from reactor_graph.spec import load_spec
    from reactor_graph.weights import use_random_weights

    ls = load_spec(args.graph)
    if args.tiny:
        tiny(ls)
    use_random_weights(ls)
    s = ls.spec
    enc = next(k for k, v in s.nodes.items() if v.type in ("taehv_encoder", "wan_vae_encoder"))
    alt = next((k for k, v in s.alternatives.items() if v.type == "wan_vae_encoder"), None)
    if args.encoder == "wan_vae":
        if alt is None:
            raise SystemExit(f"{args.graph} declares no wan_vae_encoder alternative")
        s.nodes[enc] = s.alternatives[alt]
    s.alternatives.clear()  # only the measured encoder is loaded
    for name in [c for c, spec in s.commands.items() if spec.swap]:
        del s.commands[name]
    return build(ls), enc


def camera_frames(h: int, w: int, n: int = 4) -> list[np.ndarray]:
    """yuv420p pictures [H*3/2, W] uint8 (noise: every block's encode sees new content)."""
    rng = np.random.default_rng(0)
    return [rng.integers(16, 236, (h * 3 // 2, w), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ sessions
def sync(engine) -> None:
    import torch

    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def throughput(engine, slot: str, frames_per_block: int, warmup: int, blocks: int) -> dict:
    pics = camera_frames(*engine.inputs.size(slot))
    rows = []
    k = [0]

    def before(_):
        for _ in range(frames_per_block):
            engine.inputs.feed(slot, pics[k[0] % len(pics)])
            k[0] += 1

    def on_block(b):
        b.video()  # the frames on the host
        rows.append((b.started, perf(), b.frames))
        if len(rows) % 8 == 0:
            say(f"  throughput: block {len(rows)}/{warmup + blocks}, last {1000 * (rows[-1][1] - rows[-1][0]):.1f} ms")

    t0 = perf()
    res = engine.run_session(on_block, max_blocks=warmup + blocks, before_block=before)
    if res.error:
        raise RuntimeError(res.error)
    meas = rows[warmup:]
    wall = meas[-1][1] - meas[0][0]
    return {"blocks": len(meas), "frames": sum(r[2] for r in meas), "wall_s": round(wall, 3),
            "fps": round(sum(r[2] for r in meas) / wall, 2), "block": pcts([r[1] - r[0] for r in meas]),
            "first_frame_ms": round((rows[0][1] - t0) * 1000, 1),
            "warmup_block_ms": [round((r[1] - r[0]) * 1000, 1) for r in rows[:warmup]]}


class Camera(threading.Thread):
    """Feeds the slot at `fps` from its own thread, each frame stamped with when it was fed."""

    def __init__(self, engine, slot: str, fps: float):
        super().__init__(daemon=True, name="bench-camera")
        self.engine, self.slot, self.period = engine, slot, 1.0 / fps
        self.pics = camera_frames(*engine.inputs.size(slot))
        self.arrivals: list[float] = []  # of the frame numbered base + i + 1 by the slot's buffer
        self.base = engine.inputs.feeds[slot].buffer.received  # the buffer numbers every frame it was given
        self.stop = threading.Event()

    def run(self):
        start = perf()
        while not self.stop.is_set():
            t = perf()
            self.engine.inputs.feed(self.slot, self.pics[len(self.arrivals) % len(self.pics)], arrived=t)
            self.arrivals.append(t)
            self.stop.wait(max(0.0, start + len(self.arrivals) * self.period - perf()))


def realtime(engine, slot: str, fps_out: float, camera_fps: float, queue: int, warmup: int, blocks: int,
             fit: bool = True) -> dict:
    feed = engine.inputs.feeds[slot]
    cam = Camera(engine, slot, camera_fps)
    rows = []  # (used_seq, window T, ready, shown first, live)
    play = {"next": 0.0, "times": []}
    caps = []  # the queue's capacity at each block

    def on_block(b):
        b.video()
        ready = perf()
        times = play["times"]
        for _ in range(b.frames):  # the player takes one frame every 1/fps from the queue
            t = max(ready, play["next"])
            times.append(t)
            play["next"] = t + 1.0 / fps_out
        rows.append((feed.used_seq, b.frames, ready, times[-b.frames], feed.live))
        cap = just_in_time_frames(b.made_s, fps_out, queue) if fit else queue  # as the server sizes it
        caps.append(cap)
        wait_until = times[-cap - 1] if len(times) > cap else ready  # lossless: room for the last frame
        time.sleep(max(0.0, wait_until - perf()))
        if len(rows) % 8 == 0:
            say(f"  real time: block {len(rows)}/{warmup + blocks}")

    cam.start()
    time.sleep(1.0)  # a full window of camera frames before the session
    try:
        res = engine.run_session(on_block, max_blocks=warmup + blocks)
    finally:
        cam.stop.set()
        cam.join(5)
    if res.error:
        raise RuntimeError(res.error)
    window = engine.inputs.feeds[slot].buf.shape[0]
    ready_lat, shown_lat, newest, skipped = [], [], [], 0
    prev = rows[warmup - 1][0] if warmup > 0 else cam.base
    for used, _, ready, shown, live in rows[warmup:]:
        if not live or used <= prev:
            continue
        for seq in range(prev + 1, used + 1):
            if seq <= used - window:
                skipped += 1  # replaced before a block read it
                continue
            ready_lat.append(ready - cam.arrivals[seq - cam.base - 1])
            shown_lat.append(shown - cam.arrivals[seq - cam.base - 1])
        newest.append(ready - cam.arrivals[used - cam.base - 1])
        prev = used
    meas = rows[warmup:]
    span = meas[-1][2] - rows[warmup - 1][2] if warmup > 0 else meas[-1][2] - meas[0][2]
    return {"blocks": len(meas), "camera_fps": camera_fps, "output_fps_target": fps_out, "queue_frames": queue,
            "queue_capacity_frames": caps[warmup:] if len(caps) > warmup else caps,
            "camera_frames_fed": len(cam.arrivals), "camera_frames_used": len(ready_lat), "skipped": skipped,
            "not_live_blocks": sum(not r[4] for r in meas),
            "output_fps": round(sum(r[1] for r in meas) / span, 2) if span > 0 else None,
            "camera_to_ready": pcts(ready_lat), "camera_to_shown": pcts(shown_lat),
            "newest_frame_to_ready": pcts(newest)}


# ------------------------------------------------------------------------------------------------ main
def environment(engine) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(engine.device),
           "dtype": str(engine.dtype).replace("torch.", "")}
    if engine.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(engine.device)
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env


def load(plan, args, mode: str, report: dict):
    import torch

    from reactor_graph.loop import Engine

    engine = Engine(plan, device=args.device, dtype=args.dtype, compile=mode, compile_backend=args.backend)
    t = perf()
    engine.load(progress=say)
    sync(engine)
    ex = engine.executor
    report.update(mode=engine.mode, mode_note=engine.mode_note, load_s=round(perf() - t, 1),
                  load_times_s={k: round(v, 2) for k, v in engine.load_times.items()},
                  compile_s=round(getattr(ex, "times", {}).get("compile_s", 0.0), 1),
                  capture_s=round(getattr(ex, "times", {}).get("capture_s", 0.0), 1),
                  phase_keys=len(getattr(ex, "captures", {}) or {}),
                  region_compiles={n: node.region_compiles for n, node in engine.nodes.items() if node.region_compiles})
    if engine.device.type == "cuda":
        report["memory_gib_after_load"] = round(torch.cuda.memory_allocated(engine.device) / 2**30, 2)
    say(f"{engine.mode}: loaded in {report['load_s']} s (compile {report['compile_s']} s, capture "
        f"{report['capture_s']} s, {report['phase_keys']} phase keys, regions {report['region_compiles']})")
    return engine


def free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args) -> dict:
    plan, enc = build_plan(args)
    slot = next(n for n, spec in plan.slots.items() if spec.type == "video")
    report: dict = {"graph": str(Path(args.graph).resolve().relative_to(ROOT)) if Path(args.graph).resolve()
                    .is_relative_to(ROOT) else args.graph, "encoder": args.encoder,
                    "encoder_node": plan.nodes[enc].type_name, "tiny": args.tiny, "size": list(plan.spec.spec.size),
                    "fps": plan.spec.spec.fps, "mode_errors": {}, "command": " ".join(sys.argv)}
    write = lambda: Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # noqa: E731
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    engine = None
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        try:
            engine = load(plan, args, mode, report)
            break
        except Exception as exc:  # noqa: BLE001 - the next mode is tried; the JSON says why
            say(f"{mode} failed: {type(exc).__name__}: {exc}")
            report["mode_errors"][mode] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        # out of the except block, the failed engine (held by the traceback until here) can be freed
        plan, enc = build_plan(args)  # fresh nodes: a failed load may leave them half set up
        gc.collect()
        free_device_memory()
        write()
    if engine is None:
        raise SystemExit("no compile mode could be loaded: " + json.dumps(report["mode_errors"]))
    report["environment"] = environment(engine)
    write()
    fpb = engine.inputs.feeds[slot].buf.shape[0] if engine.inputs.feeds[slot].buf is not None else 12
    say(f"throughput session: {args.warmup} + {args.blocks} blocks")
    report["throughput"] = throughput(engine, slot, fpb, args.warmup, args.blocks)
    t = report["throughput"]
    say(f"  {t['fps']} frames/s, block p50 {t['block'].get('p50_ms')} ms p95 {t['block'].get('p95_ms')} ms, "
        f"first frame {t['first_frame_ms']} ms")
    write()
    blocks = args.realtime_blocks
    if args.deadline is not None:  # at the real-time pace a block takes at least T / fps seconds
        per_block = max(t["block"]["p50_ms"] / 1000, fpb / engine.fps)
        left = args.deadline - (perf() - T0) - 1.0 - args.warmup * per_block
        blocks = min(blocks, int(left / per_block))
    if blocks >= 4:
        say(f"real-time session: {args.warmup} + {blocks} blocks, camera at {args.camera_fps or engine.fps} fps")
        report["realtime"] = realtime(engine, slot, engine.fps, args.camera_fps or engine.fps, args.queue,
                                      args.warmup, blocks)
        say_realtime(report["realtime"])
        if args.compare_fixed_queue:  # the same session with the queue fixed at --queue frames (the old sizing)
            write()
            say(f"real-time session, queue fixed at {args.queue} frames")
            report["realtime_fixed_queue"] = realtime(engine, slot, engine.fps, args.camera_fps or engine.fps,
                                                      args.queue, args.warmup, blocks, fit=False)
            say_realtime(report["realtime_fixed_queue"])
    else:
        report["realtime"] = {"skipped": f"not enough time left before the deadline ({blocks} blocks)"}
        say("real-time session skipped: not enough time left")
    write()
    engine.stop(5)
    return report


def say_realtime(r: dict) -> None:
    say(f"  camera -> ready p50 {r['camera_to_ready'].get('p50_ms')} ms p95 {r['camera_to_ready'].get('p95_ms')}"
        f" ms; -> shown p50 {r['camera_to_shown'].get('p50_ms')} ms p95 {r['camera_to_shown'].get('p95_ms')} ms; "
        f"output {r['output_fps']} frames/s")


def summary(paths: list[str]) -> None:
    print(f"{'encoder':<9} {'mode':<10} {'frames/s':>8} {'block p50':>10} {'p95':>8} {'cam->ready p50':>15} "
          f"{'p95':>8} {'cam->shown p50':>15} {'p95':>8}  start-up")
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
        except (OSError, ValueError) as exc:
            print(f"{p}: not readable ({exc})")
            continue
        t, rt = r.get("throughput", {}), r.get("realtime", {})
        blk, rd, sh = t.get("block", {}), rt.get("camera_to_ready", {}), rt.get("camera_to_shown", {})
        print(f"{r.get('encoder', '?'):<9} {r.get('mode', 'failed'):<10} {t.get('fps', '-'):>8} "
              f"{blk.get('p50_ms', '-'):>10} {blk.get('p95_ms', '-'):>8} {rd.get('p50_ms', '-'):>15} "
              f"{rd.get('p95_ms', '-'):>8} {sh.get('p50_ms', '-'):>15} {sh.get('p95_ms', '-'):>8}  "
              f"load {r.get('load_s', '-')} s (compile {r.get('compile_s', '-')} s, capture {r.get('capture_s', '-')}"
              f" s){'; errors: ' + '; '.join(r['mode_errors']) if r.get('mode_errors') else ''}")


def main(argv=None) -> None:
    args = parse(argv)
    if args.summary:
        summary(args.summary)
        return
    run(args)


if __name__ == "__main__":
    main()
