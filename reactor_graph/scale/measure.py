"""Measure the front on this machine: start_session -> first frame through the front vs direct, and the
front's overhead per signalling request; what relaying a block costs (raw vs zlib); and a simulation of the
line under load (fake replicas, no model, simulated time): the one line against per-replica lines.

    python -m reactor_graph.scale.measure [GRAPH] [--clients 300 --replicas 8 --spread 0.9]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import aiohttp


async def _first_frame(url: str, sdk) -> float:
    async with sdk(url) as c:
        t0 = time.perf_counter()
        await c.connect()
        await c.wait_for(lambda: c.frames, 60, "a frame")
        dt = time.perf_counter() - t0
        await c.stop_session()
    await asyncio.sleep(0.5)  # the session winds down
    return dt


async def _per_request(url: str, session_url: str, n: int = 200) -> float:
    """Median seconds of a GET sdp_params (a signalling request) on `session_url`."""
    times = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            t0 = time.perf_counter()
            async with http.get(session_url) as r:
                await r.read()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def signalling(graph: str, rounds: int = 5) -> dict:
    """Two replicas in this process, the front before them; the same session measured both ways."""
    import importlib.util
    from pathlib import Path

    from ..loop import Engine
    from ..plan import load_plan
    from .front import Front, LocalPool
    from .replica import ReplicaServer

    spec = importlib.util.spec_from_file_location(
        "conftest_sdk", Path(__file__).parents[2] / "tests" / "server" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sdk = mod.SdkClient

    replicas = [ReplicaServer(Engine(load_plan(graph)).load(), "t", index=i).start() for i in range(3)]
    alone = replicas.pop()  # direct: today's server on its own (its line its own, as with one process)

    async def undirect():
        alone.server.manager.directed = False
    alone.call(undirect())

    async def main():
        front = Front(LocalPool(replicas, "t"))
        url = await front.start("127.0.0.1", 0)
        await front.wait_ready()
        out = {}
        try:
            direct_pool = alone.url
            # direct: the replica's own server (its start_session needs the internal token: send it)
            class Direct(sdk):
                async def start_session(self):
                    async with self.http.post(self.url + "/start_session", json={},
                                              headers={"Authorization": "Bearer t"}) as r:
                        self.session = await r.json()
                    return self.session

                async def stop_session(self, with_id=True):
                    async with self.http.post(self.url + "/stop_session", json={"session_id": self.session["session_id"]},
                                              headers={"Authorization": "Bearer t"}) as r:
                        return await r.json()
            await _first_frame(url, sdk)  # warm both paths
            await _first_frame(direct_pool, Direct)
            f, d = [], []
            for _ in range(rounds):
                f.append(await _first_frame(url, sdk))
                d.append(await _first_frame(direct_pool, Direct))
            out["first_frame_front_ms"] = round(statistics.median(f) * 1000, 1)
            out["first_frame_direct_ms"] = round(statistics.median(d) * 1000, 1)
            # per request: one session, its GET sdp_params both ways
            async with sdk(url) as c:
                await c.connect()
                sid = c.session["session_id"]
                b = front.backends[front.sessions[sid][0]]
                path = f"/sessions/{sid}/transport/webrtc/sdp_params"
                via = await _per_request(url, url + path)
                direct = await _per_request(url, b.url + path)
                await c.stop_session()
            out["get_sdp_params_front_ms"] = round(via * 1000, 3)
            out["get_sdp_params_direct_ms"] = round(direct * 1000, 3)
            out["front_overhead_per_request_ms"] = round((via - direct) * 1000, 3)
        finally:
            await front.close()
        return out

    try:
        return asyncio.run(main())
    finally:
        for r in replicas + [alone]:
            r.stop()


def promotion(graph: str, rounds: int = 5) -> dict:
    """An engine frees while a client waits: time from that session's `stop_session` to the waiting client's first
    generated frame, when the engine is its host's (local) and when it is the other replica's (relayed)."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    from ..loop import Engine
    from ..plan import load_plan
    from .front import Front, LocalPool
    from .replica import ReplicaServer

    spec = importlib.util.spec_from_file_location(
        "conftest_sdk", Path(__file__).parents[2] / "tests" / "server" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sdk = mod.SdkClient
    replicas = [ReplicaServer(Engine(load_plan(graph)).load(), "t", index=i).start() for i in range(2)]

    def generated(frame) -> bool:  # not the idle black frame
        y = frame.to_ndarray(format="yuv420p")[: frame.height]
        return float(np.abs(y.astype(int) - 16).mean()) > 1.0

    async def once(front, url, relayed: bool) -> float:
        async with sdk(url) as a, sdk(url) as b, sdk(url) as c:
            for x in (a, b):
                await x.connect()
                await x.wait_message("runtime", "sessionStarted", timeout=30)
            await c.connect()
            await c.wait_message("runtime", "queue", timeout=30)
            home = front.sessions[c.session["session_id"]][0]
            leave = [x for x in (a, b) if (front.sessions[x.session["session_id"]][0] == home) != relayed][0]
            n = len(c.frames)
            t0 = time.perf_counter()
            await leave.stop_session()
            await c.wait_for(lambda: any(generated(f) for _, f in c.frames[n:]), 30, "a generated frame")
            return time.perf_counter() - t0

    async def main():
        front = Front(LocalPool(replicas, "t"))
        url = await front.start("127.0.0.1", 0)
        await front.wait_ready()
        out = {}
        try:
            for relayed in (False, True):
                times = []
                for _ in range(rounds + 1):  # the first warms the path
                    times.append(await once(front, url, relayed))
                    await asyncio.sleep(0.5)
                out["relayed_ms" if relayed else "local_ms"] = round(statistics.median(times[1:]) * 1000, 1)
        finally:
            await front.close()
        return out

    try:
        return asyncio.run(main())
    finally:
        for r in replicas:
            r.stop()


class FakePool:
    """Replicas with no model, for the front's `pick`: their status dicts, which the simulation keeps current."""

    token = "fake"

    def __init__(self, n: int):
        self.state = [dict(index=i, instance="i", url=f"http://fake/{i}", ok=True, reason=None, busy=False,
                           in_session=False, free=True, relays=True, queue=0, clients=0, sessions={}, ready=[],
                           fps=0.0, target_fps=16.0, blocks=0, errors=0) for i in range(n)]

    def __len__(self):
        return len(self.state)

    async def status(self, i):
        return {**self.state[i], "sessions": dict(self.state[i]["sessions"])}

    async def metrics(self, i):
        return ""


def simulate(replicas: int = 8, clients: int = 300, hold: float = 0.5, arrival: float = 0.002, spread: float = 0.0,
             line: str = "one", poll: float = 0.25, seed: int = 0) -> dict:
    """The line under load, in simulated time (no model, no network): `clients` arrive `arrival` s apart, each
    session lasts `hold` s (± `spread` of it, uniformly); a round of the line runs when a client is ready and
    when a session ends (the replicas tell the front at once), and at each poll (every `poll` s). `line="one"`: the front's one line
    (line.py, the code the front runs); `"per_replica"`: what came before it (each replica serves the clients
    it hosts, in their order). The front's real costs are measured: `pick` per arrival, `plan` per round."""
    import heapq
    import random

    from .front import Front
    from .line import View, plan

    rng = random.Random(seed)
    lengths = [hold * (1 + spread * (2 * rng.random() - 1)) for _ in range(clients)]
    pool = FakePool(replicas)
    front = Front(pool, poll_interval=poll)
    for b, st in zip(front.backends, pool.state):
        b.status, b.healthy, b.instance, b.reason = st, True, "i", None  # the live dicts: pick sees each change
    engine: list[int | None] = [None] * replicas  # the client each engine serves
    waiting: list[list[int]] = [[] for _ in range(replicas)]  # clients each replica hosts, waiting, in order
    host, arrived, started = {}, {}, {}
    events: list = [(i * arrival, 0, "arrive", i) for i in range(clients)]
    events += [(k * poll, 1, "poll", None) for k in range(1, int(clients * arrival / poll) + 2)]
    heapq.heapify(events)
    pick_s, plan_s, relayed, peak = [], [], 0, 0

    def sync(i: int) -> None:
        st = pool.state[i]
        st["sessions"] = {str(c): "waiting" for c in waiting[i]}
        st["sessions"].update({str(c): "active" for c, h in host.items() if h == i and c in started
                               and c not in done})
        st["ready"] = [str(c) for c in waiting[i]]
        st["busy"] = st["in_session"] = engine[i] is not None
        st["free"] = engine[i] is None

    def begin(c: int, e: int, now: float) -> None:
        engine[e], started[c] = c, now
        heapq.heappush(events, (now + lengths[c], 0, "end", e))

    def one_round(now: float) -> None:
        nonlocal relayed
        views = [View(i, free=engine[i] is None, in_session=engine[i] is not None,
                      waiting=[str(c) for c in waiting[i]], ready={str(c) for c in waiting[i]})
                 for i in range(replicas)]
        t0 = time.perf_counter()
        assigned, _ = plan(views, {str(c): c for c in host})
        plan_s.append(time.perf_counter() - t0)
        for sid, h, e in assigned:
            waiting[h].remove(int(sid))
            relayed += h != e
            begin(int(sid), e, now)
        for i in range(replicas):
            sync(i)

    done: set[int] = set()
    while events:
        now, _, kind, x = heapq.heappop(events)
        if kind == "arrive":
            t0 = time.perf_counter()
            b = front.pick()
            pick_s.append(time.perf_counter() - t0)
            host[x], arrived[x] = b.index, now
            waiting[b.index].append(x)
            if line == "per_replica" and engine[b.index] is None:
                begin(waiting[b.index].pop(0), b.index, now)
            sync(b.index)
            if line == "one":
                one_round(now)  # its host tells the front it is ready (/internal/changes): a round at once
            peak = max(peak, sum(map(len, waiting)))
        elif kind == "end":
            done.add(engine[x])
            engine[x] = None
            if line == "per_replica":
                if waiting[x]:
                    begin(waiting[x].pop(0), x, now)
                sync(x)
            else:
                one_round(now)  # stop_session through the front runs the line at once
        elif kind == "poll" and line == "one":
            one_round(now)
        if kind == "poll" and not events and any(waiting):
            heapq.heappush(events, (now + poll, 1, "poll", None))
        if kind == "end" and not any(e is not None for e in engine) and any(waiting) and line == "one":
            heapq.heappush(events, (now + poll, 1, "poll", None))
    waits = sorted(started[c] - arrived[c] for c in range(clients))
    by_arrival = [started[c] for c in range(clients)]
    later_min, overtaken = float("inf"), 0  # clients that someone who came after them went before
    for t in reversed(by_arrival):
        overtaken += later_min < t - 1e-9
        later_min = min(later_min, t)
    return {"line": line, "replicas": replicas, "clients": clients, "hold_s": hold, "spread": spread,
            "route_us_median": round(statistics.median(pick_s) * 1e6, 1), "route_us_max": round(max(pick_s) * 1e6, 1),
            "plan_us_median": round(statistics.median(plan_s) * 1e6, 1) if plan_s else None,
            "plan_us_max": round(max(plan_s) * 1e6, 1) if plan_s else None,
            "peak_waiting": peak, "relayed": relayed, "overtaken": overtaken,
            "wait_s_median": round(statistics.median(waits), 2), "wait_s_p95": round(waits[int(0.95 * clients)], 2),
            "wait_s_max": round(waits[-1], 2), "ideal_one_fifo_max_wait_s": round(
                max(0.0, (clients - replicas) * hold / replicas), 2)}


def relay_codec(height: int = 480, width: int = 832, frames: int = 4, rounds: int = 20) -> dict:
    """What relaying a block costs on this CPU (relay_wire.py): packing on the engine's side and unpacking on the
    host's, raw vs zlib level 1, for a yuv420p block of generated-looking video (smooth shapes + fine noise)."""
    import numpy as np

    from . import relay_wire as W

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height * 3 // 2, 0:width]
    base = (128 + 60 * np.sin(xx / 37.0) * np.cos(yy / 23.0)).astype(np.float32)
    block = np.stack([np.clip(base + rng.normal(0, 6, base.shape) + 3 * t, 0, 255) for t in range(frames)]
                     ).astype(np.uint8)  # [T, H*3/2, W]
    out = {"block": f"{frames}x{height}x{width} yuv420p", "raw_bytes": int(block.nbytes)}
    for z in (False, True):
        pack_t, unpack_t = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            data = W.pack_block(block, "yuv420p", 0, 0.0, compress=z)
            t1 = time.perf_counter()
            header, payload = W.unpack(data)
            W.unpack_block(header, payload, height, width).copy()
            unpack_t.append(time.perf_counter() - t1)
            pack_t.append(t1 - t0)
        name = "zlib1" if z else "raw"
        out[f"{name}_pack_ms"] = round(statistics.median(pack_t) * 1000, 2)
        out[f"{name}_unpack_ms"] = round(statistics.median(unpack_t) * 1000, 2)
        out[f"{name}_bytes"] = len(data)
    out["zlib1_ratio"] = round(out["raw_bytes"] / out["zlib1_bytes"], 2)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("graph", nargs="?")
    p.add_argument("--clients", type=int, default=300)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--spread", type=float, default=0.9, help="session lengths: hold ± this fraction of it")
    a = p.parse_args(argv)
    if a.graph:
        print(signalling(a.graph))
        print(promotion(a.graph))
    print(relay_codec())
    for spread in (0.0, a.spread):
        for line in ("one", "per_replica"):
            print(simulate(a.replicas, a.clients, spread=spread, line=line))


if __name__ == "__main__":
    sys.exit(main())
