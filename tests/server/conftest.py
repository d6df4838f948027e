"""Server test fixtures: the real server on 127.0.0.1 (a random free port) in a thread of its own, and a
Python aiortc client that speaks the Reactor JS SDK's local-mode protocol."""
from __future__ import annotations

import asyncio
import faulthandler
import json
import sys
import threading
import time
from typing import Any

import aiohttp
import pytest

def _loopback_ice_when_alone():
    """aioice leaves 127.0.0.1 out of its host candidates; on a machine with no other interface, put it back
    so that the loopback tests still connect."""
    import aioice.ice

    original = aioice.ice.get_host_addresses
    if not original(use_ipv4=True, use_ipv6=False):
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: original(use_ipv4, use_ipv6) or (
            ["127.0.0.1"] if use_ipv4 else [])


_loopback_ice_when_alone()

HANG_LIMIT = 180  # seconds: a test running longer than this is stuck; dump stacks and exit


@pytest.fixture(autouse=True)
def _no_hang():
    faulthandler.dump_traceback_later(HANG_LIMIT, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


def run(coro, timeout: float = 60):
    """Run a coroutine in a fresh loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class ServerThread:
    """reactor_graph.server.app.Server on its own event loop in a daemon thread."""

    def __init__(self, engine, **options):
        from reactor_graph.server.app import Server

        self.engine = engine
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.url: str | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="test-server", daemon=True)
        self._Server = Server

    def _main(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self._Server(self.engine, **self.options)
            self.url = self.loop.run_until_complete(self.server.start("127.0.0.1", 0))
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self, timeout: float = 20) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start")
        if self._error:
            raise self._error
        return self

    def call(self, coro, timeout: float = 20) -> Any:
        """Run a coroutine on the server's loop (to inspect or poke its state)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, fn, timeout: float = 10) -> Any:
        async def wrap():
            return fn()
        return self.call(wrap(), timeout)

    def stop(self, timeout: float = 30) -> None:
        if self.server is not None and self.loop.is_running():
            try:
                self.call(self.server.close(), timeout)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the server thread did not stop"
        self.loop.close()
        try:
            self.engine.stop(5)
        except Exception:  # noqa: BLE001
            pass

    @property
    def manager(self):
        return self.server.manager


@pytest.fixture
def serve_engine():
    """serve_engine(engine, **settings) -> a started ServerThread; stopped at teardown."""
    started: list[ServerThread] = []

    def make(engine, **options) -> ServerThread:
        s = ServerThread(engine, **options).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def served(tiny_engine, serve_engine):
    """The tiny graph's engine served with short timeouts."""
    return serve_engine(tiny_engine(), ping_timeout=15, connect_timeout=15)


class SdkClient:
    """What `new Reactor({local: true, apiUrl})` does on the wire, in Python with aiortc."""

    def __init__(self, url: str, ping: bool = True):
        self.url = url
        self.ping = ping
        self.session: dict | None = None
        self.pc = None
        self.channel = None
        self.messages: list[dict] = []
        self.raw: list[Any] = []
        self.frames: list[tuple[float, Any]] = []  # (arrival time, av.VideoFrame)
        self._tasks: list[asyncio.Task] = []
        self._changed: asyncio.Event | None = None
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self):
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        return self

    async def __aexit__(self, *exc):
        await self.close(stop=False)

    # -- HTTP ------------------------------------------------------------------------------------------
    async def start_session(self) -> dict:
        async with self.http.post(self.url + "/start_session", json={},
                                  headers={"Reactor-API-Version": "1", "Reactor-API-Accept-Version": "1"}) as r:
            assert r.status == 200, await r.text()
            self.session = await r.json()
        return self.session

    @property
    def base(self) -> str:
        return f"{self.url}/sessions/{self.session['session_id']}/transport/webrtc"

    async def connect(self, max_polls: int = 6) -> None:
        self._changed = asyncio.Event()
        if self.session is None:
            await self.start_session()
        await self._negotiate("post", max_polls)

    async def _negotiate(self, method: str = "post", max_polls: int = 6) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        hdr = {"Authorization": "Bearer local", "Reactor-WebRTC-Version": "1.0"}
        async with self.http.get(self.base + "/ice_servers", headers=hdr) as r:
            assert r.status == 200
            ice = await r.json()
        assert ice == {"ice_servers": []}
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = pc.createDataChannel("data")
        self.channel.on("message", self._on_message)
        self.channel.on("open", self._on_open)
        transceivers = []
        for t in self.session["capabilities"]["tracks"]:
            transceivers.append(pc.addTransceiver(t["kind"], direction=t["direction"]))

        @pc.on("track")
        def on_track(track):
            self._tasks.append(asyncio.ensure_future(self._read(track)))

        await pc.setLocalDescription(await pc.createOffer())
        mapping = [{"mid": tr.mid, **{k: t[k] for k in ("name", "kind", "direction")}}
                   for tr, t in zip(transceivers, self.session["capabilities"]["tracks"])]
        body = {"sdp_offer": pc.localDescription.sdp, "client_info": {"sdk_version": "2.9.0", "sdk_type": "js"},
                "track_mapping": mapping}
        async with self.http.request(method.upper(), self.base + "/sdp_params", json=body, headers=hdr) as r:
            assert r.status == 202, (r.status, await r.text())
        answer = None
        delay = 0.2
        for _ in range(max_polls):
            async with self.http.get(self.base + "/sdp_params", headers=hdr) as r:
                if r.status == 200:
                    answer = (await r.json())["sdp_answer"]
                    break
                assert r.status == 202, r.status
            await asyncio.sleep(delay)
            delay *= 2
        assert answer, "no SDP answer"
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def reconnect(self) -> None:
        """What `reactor.reconnect()` does: a new peer connection and data channel, PUT sdp_params."""
        old = self.pc
        self.session_keep = self.session
        self.pc = None
        await self._negotiate(method="put")
        await asyncio.wait_for(old.close(), 10)

    async def stop_session(self, with_id: bool = True) -> dict:
        body = {"session_id": self.session["session_id"]} if with_id else None
        async with self.http.post(self.url + "/stop_session", json=body) as r:
            return await r.json()

    async def close(self, stop: bool = True) -> None:
        if stop and self.session is not None:
            try:
                await self.stop_session()
            except Exception:  # noqa: BLE001
                pass
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.pc is not None:
            await asyncio.wait_for(self.pc.close(), 10)
        if self.http is not None:
            await self.http.close()
            self.http = None

    # -- data channel ----------------------------------------------------------------------------------
    def _on_open(self):
        if self.ping:
            self._tasks.append(asyncio.ensure_future(self._pinger()))

    async def _pinger(self):
        while True:
            self.send("runtime", "ping", {})
            await asyncio.sleep(5)

    def _on_message(self, raw):
        self.raw.append(raw)
        try:
            self.messages.append(json.loads(raw))
        except ValueError:
            self.messages.append({"scope": None, "data": raw})
        self._changed.set()

    def send(self, scope: str, kind: str, data: Any = None) -> None:
        self.channel.send(json.dumps({"scope": scope, "data": {"type": kind, "data": {} if data is None else data}}))

    def send_raw(self, text: Any) -> None:
        self.channel.send(text)

    async def _read(self, track):
        try:
            while True:
                frame = await track.recv()
                self.frames.append((time.monotonic(), frame))
                self._changed.set()
        except Exception:  # noqa: BLE001 - the track ended
            return

    def inner(self, scope: str | None = None, kind: str | None = None) -> list[dict]:
        return [m["data"] for m in self.messages if isinstance(m, dict) and isinstance(m.get("data"), dict)
                and (scope is None or m.get("scope") == scope) and (kind is None or m["data"].get("type") == kind)]

    async def wait_for(self, predicate, timeout: float = 15, what: str = "condition"):
        end = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; messages: "
                                     f"{self.messages[-10:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))
            except asyncio.TimeoutError:
                pass

    async def wait_message(self, scope: str, kind: str, timeout: float = 15, after: int = 0,
                           where=lambda d: True) -> dict:
        def find():
            found = [d for d in self.inner(scope, kind)[after:] if where(d.get("data"))]
            return found[0] if found else None
        return await self.wait_for(find, timeout, f"{scope}/{kind}")

    async def wait_ready(self, timeout: float = 20) -> None:
        await self.wait_for(lambda: self.pc.connectionState == "connected" and self.channel.readyState == "open",
                            timeout, "connected + data channel open")


@pytest.fixture
def sdk_client():
    return SdkClient


def nonblank(frame) -> bool:
    """True when a yuv420p frame is not the idle black (Y=16) frame."""
    import numpy as np

    y = frame.to_ndarray(format="yuv420p")[: frame.height]
    return float(np.abs(y.astype(int) - 16).mean()) > 1.0


@pytest.fixture
def is_nonblank():
    return nonblank


@pytest.fixture
def arun():
    return run


def _load_cdp():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("rg_test_cdp", Path(__file__).with_name("cdp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def chromium():
    """The Chromium driver class, bound to the installed browser; skips when there is none."""
    cdp = _load_cdp()
    binary = cdp.find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    return lambda: cdp.Chromium(binary)
