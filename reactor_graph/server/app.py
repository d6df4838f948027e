"""`reactor-graph run`: the aiohttp app serving a StreamHost over WebRTC (aiortc).

Routes (each also under /auth/<token>, the form for an SDK apiUrl when the server has a token; CORS and
who may call what: access.py):

  POST /start_session                                   a new client; the SDK's session response
  POST /stop_session                                    end a session ({"session_id"} optional, see below)
  GET  /sessions/{id}/transport/webrtc/ice_servers      {"ice_servers": [...]}
  POST /sessions/{id}/transport/webrtc/sdp_params       the client's offer -> 202 (answer prepared)
  PUT  /sessions/{id}/transport/webrtc/sdp_params       a new offer for the same session (reconnect) -> 202
  GET  /sessions/{id}/transport/webrtc/sdp_params       202 while pending, 200 {"sdp_answer"} when ready
  GET  /health                                          {"ok", "model", "busy", "queue", ...}
  GET  /metrics                                         Prometheus text
  GET  /api/commands                                    the command schemas (JSON schema and flat)
  GET  /                                                the built-in page (static/)
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from importlib import resources
from typing import Any, Callable

from aiohttp import web

from ..errors import SessionError
from . import rtc_guards
from .access import AUTH_PREFIX, AccessPolicy, Refused
from .metrics import CONTENT_TYPE, Metrics
from .sessions import SessionManager, Settings

log = logging.getLogger("reactor_graph.server")

SESSION = "/sessions/{session_id}/transport/webrtc"


def _server_version() -> str:
    try:
        from importlib.metadata import version

        return version("reactor-graph")
    except Exception:  # noqa: BLE001 - not installed (a source checkout)
        return "0.1.0"


# routes that start or end sessions for whoever calls: the token guards these (a session's own routes are
# guarded by its unguessable id)
TOKEN_ROUTES = ("start_session", "stop_session")


def access_middleware(policy: AccessPolicy, metrics: Metrics):
    @web.middleware
    async def guard(request: web.Request, handler):
        origin, host = request.headers.get("Origin"), request.headers.get("Host")
        route = (request.match_info.route.name or "").removeprefix("auth_")
        try:
            policy.check(request.method, host, origin, route in TOKEN_ROUTES,
                         request.headers.get("Authorization"), request.match_info.get("token"))
        except Refused as exc:
            metrics.inc("http_refused_total", status=str(exc.status))
            return _text_error(exc.status, str(exc))
        cors = policy.cors_headers(origin, host, preflight=request.method == "OPTIONS")
        if request.method == "OPTIONS":
            return web.Response(status=204 if cors else 403, headers=cors)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(cors)
            raise
        response.headers.update(cors)
        return response

    return guard


async def _preflight(request: web.Request) -> web.Response:  # the middleware answers first; this is the route
    return web.Response(status=204)


def _text_error(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


# (method, path, handler) of the SDK's local-mode routes and ours; every one also lives under /auth/<token>
ROUTES = (
    ("POST", "/start_session", "start_session"),
    ("POST", "/stop_session", "stop_session"),
    ("GET", SESSION + "/ice_servers", "ice_servers"),
    ("POST", SESSION + "/sdp_params", "sdp_offer"),
    ("PUT", SESSION + "/sdp_params", "sdp_offer"),
    ("GET", SESSION + "/sdp_params", "sdp_answer"),
    ("POST", "/sessions/{session_id}/uploads", "uploads"),
    ("PUT", "/sessions/{session_id}/uploads/{upload_id}", "upload_put"),
    ("GET", "/health", "health"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/api/commands", "api_commands"),
    ("GET", "/", "index"),
)


def build_app(access: AccessPolicy, metrics: Metrics, handlers: dict[str, Callable]) -> web.Application:
    """The aiohttp app: ROUTES bound to `handlers` by name (a route without a handler is left out), the
    access guard, the static files and the preflights."""
    app = web.Application(middlewares=[access_middleware(access, metrics)], client_max_size=256 * 1024)
    r = app.router
    for prefix, tag in (("", ""), (AUTH_PREFIX, "auth_")):
        for method, path, name in ROUTES:
            if name in handlers:
                named = tag + name if name in TOKEN_ROUTES else None
                r.add_route(method, prefix + path, handlers[name], name=named)
    r.add_static("/static/", str(resources.files("reactor_graph.server") / "static"), show_index=False)
    r.add_route("OPTIONS", "/{tail:.*}", _preflight)
    return app


class Server:
    """The app, its session manager and metrics. `await start(host, port)`, then `await close()`."""

    def __init__(self, host: Any, settings: Settings | None = None, access: AccessPolicy | None = None,
                 **options: Any):
        self.host = host
        self.settings = settings or Settings(**options)
        self.access = access or AccessPolicy()
        self.metrics = Metrics()
        self.manager = SessionManager(host, self.settings, self.metrics, _server_version())
        self.runner: web.AppRunner | None = None
        self.url: str | None = None
        self.port: int | None = None
        self.app = self._build()

    def _build(self) -> web.Application:
        return build_app(self.access, self.metrics, {
            "start_session": self.start_session, "stop_session": self.stop_session,
            "ice_servers": self.ice_servers, "sdp_offer": self.sdp_offer, "sdp_answer": self.sdp_answer,
            "uploads": self.uploads, "upload_put": self.upload_put, "health": self.health,
            "metrics": self.prometheus, "api_commands": self.api_commands, "index": self.index})

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> str:
        self.access.bind = host
        rtc_guards.restrict_candidates(host)
        rtc_guards.guard_text_frames()
        await self.manager.start()
        self.runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # the real port when port=0
        self.port = sockets[0].getsockname()[1] if sockets else port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        return self.url

    @property
    def page_url(self) -> str:
        """The address to open (and the SDK's apiUrl): with a token, the token is in its path."""
        token = self.access.token
        return f"{self.url}/auth/{token}/" if token else f"{self.url}/"

    async def close(self) -> None:
        await self.manager.close()
        if self.runner is not None:
            await asyncio.wait_for(self.runner.cleanup(), 10.0)
            self.runner = None

    # -- the SDK's local-mode routes -----------------------------------------------------------------------
    def _client(self, request: web.Request):
        client = self.manager.clients.get(request.match_info["session_id"])
        if client is None or client.relayed:  # a relay's stand-in is no client's to reach
            self.metrics.inc("http_errors_total", route="unknown_session")
            raise web.HTTPNotFound(text="unknown or ended session", content_type="text/plain")
        return client

    async def start_session(self, request: web.Request) -> web.Response:
        try:
            client = self.manager.create(request.remote or "")
        except SessionError as exc:
            self.metrics.inc("http_errors_total", route="start_session")
            return _text_error(503, str(exc))
        return web.json_response(self.manager.session_response(client))

    async def stop_session(self, request: web.Request) -> web.Response:
        session_id = request.query.get("session_id")
        if session_id is None and request.can_read_body:
            try:  # JSON, or the text/plain body of navigator.sendBeacon
                body = json.loads(await request.text() or "null")
                if isinstance(body, dict) and isinstance(body.get("session_id"), str):
                    session_id = body["session_id"]
            except (ValueError, UnicodeDecodeError):
                pass
        client = self.manager.resolve_stop(session_id)
        if client is None:
            why = "unknown session" if session_id else \
                "no session_id given and more than one client; the session ends when its connection closes"
            return web.json_response({"ok": False, "stopped": None, "reason": why})
        await self.manager.end(client, "stop_session")
        return web.json_response({"ok": True, "stopped": client.id})

    async def ice_servers(self, request: web.Request) -> web.Response:
        self._client(request)
        return web.json_response({"ice_servers": list(self.settings.ice_servers)})

    async def sdp_offer(self, request: web.Request) -> web.Response:
        client = self._client(request)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            self.metrics.inc("http_errors_total", route="sdp_params")
            return _text_error(400, "the body must be JSON: {sdp_offer, track_mapping, client_info}")
        try:
            await self.manager.offer(client, body)
        except (ValueError, SessionError) as exc:
            self.metrics.inc("http_errors_total", route="sdp_params")
            return _text_error(400, str(exc))
        return web.json_response({"status": "accepted"}, status=202)

    async def sdp_answer(self, request: web.Request) -> web.Response:
        client = self._client(request)
        if client.answer is None:
            return web.json_response({"status": "pending"}, status=202)
        return web.json_response({"sdp_answer": client.answer})

    async def uploads(self, request: web.Request) -> web.Response:
        """The SDK's uploadFile, step 1: allocate an upload; the PUT address is this server's (uploads.py)."""
        from .uploads import UploadError

        client = self._client(request)
        try:
            body = await request.json()
            up = self.manager.uploads.create(client.id, body)
        except (ValueError, UnicodeDecodeError):
            return self._upload_refused(UploadError(400, "the body must be JSON: {name, size, mime_type}"))
        except UploadError as exc:
            return self._upload_refused(exc)
        token = request.match_info.get("token")
        base = f"{request.scheme}://{request.host}" + (f"/auth/{token}" if token else "")
        return web.json_response({"presigned_id": up.id, "path": f"uploads/{up.id}",
                                  "presigned_url": f"{base}/sessions/{client.id}/uploads/{up.id}"})

    async def upload_put(self, request: web.Request) -> web.Response:
        """Step 2: the file's bytes (uploadFile's PUT), checked and kept for this session only."""
        from .uploads import UploadError

        client = self._client(request)
        try:
            await self.manager.uploads.receive(client.id, request.match_info["upload_id"], request.content,
                                               request.content_length)
        except UploadError as exc:
            return self._upload_refused(exc)
        self.metrics.inc("uploads_total", result="received")
        return web.json_response({"ok": True})

    def _upload_refused(self, exc) -> web.Response:
        self.metrics.inc("uploads_total", result=str(exc.status))
        self.metrics.inc("http_errors_total", route="uploads")
        # the SDK's uploadFile shows only the status line ("File upload failed: 415 <reason>"), so the reason
        # rides there too (printable ASCII)
        reason = "".join(ch if " " <= ch <= "~" else "?" for ch in str(exc))[:200]
        return web.Response(status=exc.status, reason=reason, text=str(exc), content_type="text/plain")

    # -- ours ---------------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        m = self.manager
        return web.json_response({
            "ok": not m.stuck, "reason": m.stuck_reason, "model": self.host.name,
            "version": getattr(self.host, "version", None), "runtime": getattr(self.host, "runtime", None),
            "busy": bool(self.host.busy), "in_session": m.active is not None, "queue": len(m.waiting),
            "clients": len(m.clients), "fps": float(self.host.fps), "policy": self.settings.policy,
            "serving": self.host.serving() if hasattr(self.host, "serving") else None,
        })

    async def prometheus(self, request: web.Request) -> web.Response:
        m = self.manager
        tracks = [c.track for c in m.clients.values() if c.track is not None]
        depth = m.active.track.depth if m.active is not None and m.active.track is not None else 0
        text = self.metrics.render(self.host, tracks, m.active is not None, len(m.waiting), len(m.clients),
                                   depth, m.stuck)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def api_commands(self, request: web.Request) -> web.Response:
        flat = {c["name"]: c["schema"] for c in self.manager.commands}
        return web.json_response({"model": self.host.name, "fps": float(self.host.fps),
                                  "width": self.host.width, "height": self.host.height,
                                  "commands": [{**c, "flat": flat.get(c.get("name"), {})}
                                               for c in self.host.command_schemas()]})

    async def index(self, request: web.Request) -> web.Response:
        page = resources.files("reactor_graph.server") / "static" / "index.html"
        return web.Response(text=page.read_text(encoding="utf-8"), content_type="text/html",
                            headers={"Cache-Control": "no-cache"})


FATAL_EXIT = 70  # the engine thread is stuck for good; a supervisor should restart the process


def serve(host_model: Any, host: str = "127.0.0.1", port: int = 8080, max_seconds: float | None = None,
          announce: Callable[[str], None] | None = None, access: AccessPolicy | None = None,
          **options: Any) -> int:
    """Serve `host_model` (a StreamHost) until Ctrl-C / SIGTERM, or for `max_seconds`; then stop the session
    and close every peer connection. `options` are Settings fields (policy, queue_frames, ping_timeout...).
    Returns the process exit status: 0, or FATAL_EXIT when a stuck engine thread never came back."""
    return asyncio.run(_serve(host_model, host, port, max_seconds, announce, Settings(**options),
                              access or AccessPolicy()))


async def _serve(model: Any, host: str, port: int, max_seconds: float | None,
                 announce: Callable[[str], None] | None, settings: Settings, access: AccessPolicy) -> int:
    server = Server(model, settings, access)
    await server.start(host, port)
    (announce or (lambda u: print(f"serving {model.name} at {u}", flush=True)))(server.page_url)
    done = asyncio.Event()
    fatal: list[str] = []

    def give_up(reason: str) -> None:
        log.critical("the engine is stuck for good (%s); exiting with status %d so a supervisor can restart "
                     "the server", reason, FATAL_EXIT)
        fatal.append(reason)
        done.set()

    server.manager.on_fatal = give_up
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, done.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
            pass
    try:
        if max_seconds is None:
            await done.wait()
        else:
            try:
                await asyncio.wait_for(done.wait(), max_seconds)
            except asyncio.TimeoutError:
                pass
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        why = f"the engine is stuck ({fatal[0]})" if fatal else ("a signal" if done.is_set() else
                                                                 f"--max-seconds {max_seconds:g}")
        active = server.manager.active
        log.info("shutting down on %s%s", why, f"; ending the session of {active.id[:8]}" if active else "")
        await server.close()
        log.info("stopped")
    return FATAL_EXIT if fatal else 0
