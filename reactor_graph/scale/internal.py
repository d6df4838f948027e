"""A replica's internal routes: the front directs the one line through them, and replicas relay sessions.

  POST /internal/assign   {session_id, engine, engine_url}: start this replica's waiting client on engine
                          `engine` (this replica's, or another's through a relay) -> {ok, reason}
  POST /internal/line     {positions: {session_id: {position, waiting, in_session}}}: the front's positions
                          for this replica's waiting clients
  GET  /internal/changes  answers when the line could move here (a client ready, a session ended), or after
                          WAIT s: the front runs the line then, not only at its poll
  GET  /internal/relay    websocket: a session on this replica's engine for another replica's client (relay.py)

Each takes only the internal token the front and the replicas share (a client's session id opens none).
"""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from .relay import authorized, engine_end, open_relay

WAIT = 10.0  # s: the longest a change request is held


class InternalRoutes:
    def __init__(self, replica: Any):
        self.replica = replica
        self.http: aiohttp.ClientSession | None = None  # to other replicas (relays), on the replica's loop
        self.changed = asyncio.Event()

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/internal/assign", self.assign)
        app.router.add_post("/internal/line", self.line)
        app.router.add_get("/internal/relay", self.relay)
        app.router.add_get("/internal/changes", self.changes)
        self.replica.server.manager.on_line_change = self.changed.set
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        if self.http is not None:
            await self.http.close()

    def _refused(self, request: web.Request) -> web.Response | None:
        if not authorized(request, self.replica.token):
            return web.Response(status=403, text="replicas and their front only", content_type="text/plain")
        return None

    async def _json(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="JSON, please") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="a JSON object, please")
        return body

    async def assign(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused:
            return refused
        body = await self._json(request)
        m = self.replica.server.manager
        client = m.clients.get(str(body.get("session_id")))
        if client is None or client.relayed or not m.ready_to_start(client):
            return web.json_response({"ok": False, "reason": "no such client ready to start here"})
        engine = body.get("engine")
        if engine == self.replica.index:
            ok = await m.promote(client)
            return web.json_response({"ok": ok, "reason": None if ok else "this replica's engine is not free"})
        url = body.get("engine_url")
        if not isinstance(engine, int) or not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise web.HTTPBadRequest(text="engine (an index) and engine_url, please")
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=10))
        why = await open_relay(m, client, self.http, url, self.replica.token, engine)
        return web.json_response({"ok": why is None, "reason": why})

    async def line(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused:
            return refused
        body = await self._json(request)
        positions = body.get("positions")
        if not isinstance(positions, dict):
            raise web.HTTPBadRequest(text="positions, please")
        clean = {}
        for sid, d in list(positions.items())[:10000]:
            if isinstance(d, dict) and isinstance(d.get("position"), int):
                clean[str(sid)] = {"position": d["position"], "waiting": int(d.get("waiting", 0)),
                                   "in_session": bool(d.get("in_session"))}
        self.replica.server.manager.tell(clean)
        return web.json_response({"ok": True})

    async def changes(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused:
            return refused
        try:
            await asyncio.wait_for(self.changed.wait(), WAIT)
        except asyncio.TimeoutError:
            return web.json_response({"changed": False})
        self.changed.clear()
        return web.json_response({"changed": True})

    async def relay(self, request: web.Request) -> web.StreamResponse:
        return await engine_end(request, self.replica.server.manager, self.replica.token, self.replica.index,
                                self.replica.relay_compress)
