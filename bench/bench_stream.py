"""The stream end to end on this machine's CPU: block -> paced track -> WebRTC -> a local aiortc client.

    python bench/bench_stream.py [OUT.json] [--seconds 180] [--policy lossless|latest] [--queue-frames 8]

Serves the built-in demo graph (eager, CPU) in-process with the real server (`reactor_graph.server.app.Server`
on its own event loop and thread, as tests/server/conftest.py does) and connects a Python aiortc client that
speaks the Reactor JS SDK's local protocol (start_session, SDP offer/answer, data channel `data`, pings).

1. Latency: from a block leaving the hot path (`Block.ready`, perf_counter) to its first frame coming out of
   the client's `track.recv()` (decoded), split into
     pacing     ready -> the frame is taken from the queue for its slot on the absolute clock
                (= push_wait, the producer waiting for room under `lossless` plus the host copy, + queue_wait,
                time in the queue until its slot);
     transport  taken from the queue -> decoded at the client (ndarray -> VideoFrame, encode, RTP over
                loopback, aiortc's jitter buffer, decode, the client's loop), with
                wire (taken -> last RTP packet of the frame at the client) and
                receiver_hold (last packet -> decoded frame; aiortc's jitter buffer only releases a frame
                when the first packet of the next one arrives, so this is about one frame interval).
   Frames are mapped to blocks by pts: the track (a subclass, patched into the server's sessions module here
   only) records for every frame it sends the pts, the block it came from and that block's ready time; the
   client's pts are the server's minus the first one it received (aiortc's receiver maps RTP timestamps to
   start at 0), and that offset is found by matching the pts sequences and checked against each frame's mean
   luma (server ndarray vs decoded frame).
2. Delivery over the run, sampled every 10 s: generated (engine), pushed, sent fresh / repeats / idle, drops,
   skipped slots, received by the client, queue depth (at the sample, and max/mean over the interval); then
   the gap `fps * elapsed - received` (since the first real frame's slot) and its slope, which is ~0 when
   the stream does not drift, and the slope of the queue depth.

Before starting it waits (up to --wait-load seconds, polling every 30 s) for the 1-minute load average to fall
to --max-load or below, then runs anyway; the load averages before, during and after are in the JSON.
The run is bounded (a faulthandler watchdog exits a stuck run), closes the client's and the server's peer
connections, and stops the engine.
"""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
perf = time.perf_counter


# -- environment ------------------------------------------------------------------------------------------------
def loopback_ice_when_alone() -> None:
    """aioice leaves 127.0.0.1 out of its host candidates; with no other interface, put it back (as the tests do)."""
    import aioice.ice

    original = aioice.ice.get_host_addresses
    if not original(use_ipv4=True, use_ipv6=False):
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: original(use_ipv4, use_ipv6) or (
            ["127.0.0.1"] if use_ipv4 else [])


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_quiet_cpu(max_load: float, limit_s: float, poll_s: float = 30.0) -> dict:
    start = time.monotonic()
    polls = [(0.0, os.getloadavg())]
    while polls[-1][1][0] > max_load and time.monotonic() - start < limit_s:
        print(f"load average {polls[-1][1][0]:.2f} > {max_load}: waiting ({time.monotonic() - start:.0f} s of "
              f"{limit_s:.0f})", flush=True)
        time.sleep(min(poll_s, max(0.0, limit_s - (time.monotonic() - start))))
        polls.append((round(time.monotonic() - start, 1), os.getloadavg()))
    la = polls[-1][1]
    return {"max_load": max_load, "waited_s": round(time.monotonic() - start, 1),
            "quiet": la[0] <= max_load, "loadavg_at_start": [round(x, 2) for x in la],
            "polls": [[t, round(x[0], 2)] for t, x in polls]}


def pcts(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "p50": round(float(np.percentile(v, 50)), 2), "p95": round(float(np.percentile(v, 95)), 2),
            "p99": round(float(np.percentile(v, 99)), 2), "max": round(float(v.max()), 2),
            "mean": round(float(v.mean()), 2), "min": round(float(v.min()), 2)}


