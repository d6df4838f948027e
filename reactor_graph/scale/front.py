"""The front: one address with today's routes (README) in front of N replicas (replica.py).

A new session goes to a replica chosen at `start_session` (its *host*: a free one when there is one, else
the one with the fewest clients; ties: the lower index), which answers its SDP and holds its peer connection
and data channel for the whole session (the media flows between the client and it directly: the front relays
only the HTTP signalling); every later request with its session id goes to that replica. The SDK neither
waits more than ~12 s for an answer nor renegotiates by itself, and a peer connection cannot leave its process,
so the host never changes. The engine may: the line is one across replicas (line.py), in arrival order here,
and the front gives each free engine to the first ready client wherever it is hosted; a client whose engine
is another replica's gets its frames and messages through a relay between the two (relay.py). Positions are
places in the whole line, told to each host (`/internal/line`) for today's `queue` messages.

Uploads (the SDK's `uploadFile`) follow their session: `POST /sessions/{id}/uploads` goes to the session's replica and
the presigned PUT address in its answer is rewritten to the front's own (a replica's address is not the client's to
reach), so the PUT comes here too and is relayed to the same replica, its declared size bounded here before a byte
is read. The follow-ups (`fileUploaded`, the command that names the FileRef) ride the data channel, which is the
replica's already. The replica's refusals come back as they are, reason phrase included (the SDK shows only the
status line).

`/health` and `/metrics` aggregate the replicas. A replica that stops answering gets no new sessions; one
that comes back as another instance (Ray restarted it) has lost its sessions, which end with the reason
(their session routes answer 404 with it). The front refuses `start_session` with 503 when no replica is
ready. Origin, host and token rules (access.py) hold at the front, as at a single server.

`pool` is what the front knows of the replicas: `len(pool)` and `await pool.status(i)` (replica.py's
status dict; raises when the replica does not answer), `await pool.metrics(i)` (Prometheus text).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from ..inputs import MAX_IMAGE_BYTES
from ..server import rtc_guards
from ..server.access import AccessPolicy
from ..server.app import _text_error, build_app
from ..server.metrics import CONTENT_TYPE, Metrics
from .front_line import LineRunner
from .replica import REMOTE_HEADER

log = logging.getLogger("reactor_graph.scale")

FORWARD_HEADERS = ("Content-Type", "Reactor-API-Version", "Reactor-API-Accept-Version", "Reactor-WebRTC-Version")
ASSIGN_GRACE = 3.0  # s: a session just assigned counts on its replica before the replica's status shows it


@dataclass
class Backend:
    index: int
    status: dict | None = None  # the latest answer
    healthy: bool = False
    reason: str | None = "starting"
    instance: str | None = None
    seen: float = 0.0
    assigned: dict[str, float] = field(default_factory=dict)  # session id -> when the front assigned it

    @property
    def url(self) -> str | None:
        return self.status.get("url") if self.status else None

    def live(self) -> set[str]:
        ids = set((self.status or {}).get("sessions", {}))
        now = time.monotonic()
        return ids | {i for i, t in self.assigned.items() if now - t < ASSIGN_GRACE}


class Front(LineRunner):
    def __init__(self, pool: Any, access: AccessPolicy | None = None, model: str = "",
                 poll_interval: float = 0.25, status_timeout: float = 3.0, max_upload_bytes: int = MAX_IMAGE_BYTES):
        self.pool = pool
        self.max_upload_bytes = max_upload_bytes  # a PUT body larger than this is refused unread (the replicas' own)
        self.access = access or AccessPolicy()
        self.model = model
        self.poll_interval = poll_interval
        self.status_timeout = status_timeout
        self.metrics = Metrics()
        self.backends = [Backend(i) for i in range(len(pool))]
        self.sessions: dict[str, tuple[int, str | None]] = {}  # session id -> (replica, instance)
        self.ended: dict[str, str] = {}  # session id -> why (sessions lost with their replica), bounded
        self.order: dict[str, int] = {}  # session id -> its arrival here: its place in the one line
        self._arrivals = itertools.count()
        self._told: dict[int, tuple] = {}  # replica -> (instance, the positions it was last told)
        self._line_lock = asyncio.Lock()
        self._kicks: set[asyncio.Task] = set()
        self._watchers: list[asyncio.Task] = []
        self.http: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.url: str | None = None
        self._poller: asyncio.Task | None = None
        self._commands: dict | None = None
        self.app = self._build()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _build(self) -> web.Application:
        # a session's own routes go to its replica as they are; uploads too, their PUT address made the front's
        return build_app(self.access, self.metrics, {
            "start_session": self.start_session, "stop_session": self.stop_session,
            "ice_servers": self.relay, "sdp_offer": self.relay, "sdp_answer": self.relay, "uploads": self.uploads,
            "upload_put": self.upload_put, "health": self.health, "metrics": self.prometheus,
            "api_commands": self.api_commands, "index": self.index})

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> str:
        self.access.bind = host
        rtc_guards.guard_text_frames()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                          connector=aiohttp.TCPConnector(limit=256))
        await self.refresh()
        self._poller = asyncio.create_task(self._poll())
        self._watchers = [asyncio.create_task(self._watch(b)) for b in self.backends]
        self.runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else port
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        return self.url

    @property
    def page_url(self) -> str:
        token = self.access.token
        return f"{self.url}/auth/{token}/" if token else f"{self.url}/"

    async def close(self) -> None:
        for task in list(self._kicks) + self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        if self._poller:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.runner is not None:
            await asyncio.wait_for(self.runner.cleanup(), 10.0)
            self.runner = None
        if self.http is not None:
            await self.http.close()

    async def wait_ready(self, n: int | None = None, timeout: float = 120) -> None:
        """Until `n` replicas (default: all) are ready."""
        want = len(self.backends) if n is None else n
        end = time.monotonic() + timeout
        while sum(b.healthy for b in self.backends) < want:
            if time.monotonic() > end:
                raise TimeoutError(f"{sum(b.healthy for b in self.backends)} of {want} replicas ready: "
                                   f"{[b.reason for b in self.backends]}")
            await asyncio.sleep(0.1)

    # -- what the front knows of the replicas ----------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.refresh()
                await self.run_line()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("polling the replicas failed")

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh(b) for b in self.backends))

    async def _refresh(self, b: Backend) -> None:
        try:
            st = await asyncio.wait_for(self.pool.status(b.index), self.status_timeout)
        except Exception as exc:  # noqa: BLE001 - dead, restarting, or hung
            if b.healthy:
                log.warning("replica %d does not answer: %s", b.index, exc or type(exc).__name__)
                self.metrics.inc("replica_failures_total", replica=str(b.index))
            b.healthy, b.reason = False, f"not answering ({type(exc).__name__})"
            return
        if b.instance is not None and st["instance"] != b.instance:
            self._lost(b, b.instance, f"replica {b.index} crashed; it was restarted")
        b.status, b.instance, b.seen = st, st["instance"], time.monotonic()
        b.healthy, b.reason = bool(st.get("ok")), st.get("reason")
        live = set(st.get("sessions", {}))
        now = time.monotonic()
        b.assigned = {i: t for i, t in b.assigned.items() if i not in live and now - t < ASSIGN_GRACE}
        for sid, (index, instance) in list(self.sessions.items()):
            if index == b.index and instance == b.instance and sid not in live and sid not in b.assigned:
                del self.sessions[sid]  # ended there (stop_session, closed, ...)
                self.order.pop(sid, None)

    def _lost(self, b: Backend, instance: str, reason: str) -> None:
        for sid, (index, inst) in list(self.sessions.items()):
            if index == b.index and inst == instance:
                del self.sessions[sid]
                self.order.pop(sid, None)
                self.ended[sid] = reason
                self.metrics.inc("sessions_lost_total", replica=str(b.index))
        while len(self.ended) > 10000:
            self.ended.pop(next(iter(self.ended)))

    def pick(self) -> Backend | None:
        """A free replica, or the one with the fewest clients; None when none is ready."""
        ready = [b for b in self.backends if b.healthy and b.url]
        if not ready:
            return None
        return min(ready, key=lambda b: (len(b.live()), bool(b.status.get("busy")), b.index))

    # -- relaying ------------------------------------------------------------------------------------------
    async def _forward(self, b: Backend, method: str, path: str, request: web.Request, body: bytes | None,
                       internal: bool = False) -> tuple[int, bytes, str]:
        status, data, ctype, _ = await self._forward_full(b, method, path, request, body, internal)
        return status, data, ctype

    async def _forward_full(self, b: Backend, method: str, path: str, request: web.Request, body: bytes | None,
                            internal: bool = False) -> tuple[int, bytes, str, str | None]:
        """The replica's answer: status, body, content type and reason phrase."""
        headers = {k: request.headers[k] for k in FORWARD_HEADERS if k in request.headers}
        if internal:
            headers["Authorization"] = f"Bearer {self.pool.token}"
            headers[REMOTE_HEADER] = request.remote or ""
        async with self.http.request(method, b.url + path, data=body, headers=headers) as r:
            return r.status, await r.read(), r.content_type, r.reason

    def _relay_error(self, b: Backend, exc: Exception) -> web.Response:
        self.metrics.inc("relay_errors_total", replica=str(b.index))
        b.healthy, b.reason = False, f"relay failed ({type(exc).__name__})"
        return _text_error(502, f"replica {b.index} did not answer; try again")

    async def start_session(self, request: web.Request) -> web.Response:
        body = await request.read()
        b = self.pick()
        if b is None:
            self.metrics.inc("http_errors_total", route="start_session")
            return _text_error(503, f"no replica is ready ({len(self.backends)} configured: "
                                    f"{'; '.join(str(x.reason) for x in self.backends)})")
        try:
            status, data, ctype = await self._forward(b, "POST", "/start_session", request, body, internal=True)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return self._relay_error(b, exc)
        if status == 200:
            sid = json.loads(data)["session_id"]
            self.sessions[sid] = (b.index, b.instance)
            self.order[sid] = next(self._arrivals)
            b.assigned[sid] = time.monotonic()
            self.metrics.inc("sessions_routed_total", replica=str(b.index))
        return web.Response(status=status, body=data, content_type=ctype)

    async def stop_session(self, request: web.Request) -> web.Response:
        session_id = request.query.get("session_id")
        if session_id is None and request.can_read_body:
            try:
                body = json.loads(await request.text() or "null")
                if isinstance(body, dict) and isinstance(body.get("session_id"), str):
                    session_id = body["session_id"]
            except (ValueError, UnicodeDecodeError):
                pass
        if session_id is None:
            live = list(self.sessions)
            if len(live) != 1:
                return web.json_response({"ok": False, "stopped": None, "reason": "no session_id given and more "
                                          "than one client; the session ends when its connection closes"})
            session_id = live[0]
        bound = self.sessions.get(session_id)
        if bound is None:
            return web.json_response({"ok": False, "stopped": None,
                                      "reason": self.ended.get(session_id, "unknown session")})
        b = self.backends[bound[0]]
        try:
            status, data, ctype = await self._forward(b, "POST", "/stop_session", request,
                                                      json.dumps({"session_id": session_id}).encode(), True)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return self._relay_error(b, exc)
        self.sessions.pop(session_id, None)
        self.order.pop(session_id, None)
        task = asyncio.ensure_future(self._kick())
        self._kicks.add(task)
        task.add_done_callback(self._kicks.discard)
        return web.Response(status=status, body=data, content_type=ctype)

    def _owner(self, request: web.Request) -> Backend | web.Response:
        """The replica serving the request's session, or the 404 to answer."""
        sid = request.match_info["session_id"]
        bound = self.sessions.get(sid)
        if bound is None or not self.backends[bound[0]].url:
            self.metrics.inc("http_errors_total", route="unknown_session")
            why = self.ended.get(sid)
            return _text_error(404, "unknown or ended session" + (f": {why}" if why else ""))
        return self.backends[bound[0]]

    @staticmethod
    def _replica_path(request: web.Request) -> str:
        token = request.match_info.get("token")
        return request.path.removeprefix(f"/auth/{token}") if token is not None else request.path

    async def relay(self, request: web.Request) -> web.Response:
        """A session's own routes: to its replica, as they are."""
        b = self._owner(request)
        if isinstance(b, web.Response):
            return b
        body = await request.read() if request.can_read_body else None
        try:
            status, data, ctype = await self._forward(b, request.method, self._replica_path(request), request, body)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return self._relay_error(b, exc)
        return web.Response(status=status, body=data, content_type=ctype)

    async def uploads(self, request: web.Request) -> web.Response:
        """uploadFile, step 1, at the session's replica; the PUT address it answers becomes the front's."""
        b = self._owner(request)
        if isinstance(b, web.Response):
            return b
        body = await request.read() if request.can_read_body else None
        try:
            status, data, ctype, reason = await self._forward_full(b, "POST", self._replica_path(request), request,
                                                                   body)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return self._relay_error(b, exc)
        if status != 200:
            return web.Response(status=status, reason=reason, body=data, content_type=ctype)
        try:
            slot = json.loads(data)
            upload_id = slot["presigned_id"]
            if not isinstance(upload_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", upload_id):
                raise ValueError(upload_id)
        except (ValueError, KeyError, TypeError):
            return _text_error(502, f"replica {b.index} answered the upload with something else than a slot")
        token = request.match_info.get("token")
        base = f"{request.scheme}://{request.host}" + (f"/auth/{token}" if token else "")
        slot["presigned_url"] = f"{base}/sessions/{request.match_info['session_id']}/uploads/{upload_id}"
        return web.json_response(slot)

    async def upload_put(self, request: web.Request) -> web.Response:
        """uploadFile, step 2: the bytes, bounded here, to the session's replica (which checks them)."""
        b = self._owner(request)
        if isinstance(b, web.Response):
            return b
        limit = self.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            return web.Response(status=413, reason=f"the file is larger than {limit} bytes",
                                text=f"the file is {request.content_length} bytes; at most {limit} are accepted",
                                content_type="text/plain")
        data = bytearray()
        while chunk := await request.content.read(64 * 1024):
            data += chunk
            if len(data) > limit:
                return web.Response(status=413, reason=f"the file is larger than {limit} bytes",
                                    text=f"the body is larger than {limit} bytes", content_type="text/plain")
        try:
            status, body, ctype, reason = await self._forward_full(b, "PUT", self._replica_path(request), request,
                                                                   bytes(data))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return self._relay_error(b, exc)
        return web.Response(status=status, reason=reason, body=body, content_type=ctype)

    # -- aggregated ----------------------------------------------------------------------------------------
    def _replicas(self) -> list[dict]:
        out = []
        for b in self.backends:
            st = b.status or {}
            out.append({"replica": b.index, "ok": b.healthy, "reason": b.reason, "instance": b.instance,
                        "busy": bool(st.get("busy")), "in_session": bool(st.get("in_session")),
                        "queue": int(st.get("queue", 0)), "clients": int(st.get("clients", 0)),
                        "relayed": int(st.get("relayed", 0)),
                        "fps": st.get("fps", 0.0), "blocks": st.get("blocks", 0), "errors": st.get("errors", 0),
                        "age_s": round(time.monotonic() - b.seen, 2) if b.seen else None})
        return out

    async def health(self, request: web.Request) -> web.Response:
        reps = self._replicas()
        ok = [r for r in reps if r["ok"]]
        first = next((b.status for b in self.backends if b.status), {}) or {}
        return web.json_response({
            "ok": bool(ok), "reason": None if ok else "no replica is ready", "model": self.model,
            "busy": bool(ok) and all(r["busy"] or r["in_session"] for r in ok),
            "in_session": sum(r["in_session"] for r in reps), "queue": sum(r["queue"] for r in reps),
            "clients": sum(r["clients"] for r in reps), "fps": first.get("target_fps"),
            "replicas_ready": len(ok), "replicas": reps,
        })

    async def prometheus(self, request: web.Request) -> web.Response:
        parts, seen = [], set()

        async def one(b: Backend) -> str:
            if not b.healthy:
                return ""
            try:
                return await asyncio.wait_for(self.pool.metrics(b.index), self.status_timeout)
            except Exception:  # noqa: BLE001
                return ""
        texts = await asyncio.gather(*(one(b) for b in self.backends))
        for b, text in zip(self.backends, texts):
            for line in text.splitlines():
                if line.startswith("#"):
                    if line not in seen:
                        seen.add(line)
                        parts.append(line)
                elif line.strip():
                    parts.append(_label(line, f'replica="{b.index}"'))
        parts += [
            "# HELP reactor_graph_replicas_ready Replicas taking sessions.",
            "# TYPE reactor_graph_replicas_ready gauge",
            f"reactor_graph_replicas_ready {sum(b.healthy for b in self.backends)}",
            "# HELP reactor_graph_replicas Replicas configured.", "# TYPE reactor_graph_replicas gauge",
            f"reactor_graph_replicas {len(self.backends)}",
        ]
        for name, help_ in (("sessions_routed_total", "Sessions the front sent to a replica."),
                            ("sessions_lost_total", "Sessions that ended because their replica crashed."),
                            ("replica_failures_total", "Times a replica stopped answering."),
                            ("relay_errors_total", "Signalling requests a replica did not answer."),
                            ("line_assignments_total", "Engines given to the line's first (local, relayed, "
                                                       "refused).")):
            parts += [f"# HELP reactor_graph_front_{name} {help_}", f"# TYPE reactor_graph_front_{name} counter"]
            for (n, labels), v in list(self.metrics.counters.items()):
                if n == name:
                    lab = ",".join(f'{k}="{val}"' for k, val in labels)
                    parts.append(f"reactor_graph_front_{name}{{{lab}}} {v:g}")
        return web.Response(body=("\n".join(parts) + "\n").encode(), headers={"Content-Type": CONTENT_TYPE})

    async def api_commands(self, request: web.Request) -> web.Response:
        if self._commands is None:
            b = next((x for x in self.backends if x.healthy and x.url), None)
            if b is None:
                return _text_error(503, "no replica is ready")
            async with self.http.get(b.url + "/api/commands") as r:
                if r.status != 200:
                    return _text_error(502, "the replica did not answer")
                self._commands = await r.json()
        return web.json_response(self._commands)

    async def index(self, request: web.Request) -> web.Response:
        page = resources.files("reactor_graph.server") / "static" / "index.html"
        return web.Response(text=page.read_text(encoding="utf-8"), content_type="text/html",
                            headers={"Cache-Control": "no-cache"})


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def _label(line: str, label: str) -> str:
    """Add a label to a Prometheus sample line."""
    m = _SAMPLE.match(line)
    if not m:
        return line
    name, labels, rest = m.groups()
    inner = labels[1:-1] if labels else ""
    return f"{name}{{{label}{',' if inner else ''}{inner}}}{rest}"


class LocalPool:
    """Replicas in this process (ReplicaServer threads): the front without Ray (tests, one machine)."""

    def __init__(self, replicas: list, token: str):
        self.replicas = replicas
        self.token = token

    def __len__(self) -> int:
        return len(self.replicas)

    async def status(self, i: int) -> dict:
        r = self.replicas[i]
        ok, why = r.healthy()
        if not ok:
            raise RuntimeError(why)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(r._status(), r.loop))

    async def metrics(self, i: int) -> str:
        r = self.replicas[i]
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(r._metrics_text(), r.loop))
