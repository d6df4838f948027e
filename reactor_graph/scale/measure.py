"""Measure the front on this machine: start_session -> first frame through the front vs direct, and the
front's overhead per signalling request; and a simulation of the line under load (fake replicas, no model).

    python -m reactor_graph.scale.measure [GRAPH] [--clients 300 --replicas 8]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid

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

    replicas = [ReplicaServer(Engine(load_plan(graph)).load(), "t", index=i).start() for i in range(2)]

    async def main():
        front = Front(LocalPool(replicas, "t"))
        url = await front.start("127.0.0.1", 0)
        await front.wait_ready()
        out = {}
        try:
            direct_pool = replicas[0].url
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
        for r in replicas:
            r.stop()


class FakePool:
    """Replicas with no model: each holds `sessions` ids; a session lasts `hold` seconds."""

    token = "fake"

    def __init__(self, n: int):
        self.state = [dict(index=i, instance="i", url=f"http://fake/{i}", ok=True, reason=None, busy=False,
                           in_session=False, queue=0, clients=0, sessions={}, fps=0.0, target_fps=16.0,
                           blocks=0, errors=0) for i in range(n)]

    def __len__(self):
        return len(self.state)

    async def status(self, i):
        return {**self.state[i], "sessions": dict(self.state[i]["sessions"])}

    async def metrics(self, i):
        return ""


def simulate(replicas: int = 8, clients: int = 300, hold: float = 0.5, arrival: float = 0.002) -> dict:
    """The front's routing under load: `clients` arrive `arrival` s apart; each holds its replica `hold` s.
    Measures the front's cost per start_session (pick + bookkeeping) and how the line spreads."""
    from .front import Front

    async def main():
        pool = FakePool(replicas)
        front = Front(pool, poll_interval=0.05)
        await front.refresh()
        costs, waits, peak = [], [], 0
        lines = [[] for _ in range(replicas)]  # per replica: (arrival time, id)

        async def serve_line(i):
            while True:
                st = pool.state[i]
                if lines[i]:
                    t_arr, sid = lines[i].pop(0)
                    waits.append(time.monotonic() - t_arr)
                    st["in_session"] = True
                    await asyncio.sleep(hold)
                    st["sessions"].pop(sid, None)
                    st["in_session"] = False
                else:
                    await asyncio.sleep(0.005)
                st["queue"] = len(lines[i])
        servers = [asyncio.create_task(serve_line(i)) for i in range(replicas)]
        poller = asyncio.create_task(front._poll())
        for _ in range(clients):
            t0 = time.perf_counter()
            b = front.pick()
            sid = uuid.uuid4().hex
            front.sessions[sid] = (b.index, b.instance)
            b.assigned[sid] = time.monotonic()
            costs.append(time.perf_counter() - t0)
            pool.state[b.index]["sessions"][sid] = "waiting"
            lines[b.index].append((time.monotonic(), sid))
            peak = max(peak, sum(len(x) for x in lines))
            await asyncio.sleep(arrival)
        while any(lines) or len(waits) < clients:
            await asyncio.sleep(0.05)
        for t in servers + [poller]:
            t.cancel()
        ideal = clients * hold / replicas
        return {"replicas": replicas, "clients": clients, "route_us_median": round(statistics.median(costs) * 1e6, 1),
                "route_us_max": round(max(costs) * 1e6, 1), "peak_waiting": peak,
                "wait_s_median": round(statistics.median(waits), 2), "wait_s_max": round(max(waits), 2),
                "wait_s_max_one_fifo_line": round(ideal - hold, 2)}

    return asyncio.run(main())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("graph", nargs="?")
    p.add_argument("--clients", type=int, default=300)
    p.add_argument("--replicas", type=int, default=8)
    a = p.parse_args(argv)
    if a.graph:
        print(signalling(a.graph))
    print(simulate(a.replicas, a.clients))


if __name__ == "__main__":
    sys.exit(main())