def slope(xs, ys) -> float | None:
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


STAMP_BITS, STAMP_PX = 16, 8  # a 16-bit tag as 8x8-pixel black/white squares along the top of the luma plane


def stamp_value(block: int, j: int) -> int:
    return ((block % (1 << 13)) << 3 | (j % 8)) + 1  # 0 is left for the idle (blank) frames


def stamp(y: np.ndarray, value: int) -> None:
    """Write `value` into the luma plane `y` (in place): one bit per 8x8 square, Y 16 or 235."""
    cols = y.shape[1] // STAMP_PX
    for i in range(STAMP_BITS):
        r, c = divmod(i, cols)
        y[r * STAMP_PX:(r + 1) * STAMP_PX, c * STAMP_PX:(c + 1) * STAMP_PX] = 235 if value >> i & 1 else 16


def read_stamp(y: np.ndarray) -> int:
    cols = y.shape[1] // STAMP_PX
    value = 0
    for i in range(STAMP_BITS):
        r, c = divmod(i, cols)
        sq = y[r * STAMP_PX + 2:(r + 1) * STAMP_PX - 2, c * STAMP_PX + 2:(c + 1) * STAMP_PX - 2]
        value |= int(sq.mean() > 125) << i
    return value


# -- instrumentation (this script only) --------------------------------------------------------------------------
class Recorder:
    """Everything the instrumented track and the client see, keyed so that frames map back to blocks."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items: dict[int, dict] = {}  # id(_Item) -> {block, j, ready, t_append, t_pop}
        self.per_block_frames: dict[int, int] = defaultdict(int)
        self.blocks: dict[int, dict] = {}  # block index -> {started, ready, t_in, t_out, frames}
        self.sent: dict[int, dict] = {}  # server pts -> record of the frame sent in that slot
        self.sent_order: list[int] = []
        self.depths: list[tuple[float, int]] = []  # (time, queue depth) at every recv
        self.t0_mono: float | None = None
        self.track = None
        # client side
        self.received: list[tuple[int, float, int]] = []  # (client pts, perf time, tag read from the pixels)
        self.raw_last_packet: dict[int, float] = {}  # RTP timestamp -> last packet arrival
        self.raw_to_mapped: dict[int, int] = {}

    # producer thread (under the track's condition lock)
    def on_append(self, item, now: float) -> None:
        j = self.per_block_frames[item.block]
        self.per_block_frames[item.block] = j + 1
        self.items[id(item)] = {"block": item.block, "j": j, "ready": item.ready, "t_append": now, "t_pop": None}

    def on_pop(self, item, now: float) -> None:
        rec = self.items.get(id(item))
        if rec is not None:
            rec["t_pop"] = now


def make_track_class(rec: Recorder):
    from reactor_graph.server.tracks import BlockVideoTrack

    class RecQueue(deque):
        def append(self, item):  # called under the track's lock
            now = perf()
            super().append(item)
            rec.on_append(item, now)

        def popleft(self):  # the consumer's pop, or a `latest` drop
            item = super().popleft()
            rec.on_pop(item, perf())
            return item

    class InstrumentedTrack(BlockVideoTrack):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._queue = RecQueue()
            rec.track = self

        def push(self, frames, fmt=None, ready=None, block=-1):
            # tag every frame with its block and index in it (the frames are ours: push_block copied them)
            if (fmt or self.format) in ("yuv420p", "nv12") and self.width >= 64:
                for j in range(len(frames)):
                    stamp(frames[j][:self.height], stamp_value(block, j))
            return super().push(frames, fmt, ready, block)

        def push_block(self, block):
            t_in = perf()
            rec.blocks[block.index] = {"started": block.started, "ready": block.ready, "t_in": t_in,
                                       "frames": block.frames}
            n = super().push_block(block)
            rec.blocks[block.index]["t_out"] = perf()
            rec.blocks[block.index]["queued"] = n
            return n

        async def recv(self):
            fresh0, rep0 = self.fresh, self.repeats
            frame = await super().recv()
            now = perf()
            if self.fresh > fresh0:
                kind, item = "fresh", self._last
            elif self.repeats > rep0:
                kind, item = "repeat", self._last
            else:
                kind, item = "idle", None
            k = round(frame.pts * float(self.fps) / 90000)
            info = rec.items.get(id(item)) if item is not None else None
            if rec.t0_mono is None:
                rec.t0_mono = self._t0
            r = {"k": k, "kind": kind, "t_out": now, "due": self.due(k), "depth": len(self._queue),
                 "tag": read_stamp(item.pixels[:self.height]) if item is not None else 0}
            if info is not None:
                r.update(block=info["block"], j=info["j"], ready=info["ready"], t_append=info["t_append"],
                         t_pop=info["t_pop"] if kind == "fresh" else None)
            rec.sent[frame.pts] = r
            rec.sent_order.append(frame.pts)
            rec.depths.append((now, len(self._queue)))
            return frame

    return InstrumentedTrack


def patch_client_receiver(rec: Recorder) -> None:
    """Record, on the client's receiver, when each frame's last RTP packet arrived and how aiortc maps RTP
    timestamps to pts. Only the client receives video in this process (the server receives none)."""
    import aiortc.jitterbuffer as jb
    import aiortc.rtcrtpreceiver as rr

    add = jb.JitterBuffer.add

    def add_recorded(self, packet):
        if self._is_video:
            rec.raw_last_packet[packet.timestamp] = perf()
        return add(self, packet)

    jb.JitterBuffer.add = add_recorded
    mapper = rr.TimestampMapper.map

    def map_recorded(self, timestamp):
        out = mapper(self, timestamp)
        rec.raw_to_mapped[timestamp] = out
        return out

    rr.TimestampMapper.map = map_recorded


# -- the client -------------------------------------------------------------------------------------------------
class Client:
    """What `new Reactor({local: true, apiUrl})` does on the wire (tests/server/conftest.py SdkClient, trimmed)."""

    def __init__(self, url: str, rec: Recorder, height: int):
        self.url, self.rec, self.height = url, rec, height
        self.session = None
        self.pc = None
        self.channel = None
        self.messages: list[dict] = []
        self.tasks: list[asyncio.Task] = []
        self.http = None
        self.track_ended = False

    async def connect(self) -> None:
        import aiohttp
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        async with self.http.post(self.url + "/start_session", json={}) as r:
            assert r.status == 200, await r.text()
            self.session = await r.json()
        base = f"{self.url}/sessions/{self.session['session_id']}/transport/webrtc"
        hdr = {"Authorization": "Bearer local", "Reactor-WebRTC-Version": "1.0"}
        async with self.http.get(base + "/ice_servers", headers=hdr) as r:
            assert r.status == 200
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = pc.createDataChannel("data")
        self.channel.on("message", self._on_message)
        self.channel.on("open", lambda: self.tasks.append(asyncio.ensure_future(self._pinger())))
        tracks = self.session["capabilities"]["tracks"]
        transceivers = [pc.addTransceiver(t["kind"], direction=t["direction"]) for t in tracks]

        @pc.on("track")
        def on_track(track):
            self.tasks.append(asyncio.ensure_future(self._read(track)))

        await pc.setLocalDescription(await pc.createOffer())
        mapping = [{"mid": tr.mid, **{k: t[k] for k in ("name", "kind", "direction")}}
                   for tr, t in zip(transceivers, tracks)]
        body = {"sdp_offer": pc.localDescription.sdp, "client_info": {"sdk_version": "2.9.0", "sdk_type": "js"},
                "track_mapping": mapping}
        async with self.http.post(base + "/sdp_params", json=body, headers=hdr) as r:
            assert r.status == 202, (r.status, await r.text())
        answer, delay = None, 0.1
        for _ in range(10):
            async with self.http.get(base + "/sdp_params", headers=hdr) as r:
                if r.status == 200:
                    answer = (await r.json())["sdp_answer"]
                    break
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
        assert answer, "no SDP answer"
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def _pinger(self):
        while True:
            self.send("runtime", "ping", {})
            await asyncio.sleep(5)

    def send(self, scope, kind, data=None):
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps({"scope": scope, "data": {"type": kind, "data": data or {}}}))

    def _on_message(self, raw):
        try:
            self.messages.append(json.loads(raw))
        except ValueError:
            pass

    def runtime(self, kind):
        return [m["data"].get("data") for m in self.messages
                if m.get("scope") == "runtime" and isinstance(m.get("data"), dict) and m["data"].get("type") == kind]

    async def _read(self, track):
        try:
            while True:
                frame = await track.recv()
                now = perf()
                plane = frame.planes[0]
                y = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)[:, :frame.width]
                self.rec.received.append((frame.pts, now, read_stamp(y)))
        except Exception:  # noqa: BLE001 - the track ended
            self.track_ended = True

    async def close(self) -> dict:
        out = {}
        if self.session is not None and self.http is not None:
            try:
                async with self.http.post(self.url + "/stop_session",
                                          json={"session_id": self.session["session_id"]}) as r:
                    out["stop_session"] = await r.json()
            except Exception as exc:  # noqa: BLE001
                out["stop_session"] = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.3)  # sessionEnded
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.pc is not None:
            await asyncio.wait_for(self.pc.close(), 10)
            out["client_pc"] = self.pc.connectionState
        if self.http is not None:
            await self.http.close()
        return out


# -- analysis ---------------------------------------------------------------------------------------------------
def match_offset(rec: Recorder) -> dict:
    """Client pts = server pts - P, P the pts of the first frame the client's receiver saw. Find P."""
    server = rec.sent
    client = [c for c, _, _ in rec.received]
    if not client or not server:
        return {"offset": None}
    best = None
    for p in rec.sent_order[:200]:
        hits = sum(1 for c in client if (c + p) in server)
        if best is None or hits > best[1]:
            best = (p, hits)
    p = best[0]
    tagged = [(c, tag) for c, _, tag in rec.received if (c + p) in server]
    ok = sum(1 for c, tag in tagged if tag == server[c + p]["tag"])
    step = rec.sent_order[-1] - rec.sent_order[-2] if len(rec.sent_order) > 1 else 0
    off = sum(1 for c, tag in tagged if (c + p + step) in server and tag == server[c + p + step]["tag"])
    return {"offset": p, "matched": best[1], "received": len(client),
            "what": "the block/frame tag stamped into the luma plane before queueing, read back at the client",
            "tag_agrees": ok, "tag_checked": len(tagged), "tag_agrees_fraction": round(ok / max(1, len(tagged)), 4),
            "control_tag_agrees_one_slot_off": off}


