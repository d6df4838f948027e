"""One replica: an engine (loaded once) and today's in-process server on its own port.

The server is the one `reactor-graph run` serves (server/app.py: the line, negotiation, the data channel)
on an event loop in a thread of its own, so the media flows between the client and this process. Only the
front starts or stops sessions here: those routes need a token that only the front has (`internal_token`);
a session's own routes are guarded by its id, as today. The front passes the client's address (for the
per-address limits) in REMOTE_HEADER, which is trusted only with that token.

The line is the front's (one across replicas): the manager is `directed`, and the front starts waiting clients
and tells their positions through the internal routes (internal.py), which also carry relays between replicas
(relay.py) for a client whose engine is another replica's.
"""
from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
import uuid
from typing import Any

from aiohttp import web

REMOTE_HEADER = "X-Reactor-Client-Address"


def forwarded_remote(token: str):
    """aiohttp middleware: the client's address as the front saw it (only from the front)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler):
        remote = request.headers.get(REMOTE_HEADER)
        auth = request.headers.get("Authorization", "").encode()
        if remote and hmac.compare_digest(auth, expected):
            request = request.clone(remote=remote[:100])
        return await handler(request)

    return middleware


class ReplicaServer:
    """`start()` serves `engine` on `bind`:0 in a thread; `status()` and `metrics_text()` for the front."""

    def __init__(self, engine: Any, internal_token: str, bind: str = "127.0.0.1", index: int = 0,
                 relay_compress: bool = False, **settings: Any):
        self.engine = engine
        self.token = internal_token
        self.bind = bind
        self.index = index
        self.settings = settings
        self.relay_compress = relay_compress  # blocks relayed from this engine: zlib'd (relay_wire.py)
        self.internal = None
        self.instance = uuid.uuid4().hex[:12]  # a restarted replica is another instance
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.url: str | None = None
        self.fatal: str | None = None  # the engine is stuck for good: unhealthy, to be replaced
        self.started = time.time()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"replica-{index}", daemon=True)

    def _main(self) -> None:
        from ..server.access import AccessPolicy
        from ..server.app import Server

        asyncio.set_event_loop(self.loop)
        try:
            self.server = Server(self.engine, access=AccessPolicy(bind=self.bind, token=self.token),
                                 **self.settings)
            from .internal import InternalRoutes

            self.server.app.middlewares.insert(0, forwarded_remote(self.token))
            self.server.manager.directed = True
            self.internal = InternalRoutes(self)
            self.internal.add_to(self.server.app)
            self.url = self.loop.run_until_complete(self.server.start(self.bind, 0))
            self.server.manager.on_fatal = self._give_up
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def _give_up(self, reason: str) -> None:
        self.fatal = reason

    def start(self, timeout: float = 60) -> ReplicaServer:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the replica's server did not start")
        if self._error:
            raise self._error
        return self

    def call(self, coro, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _status(self) -> dict:
        m = self.server.manager
        active = m.active
        stats = m.stats(active) if active is not None else {}
        hosted = [c for c in m.clients.values() if not c.relayed]  # a relay's stand-in is counted at its host
        return {
            "index": self.index, "instance": self.instance, "url": self.url, "pid": os.getpid(),
            "ok": not m.stuck and self.fatal is None, "reason": self.fatal or m.stuck_reason,
            "busy": bool(self.engine.busy), "in_session": active is not None, "queue": len(m.waiting),
            "clients": len(hosted), "sessions": {c.id: c.state for c in hosted},
            "ready": [c.id for c in m.waiting if m.ready_to_start(c)],
            "free": active is None and not self.engine.busy and not m.stuck and not m.closing,
            "relays": not m.media.tracks(),  # a client's camera is not relayed: such graphs keep sessions home
            "relayed": sum(c.relay is not None for c in hosted),
            "fps": stats.get("fps", 0.0), "target_fps": float(self.engine.fps),
            "blocks": int(self.engine.stats.blocks), "errors": _errors(m.metrics),
        }

    def status(self) -> dict:
        return self.call(self._status())

    async def _metrics_text(self) -> str:
        m = self.server.manager
        tracks = [c.track for c in m.clients.values() if c.track is not None]
        depth = m.active.track.depth if m.active is not None and m.active.track is not None else 0
        return self.server.metrics.render(self.engine, tracks, m.active is not None, len(m.waiting),
                                          len(m.clients), depth, m.stuck)

    def metrics_text(self) -> str:
        return self.call(self._metrics_text())

    def healthy(self) -> tuple[bool, str | None]:
        if not self._thread.is_alive() or self.server is None:
            return False, "the replica's server thread is not running"
        if self.fatal:
            return False, self.fatal
        return True, None

    def end_all(self, reason: str) -> None:
        """End every session here, telling each client why (before this replica goes away)."""
        m = self.server.manager

        async def end():
            await asyncio.gather(*(m.end(c, reason, reason) for c in list(m.clients.values())),
                                 return_exceptions=True)
        self.call(end(), timeout=30)

    def kill(self) -> None:
        """A fault (tests): this replica's process dies; its connections drop, nothing is said to anyone."""
        def die():
            runner = self.server.runner
            try:
                for site in list(runner.sites):
                    site._server.close()  # no new connections
                for handler in runner.server.connections:  # the open ones (websockets included) reset
                    if handler.transport is not None:
                        handler.transport.abort()
                http = self.internal.http if self.internal is not None else None
                if http is not None:  # this replica's own relays to other replicas' engines
                    for proto in list(http.connector._acquired) + [p for ps in http.connector._conns.values()
                                                                   for p, _ in ps]:
                        if proto.transport is not None:
                            proto.transport.abort()
                for c in self.server.manager.clients.values():
                    if c.track is not None:
                        c.track.close_producer()  # the engine thread would be gone with the process
            finally:  # after the aborts' own callbacks (which close the sockets), as the kernel would
                self.loop.call_soon(self.loop.stop)
        self.fatal = "killed"
        self.loop.call_soon_threadsafe(die)
        self._thread.join(10)

    def stop(self, timeout: float = 30) -> None:
        if self.server is not None and self.loop.is_running():
            try:
                self.call(self.server.close(), timeout)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self.loop.is_running():
            self.loop.close()
        try:
            self.engine.stop(5)
        except Exception:  # noqa: BLE001
            pass


def _errors(metrics: Any) -> float:
    """Errors a replica counted: node errors, refused messages, HTTP errors."""
    total = 0.0
    for (name, labels), value in list(metrics.counters.items()):
        if name in ("http_errors_total", "messages_rejected_total") or (
                name == "sessions_ended_total" and ("engine" in str(labels) or "watchdog" in str(labels))):
            total += value
    return total
