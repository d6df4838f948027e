"""Camera in -> picture out on this machine's CPU: graphs/camera.yaml served in-process, a local aiortc client
publishing a camera track (the SDK's publishTrack on the wire) whose bright spot jumps between left and right.

    python bench/bench_camera.py [OUT.json] [--switches 20] [--graph graphs/camera.yaml]

1. Latency: the spot jumps (the first camera frame showing it leaves the client's track) -> the first output
   frame decoded at the client whose subject is on the new side. That is the whole loop: encode, RTP over
   loopback, the server's decode, resize to the slot, the block boundary (waiting for the running block), the
   block, the outgoing queue, encode, RTP, aiortc's receiver (it holds a frame until the next one's first
   packet arrives), decode. The server's own part (frame decoded -> the block that read it starts) comes from
   the stats message.
2. Copy cost at the block boundary (InputFeeds.sync: host staging -> device, yuv420p -> RGB) and the
   server's resize (to_yuv420p) for the demo's slot and a StreamDiffusionV2-sized one, on this CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
perf = time.perf_counter


def pcts(values):
    v = sorted(values)
    if not v:
        return {}
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]
    return {"n": len(v), "p50": round(pick(0.5) * 1000, 1), "p95": round(pick(0.95) * 1000, 1),
            "max": round(v[-1] * 1000, 1), "mean": round(statistics.mean(v) * 1000, 1)}


def subject_x(frame) -> float | None:
    """Where (0..1) the subject of a decoded output frame is, left to right."""
    rgb = frame.to_ndarray(format="rgb24").astype(np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).reshape(-1, 3)
    d = np.abs(rgb - np.median(border, axis=0)).sum(axis=2)
    if d.max() < 30:
        return None
    d = np.clip(d / d.max() - 0.5, 0, None)
    return float((d.sum(axis=0) * np.arange(d.shape[1])).sum() / d.sum()) / d.shape[1]


def copy_costs() -> dict:
    import av
    import torch

    from reactor_graph.inputs import InputFeeds, to_yuv420p
    from reactor_graph.slots import SlotStore
    from reactor_graph.spec import SlotSpec

    out = {}
    for (h, w), (ch, cw) in (((64, 64), (480, 640)), ((480, 832), (720, 1280))):
        spec = SlotSpec(type="video", size=(h, w))
        slots = SlotStore({"camera": spec})
        feeds = InputFeeds({"camera": spec}, torch.device("cpu"), torch.float32)
        frame = av.VideoFrame.from_ndarray(np.random.default_rng(0).integers(0, 255, (ch, cw, 3), np.uint8),
                                           format="rgb24").reformat(format="yuv420p")
        t0 = perf()
        for _ in range(20):
            yuv = to_yuv420p(frame, h, w)
        resize = (perf() - t0) / 20
        feeds.sync(slots)
        times = []
        for _ in range(20):
            feeds.feed("camera", yuv)
            t0 = perf()
            feeds.sync(slots)
            times.append(perf() - t0)
        out[f"{h}x{w}"] = {"camera": f"{cw}x{ch}", "server_resize_ms": round(resize * 1000, 2),
                           "boundary_sync_ms_p50": round(sorted(times)[10] * 1000, 2)}
    return out


class SpotTrack:
    def __new__(cls):
        from aiortc import VideoStreamTrack

        class _Track(VideoStreamTrack):
            def __init__(self):
                super().__init__()
                self.side, self.switched, self.first_sent = 0.25, None, None

            async def recv(self):
                import av

                pts, base = await self.next_timestamp()
                img = np.full((480, 640, 3), 30, np.uint8)
                x = int(self.side * 640)
                img[190:290, x - 50:x + 50] = 255
                if self.switched is not None and self.first_sent is None:
                    self.first_sent = perf()
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = pts, base
                return frame

        return _Track()


async def client_main(url: str, switches: int, hold: float) -> dict:
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    async with http.post(url + "/start_session", json={}) as r:
        session = await r.json()
    base = f"{url}/sessions/{session['session_id']}/transport/webrtc"
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("data")
    messages: list = []
    channel.on("message", lambda raw: messages.append(json.loads(raw)))
    tracks = session["capabilities"]["tracks"]
    trs = [pc.addTransceiver(t["kind"], direction=t["direction"]) for t in tracks]
    frames: list = []  # (decoded at, subject x)
    tasks = []

    async def read(track):
        try:
            while True:
                f = await track.recv()
                frames.append((perf(), subject_x(f)))
        except Exception:  # noqa: BLE001
            return

    pc.on("track", lambda t: tasks.append(asyncio.ensure_future(read(t))))
    await pc.setLocalDescription(await pc.createOffer())
    body = {"sdp_offer": pc.localDescription.sdp, "client_info": {"sdk_version": "2.9.0", "sdk_type": "js"},
            "track_mapping": [{"mid": tr.mid, **t} for tr, t in zip(trs, tracks)]}
    async with http.post(base + "/sdp_params", json=body) as r:
        assert r.status == 202
    answer = None
    for _ in range(20):
        async with http.get(base + "/sdp_params") as r:
            if r.status == 200:
                answer = (await r.json())["sdp_answer"]
                break
        await asyncio.sleep(0.2)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    pinger = None
    while channel.readyState != "open":
        await asyncio.sleep(0.05)

    async def ping():
        while True:
            channel.send(json.dumps({"scope": "runtime", "data": {"type": "ping", "data": {}}}))
            await asyncio.sleep(4)

    pinger = asyncio.ensure_future(ping())
    while len(frames) < 16:
        await asyncio.sleep(0.1)
    spot = SpotTrack()
    sender = next(t for t, d in zip(trs, tracks) if d["direction"] == "sendonly").sender
    sender.replaceTrack(spot)
    await asyncio.sleep(3)  # the first frames, the encoder settling
    latencies, misses = [], 0
    for i in range(switches):
        new = 0.75 if spot.side < 0.5 else 0.25
        spot.first_sent = None
        spot.switched = perf()
        spot.side = new
        n = len(frames)
        t_end = perf() + hold
        seen = None
        while perf() < t_end:
            seen = next((t for t, x in frames[n:] if x is not None and (x - 0.5) * (new - 0.5) > 0
                         and abs(x - 0.5) > 0.1), None)
            if seen is not None:
                break
            await asyncio.sleep(0.005)
        if seen is None or spot.first_sent is None:
            misses += 1
        else:
            latencies.append(seen - spot.first_sent)
        await asyncio.sleep(max(0.0, t_end - perf()))
    stats = [m["data"]["data"] for m in messages if m.get("scope") == "runtime" and m["data"]["type"] == "stats"]
    pinger.cancel()
    async with http.post(url + "/stop_session", json={"session_id": session["session_id"]}) as r:
        await r.json()
    for t in tasks:
        t.cancel()
    await pc.close()
    await http.close()
    last = stats[-1] if stats else {}
    return {"latency_ms": pcts(latencies), "misses": misses,
            "server_frame_to_block_start_ms_p50": last.get("inputs", {}).get("camera", {}).get("latency_ms_p50"),
            "block_ms_last": last.get("block_ms"), "fps_out": last.get("fps"),
            "inputs": last.get("inputs")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=str(HERE / "results" / "camera_cpu.json"))
    ap.add_argument("--graph", default=str(ROOT / "graphs" / "camera.yaml"))
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--hold", type=float, default=2.0, help="seconds between jumps")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_stream import loopback_ice_when_alone

    from reactor_graph.loop import Engine
    from reactor_graph.plan import load_plan
    from reactor_graph.server.app import Server

    loopback_ice_when_alone()
    la0 = [round(x, 2) for x in os.getloadavg()]
    costs = copy_costs()
    engine = Engine(load_plan(args.graph), device="cpu", compile="eager").load()
    loop = asyncio.new_event_loop()
    server = Server(engine)
    box: dict = {}
    ready = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)
        box["url"] = loop.run_until_complete(server.start("127.0.0.1", 0))
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(30)
    run = asyncio.run(asyncio.wait_for(client_main(box["url"], args.switches, args.hold),
                                       args.switches * args.hold + 120))
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    engine.stop(5)
    result = {"graph": os.path.relpath(args.graph, ROOT), "device": "cpu", "fps": engine.fps,
              "queue_frames_out": server.settings.input_queue_frames, "cpus": os.cpu_count(),
              "loadavg_before": la0, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "camera_to_output": run, "copy_costs_cpu": costs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