def analyse(rec: Recorder, samples: list[dict], fps: float, warmup_blocks: int) -> dict:
    m = match_offset(rec)
    p = m["offset"]
    mapped_to_raw = {v: k for k, v in rec.raw_to_mapped.items()}
    frames = []  # one per received frame, joined with the server's record
    for c, t_recv, y in rec.received:
        s = rec.sent.get(c + p) if p is not None else None
        if s is None:
            continue
        raw = mapped_to_raw.get(c)
        frames.append({**s, "t_recv": t_recv, "t_wire": rec.raw_last_packet.get(raw)})

    # per block: its first frame to arrive (fresh frames only; a repeat of it comes later anyway)
    first: dict[int, dict] = {}
    for f in frames:
        if f["kind"] == "fresh" and "block" in f:
            if f["block"] not in first or f["t_recv"] < first[f["block"]]["t_recv"]:
                first[f["block"]] = f
    steady = {b: f for b, f in first.items() if b >= warmup_blocks}

    def parts(fs):
        ms = lambda a, b: [(x[b] - x[a]) * 1000 if x.get(a) is not None and x.get(b) is not None else None
                           for x in fs]
        return {
            "total_ready_to_client": pcts(ms("ready", "t_recv")),
            "pacing_ready_to_slot": pcts(ms("ready", "t_pop")),
            "push_wait_ready_to_queued": pcts(ms("ready", "t_append")),
            "queue_wait_queued_to_slot": pcts(ms("t_append", "t_pop")),
            "transport_slot_to_client": pcts(ms("t_pop", "t_recv")),
            "wire_slot_to_last_packet": pcts(ms("t_pop", "t_wire")),
            "receiver_hold_last_packet_to_decoded": pcts(ms("t_wire", "t_recv")),
            "slot_lateness_due_to_taken": pcts(ms("due", "t_pop")),
        }

    fresh_frames = [f for f in frames if f["kind"] == "fresh" and "block" in f and f["block"] >= warmup_blocks]
    blocks = rec.blocks
    b_idx = sorted(blocks)
    compute = [(blocks[b]["ready"] - blocks[b]["started"]) * 1000 for b in b_idx if b >= warmup_blocks]
    period = [(blocks[b]["started"] - blocks[b - 1]["started"]) * 1000 for b in b_idx
              if b >= warmup_blocks and b - 1 in blocks]
    producer_wait = [(blocks[b]["t_out"] - blocks[b]["t_in"]) * 1000 for b in b_idx
                     if b >= warmup_blocks and "t_out" in blocks[b]]
    fpb = blocks[b_idx[0]]["frames"] if b_idx else 0
    sent_blocks = {r["block"] for r in rec.sent.values() if r["kind"] == "fresh" and "block" in r}

    # drift: since the first real frame's slot, expected = fps * elapsed vs received (and vs sent)
    drift = {}
    firsts = [rec.sent[pt] for pt in rec.sent_order if rec.sent[pt]["kind"] == "fresh"]
    if firsts:
        k0, due0 = firsts[0]["k"], firsts[0]["due"]
        recv_t = sorted(f["t_recv"] for f in frames if f["k"] >= k0)
        sent_t = sorted(rec.sent[pt]["t_out"] for pt in rec.sent_order if rec.sent[pt]["k"] >= k0)
        rows = []
        for s in samples:
            t = s["t"]
            if t < due0:
                continue
            expected = fps * (t - due0)
            got = int(np.searchsorted(recv_t, t, side="right"))
            out = int(np.searchsorted(sent_t, t, side="right"))
            rows.append({"elapsed_s": round(t - due0, 2), "expected": round(expected, 1), "sent": out,
                         "received": got, "gap_expected_received": round(expected - got, 1),
                         "gap_sent_received": out - got})
            s["stream"] = rows[-1]
        xs = [r["elapsed_s"] for r in rows]
        drift = {"first_frame_slot": k0, "rows": len(rows),
                 "gap_slope_frames_per_min": None if len(rows) < 2 else
                 round(60 * slope(xs, [r["gap_expected_received"] for r in rows]), 3),
                 "gap_min": min((r["gap_expected_received"] for r in rows), default=None),
                 "gap_max": max((r["gap_expected_received"] for r in rows), default=None),
                 "received_rate_fps": None if len(rows) < 2 else round(slope(xs, [r["received"] for r in rows]), 3)}
    steady_samples = samples[1:]  # the first interval includes the queue filling up
    depth_slope = slope([s["t"] for s in steady_samples], [s["queue_depth_mean"] for s in steady_samples])
    return {
        "mapping": m,
        "frames_joined": len(frames),
        "warmup_blocks_excluded": warmup_blocks,
        "block_latency_ms": {"what": "per block: Block.ready -> its first frame decoded at the client",
                             "blocks": len(steady), **parts(list(steady.values()))},
        "frame_latency_ms": {"what": "every fresh frame: its block's ready -> the frame decoded at the client",
                             **parts(fresh_frames)},
        "first_block_ms": {str(b): round((first[b]["t_recv"] - first[b]["ready"]) * 1000, 1)
                           for b in sorted(first)[:3]},
        "blocks_not_sent": sum(1 for b in b_idx if b not in sent_blocks),  # queued at the end, or dropped
        "blocks_sent_not_received": sum(1 for b in sent_blocks if b not in first),
        "engine": {"blocks": len(b_idx), "frames_per_block": fpb,
                   "block_compute_ms": pcts(compute), "block_period_ms": pcts(period),
                   "producer_wait_ms_per_block": pcts(producer_wait),
                   "realtime_block_ms": round(1000 * fpb / fps, 2) if fpb else None,
                   "compute_fraction_of_realtime": round(statistics.median(compute) / (1000 * fpb / fps), 3)
                   if compute and fpb else None},
        "drift": drift,
        "queue_depth_mean_slope_per_min": None if depth_slope is None else round(60 * depth_slope, 4),
    }


