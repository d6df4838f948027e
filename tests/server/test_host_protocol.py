"""The server needs only the StreamHost protocol: a fake host drives the paths a real graph rarely takes
(a node error mid-session, a producer much faster than the stream, a session that will not stop)."""
import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import torch

from reactor_graph.emit import Block
from reactor_graph.host import HostFeatures
from reactor_graph.errors import CommandError, SessionError


class FakeHost(HostFeatures):
    name = "fake"
    version = "9.9"
    fps = 20.0
    height = 16
    width = 16

    def __init__(self, block_s=0.05, frames=2, fail_at=None, stubborn_s=0.0):
        self.block_s, self.frames, self.fail_at, self.stubborn_s = block_s, frames, fail_at, stubborn_s
        self.stats = SimpleNamespace(sessions=0, blocks=0, frames=0, errors=0, last_block_s=0.0, slowest_block_s=0.0)
        self.level = 0
        self._pending = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.results = []
        self.on_message = None  # set by the server: a model's own messages to its client

    @property
    def busy(self):
        return self._thread is not None and self._thread.is_alive()

    def command_schemas(self):
        return [{"name": "set_level", "description": "Grey level",
                 "schema": {"type": "object", "required": ["level"],
                            "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 255},
                                           "mode": {"enum": ["a", "b"], "type": "string", "default": "a"}}}}]

    def submit(self, name, params=None, reply=None):
        if name != "set_level":
            raise CommandError(name, "unknown command")
        level = (params or {}).get("level")
        if not isinstance(level, int) or not 0 <= level <= 255:
            raise CommandError(name, "must be an integer in [0, 255]", "level")
        with self._lock:
            self._pending.append((level, reply))

    def start_session(self, on_block, on_end=None, max_blocks=None):
        if self.busy:
            raise SessionError("busy")
        self._stop.clear()
        self.stats.sessions += 1

        def body():
            result = SimpleNamespace(blocks=0, reason="stopped", error=None, node=None)
            while not self._stop.is_set():
                with self._lock:
                    pending, self._pending = self._pending, []
                for level, reply in pending:
                    self.level = level
                    reply and reply({"ok": True})
                if self.fail_at is not None and result.blocks == self.fail_at:
                    self.stats.errors += 1
                    result.reason, result.node = "error", "decode"
                    result.error = "node 'decode' (fake) failed in forward: RuntimeError: boom"
                    break
                if result.blocks == 2 and self.on_message is not None:
                    self.on_message({"type": "progress", "data": {"block": 2}})
                t0 = time.perf_counter()
                time.sleep(self.block_s)
                host = torch.full((self.frames, self.height * 3 // 2, self.width), 128, dtype=torch.uint8)
                host[:, : self.height] = 16 + (result.blocks * 7 + self.level) % 200
                block = Block(result.blocks, "yuv420p", self.frames, self.height, self.width, t0,
                              ready=time.perf_counter(), _host=host)
                self.stats.blocks += 1
                self.stats.frames += self.frames
                result.blocks += 1
                try:
                    on_block(block)
                except Exception as exc:  # noqa: BLE001
                    result.reason, result.error = "sink", str(exc)
                    break
            if self.stubborn_s:
                time.sleep(self.stubborn_s)
            self.results.append(result)
            if on_end:
                on_end(result)

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout=None):
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise SessionError("watchdog: the session did not stop")
        self._thread = None


def test_a_node_error_is_told_to_the_client_and_the_next_one_is_served(serve_engine, sdk_client, arun):
    host = FakeHost(fail_at=6)
    served = serve_engine(host)

    async def main():
        async with sdk_client(served.url) as a, sdk_client(served.url) as b:
            s = await a.start_session()
            assert s["model"] == {"name": "fake", "version": "9.9"}
            assert s["capabilities"]["commands"][0]["schema"] == {
                "level": {"type": "integer", "minimum": 0, "maximum": 255, "required": True},
                "mode": {"type": "string", "enum": ["a", "b"], "default": "a", "required": False}}
            await a.connect()
            await a.wait_ready()
            await b.connect()
            await b.wait_ready()
            err = await a.wait_message("runtime", "error", timeout=15)
            assert err["data"]["code"] == "node_error" and err["data"]["node"] == "decode"
            assert "RuntimeError: boom" in err["data"]["message"]
            ended = await a.wait_message("runtime", "sessionEnded", timeout=10)
            assert ended["data"]["reason"] == "engine: error" and "boom" in ended["data"]["error"]
            await a.wait_for(lambda: a.pc.connectionState in ("closed", "failed") or
                             a.channel.readyState != "open", 20, "the server to close the connection")
            host.fail_at = None
            await b.wait_message("runtime", "sessionStarted", timeout=15)
            b.send("application", "set_level", {"level": 300})
            r = await b.wait_message("application", "commandResult")
            assert r["data"]["error"]["field"] == "level"
            b.send("application", "set_level", {"level": 100})
            r = await b.wait_message("application", "commandResult", where=lambda d: d["ok"])
            assert host.level == 100

    arun(main(), 60)


def test_lossless_with_a_fast_producer_does_not_deadlock_at_session_end(serve_engine, sdk_client, arun):
    host = FakeHost(block_s=0.0)  # as fast as it can: the queue stays full and the producer waits
    served = serve_engine(host, policy="lossless", queue_frames=4)

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            await asyncio.sleep(1.0)
            track = served.sync(lambda: served.manager.active.track)
            assert track.depth >= 3 and track.drops == 0
            # the engine runs at the stream's pace, not flat out
            assert host.stats.blocks * host.frames <= track.sent + 4 + 2 * host.frames
            t0 = time.monotonic()
            await c.stop_session()
            await c.wait_for(lambda: not host.busy, 5, "the session to stop")
            assert time.monotonic() - t0 < 2.0

    arun(main(), 30)
    assert host.results and host.results[-1].reason == "stopped"


def test_latest_drops_and_counts(serve_engine, sdk_client, arun):
    host = FakeHost(block_s=0.0, frames=4)
    served = serve_engine(host, policy="latest", queue_frames=4)

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            stats = await c.wait_message("runtime", "stats", where=lambda d: d.get("drops", 0) > 0)
            assert stats["data"]["policy"] == "latest"
            async with __import__("aiohttp").ClientSession() as http:
                async with http.get(served.url + "/metrics") as r:
                    text = await r.text()
            line = next(x for x in text.splitlines() if x.startswith("reactor_graph_frames_dropped_total"))
            assert float(line.split()[-1]) > 0

    arun(main(), 30)


def test_a_session_that_will_not_stop_holds_the_line_until_it_does(serve_engine, sdk_client, arun):
    host = FakeHost(stubborn_s=1.5)
    served = serve_engine(host, stop_timeout=0.3)

    async def main():
        async with sdk_client(served.url) as a, sdk_client(served.url) as b:
            await a.connect()
            await a.wait_ready()
            await a.wait_message("runtime", "sessionStarted")
            await b.connect()
            await b.wait_ready()
            await b.wait_message("runtime", "queue")
            await a.stop_session()
            await asyncio.sleep(0.5)
            assert served.manager.stuck and not b.inner("runtime", "sessionStarted")
            async with __import__("aiohttp").ClientSession() as http:
                async with http.get(served.url + "/health") as r:
                    assert (await r.json())["ok"] is False
            await b.wait_message("runtime", "sessionStarted", timeout=10)  # once the old one ended
            assert not served.manager.stuck

    arun(main(), 30)


def test_frames_reach_the_client_with_their_content(serve_engine, sdk_client, arun):
    host = FakeHost(block_s=0.02)
    served = serve_engine(host)

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            c.send("application", "set_level", {"level": 150})
            await c.wait_message("application", "commandResult")
            progress = await c.wait_message("application", "progress")  # the model's own message, as sent
            assert progress == {"type": "progress", "data": {"block": 2}}
            await c.wait_for(lambda: len(c.frames) > 10, 15, "frames")
            ys = [float(np.mean(f.to_ndarray(format="yuv420p")[:16])) for _, f in c.frames[-5:]]
            assert all(y > 20 for y in ys)  # not the idle black

    arun(main(), 30)