# -- the run ----------------------------------------------------------------------------------------------------
def counters(engine, track, rec: Recorder, t: float, last: dict | None) -> dict:
    c = track.counters() if track is not None else {}
    window = [d for (tt, d) in rec.depths if last is None or tt > last["t"]]
    return {"t": t, "generated": engine.stats.frames, "blocks": engine.stats.blocks, **c,
            "queue_depth": track.depth if track is not None else 0,
            "queue_depth_max": max(window, default=0),
            "queue_depth_mean": round(sum(window) / len(window), 2) if window else 0,
            "received": len(rec.received), "load1": load1()}


async def client_main(url: str, engine, rec: Recorder, seconds: float, interval: float, height: int) -> dict:
    client = Client(url, rec, height)
    out = {"samples": []}
    try:
        t_connect = perf()
        await client.connect()
        deadline = perf() + 30
        while not client.runtime("sessionStarted"):
            if perf() > deadline:
                raise TimeoutError(f"no sessionStarted; messages: {client.messages[-5:]}")
            await asyncio.sleep(0.05)
        t_start = perf()
        out["connect_to_session_s"] = round(t_start - t_connect, 3)
        out["session_started"] = client.runtime("sessionStarted")[0]
        samples = out["samples"]
        last = None
        n = 0
        while True:
            n += 1
            target = t_start + n * interval
            await asyncio.sleep(max(0.0, target - perf()))
            last = counters(engine, rec.track, rec, perf(), last)
            last["elapsed_s"] = round(last["t"] - t_start, 2)
            samples.append(last)
            print(f"  {last['elapsed_s']:6.1f} s  generated {last['generated']:5d}  fresh {last.get('fresh', 0):5d}  "
                  f"repeats {last.get('repeats', 0):4d}  drops {last.get('drops', 0):4d}  received "
                  f"{last['received']:5d}  depth {last['queue_depth']} (max {last['queue_depth_max']})  "
                  f"load {last['load1']}", flush=True)
            if last["t"] - t_start >= seconds - 1e-6:
                break
        out["stats_messages"] = len(client.runtime("stats"))
        out["last_stats"] = (client.runtime("stats") or [None])[-1]
        out["errors"] = client.runtime("error")
    finally:
        out["close"] = await client.close()
        out["session_ended"] = client.runtime("sessionEnded")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=str(HERE / "results" / "stream_cpu.json"))
    ap.add_argument("--graph", default=None, help="graph YAML (default: the built-in demo)")
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--policy", choices=("lossless", "latest"), default="lossless")
    ap.add_argument("--queue-frames", type=int, default=8)
    ap.add_argument("--warmup-blocks", type=int, default=8, help="blocks left out of the latency percentiles")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--wait-load", type=float, default=600.0, help="seconds to wait for a quiet CPU")
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.seconds + args.wait_load + 240, exit=True)

    load_check = wait_for_quiet_cpu(args.max_load, args.wait_load)
    print(f"load average {load_check['loadavg_at_start']} (waited {load_check['waited_s']} s)", flush=True)

    import torch

    from reactor_graph.cli import demo_path
    from reactor_graph.loop import Engine
    from reactor_graph.plan import load_plan
    from reactor_graph.server import sessions
    from reactor_graph.server.app import Server

    loopback_ice_when_alone()
    rec = Recorder()
    sessions.BlockVideoTrack = make_track_class(rec)  # this process only: the server builds our track
    patch_client_receiver(rec)

    graph = args.graph or str(demo_path())
    t = perf()
    engine = Engine(load_plan(graph), device="cpu", compile="eager").load()
    load_s = perf() - t
    fps = float(engine.fps)
    print(f"{engine.name}: {engine.height}x{engine.width} at {fps:g} fps, eager on cpu, torch threads "
          f"{torch.get_num_threads()}; loaded in {load_s:.1f} s; policy {args.policy}, queue {args.queue_frames}",
          flush=True)

    # the server on its own loop and thread (tests/server/conftest.py ServerThread)
    loop = asyncio.new_event_loop()
    server = Server(engine, policy=args.policy, queue_frames=args.queue_frames)
    ready = threading.Event()
    box: dict = {}

    def serve():
        asyncio.set_event_loop(loop)
        try:
            box["url"] = loop.run_until_complete(server.start("127.0.0.1", 0))
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="bench-server", daemon=True)
    thread.start()
    if not ready.wait(30) or "error" in box:
        raise RuntimeError(f"the server did not start: {box.get('error')}")

    la_before = [round(x, 2) for x in os.getloadavg()]
    cpu0, wall0 = os.times(), perf()
    error = None
    try:
        run = asyncio.run(asyncio.wait_for(
            client_main(box["url"], engine, rec, args.seconds, args.interval, engine.height), args.seconds + 90))
    except BaseException as exc:  # noqa: BLE001 - still close everything and write what we have
        error, run = f"{type(exc).__name__}: {exc}", {"samples": []}
    cpu1, wall1 = os.times(), perf()
    la_after = [round(x, 2) for x in os.getloadavg()]

    shutdown = {}
    try:
        t = perf()
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        shutdown["server_close_s"] = round(perf() - t, 2)
    except Exception as exc:  # noqa: BLE001
        shutdown["server_close"] = f"{type(exc).__name__}: {exc}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    shutdown["server_thread_alive"] = thread.is_alive()
    try:
        engine.stop(5)
    except Exception as exc:  # noqa: BLE001
        shutdown["engine_stop"] = f"{type(exc).__name__}: {exc}"
    shutdown["engine_busy"] = engine.busy
    if not thread.is_alive():
        loop.close()

    samples = run.pop("samples")
    result = analyse(rec, samples, fps, args.warmup_blocks) if rec.received else {}
    for s in samples:
        s.pop("t", None)
    load_samples = [s["load1"] for s in samples]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = "?"
    track = rec.track
    report = {
        "bench": "stream_cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "graph": graph, "model": engine.name, "fps": fps, "size": [engine.height, engine.width],
        "mode": engine.mode, "device": str(engine.device), "engine_load_s": round(load_s, 2),
        "policy": args.policy, "queue_frames": args.queue_frames, "seconds": args.seconds,
        "interval_s": args.interval,
        "load": {**load_check, "before_run": la_before, "after_run": la_after,
                 "during_run_1min": pcts(load_samples),
                 "process_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1),
                 "process_cpu_fraction_of_2_cores": round(((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system))
                                                          / max(1e-6, wall1 - wall0) / (os.cpu_count() or 1), 3)},
        "error": error,
        "definitions": {
            "total_ready_to_client": "Block.ready (perf_counter, left the hot path) -> frame out of the client's "
                                     "track.recv() (decoded), same process, same clock",
            "pacing_ready_to_slot": "Block.ready -> the frame taken from the queue for its clock slot "
                                    "(push_wait + queue_wait): the time it waited for its slot",
            "push_wait_ready_to_queued": "Block.ready -> frame appended to the queue (host copy; under lossless "
                                         "the producer waiting for room)",
            "queue_wait_queued_to_slot": "appended -> taken for its slot",
            "transport_slot_to_client": "taken -> decoded at the client: VideoFrame, encode, RTP over loopback, "
                                        "jitter buffer, decode, the client's loop",
            "wire_slot_to_last_packet": "taken -> the frame's last RTP packet at the client's receiver",
            "receiver_hold_last_packet_to_decoded": "last packet -> decoded frame out of recv(); aiortc's jitter "
                                                    "buffer releases a frame only when the next frame's first "
                                                    "packet arrives (~1 frame interval)",
            "slot_lateness_due_to_taken": "the slot's due time on the absolute clock -> the frame taken",
            "generated": "frames the engine produced (engine.stats.frames)",
            "gap_expected_received": "fps * (t - due time of the first real frame's slot) - frames received "
                                     "from that slot on; constant when nothing drifts",
        },
        "totals": {"generated": engine.stats.frames, "blocks": engine.stats.blocks,
                   **(track.counters() if track is not None else {}),
                   "received": len(rec.received), "slots": track.k if track is not None else None},
        **result,
        "samples": samples,
        "client": run, "shutdown": shutdown,
    }
    keep_up = None
    if track is not None and result:
        eng = result["engine"]
        keep_up = {"kept_up": bool(eng["block_period_ms"].get("p50", 1e9) <= 1.02 * eng["realtime_block_ms"]
                                   and track.repeats <= max(2, 0.005 * track.sent)),
                   "repeats": track.repeats, "skipped": track.skipped, "drops": track.drops,
                   "compute_fraction_of_realtime": eng["compute_fraction_of_realtime"]}
    report["kept_up_with_fps"] = keep_up
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)

    # summary
    print(f"\n{engine.name} @ {fps:g} fps, {args.policy}/{args.queue_frames}, {args.seconds:g} s; load "
          f"{la_before} -> {la_after} (1-min during run p50 {report['load']['during_run_1min'].get('p50')})")
    if error:
        print(f"ERROR: {error}")
    tot = report["totals"]
    print(f"generated {tot['generated']}  pushed {tot.get('pushed')}  sent {tot.get('sent')} (fresh {tot.get('fresh')}, "
          f"repeats {tot.get('repeats')}, idle {tot.get('idle')})  drops {tot.get('drops')}  skipped "
          f"{tot.get('skipped')}  received {tot['received']}")
    if result:
        bl = result["block_latency_ms"]
        for key in ("total_ready_to_client", "pacing_ready_to_slot", "transport_slot_to_client",
                    "receiver_hold_last_packet_to_decoded"):
            v = bl[key]
            print(f"  {key:40s} p50 {v.get('p50')}  p95 {v.get('p95')}  p99 {v.get('p99')}  max {v.get('max')} ms")
        e, d = result["engine"], result["drift"]
        print(f"block compute p50 {e['block_compute_ms'].get('p50')} ms (real time {e['realtime_block_ms']} ms), "
              f"period p50 {e['block_period_ms'].get('p50')} ms; kept up: {keep_up and keep_up['kept_up']}")
        print(f"drift: gap fps*t - received {d.get('gap_min')}..{d.get('gap_max')} frames, slope "
              f"{d.get('gap_slope_frames_per_min')} frames/min, received rate {d.get('received_rate_fps')} fps; "
              f"queue depth (interval mean) slope {result['queue_depth_mean_slope_per_min']} /min; mapping {result['mapping']}")
    print(f"wrote {args.out}")
    faulthandler.cancel_dump_traceback_later()
    if error:
        sys.exit(1)


if __name__ == "__main__":
    main()
