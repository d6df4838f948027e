"""The front's part of the one line (line.py decides): running its rounds and carrying them out.

A round runs at each status poll, when a replica says its line could move (`GET /internal/changes`, held
until then: a client there got ready, a session there ended), and after a `stop_session`. Its assignments go
to the clients' hosts (`POST /internal/assign`), its positions to every host whose clients' places changed
(`POST /internal/line`); all with the replicas' internal token (internal.py).
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp

from .line import View, plan

log = logging.getLogger("reactor_graph.scale")


class LineRunner:
    """Mixed into Front: uses its backends, order, http, pool (its token), metrics and refresh()."""

    async def run_line(self) -> None:
        """One round of the line (line.py): free engines to the first ready clients, everyone's place told."""
        async with self._line_lock:
            views = []
            for b in self.backends:
                st = b.status or {}
                up = b.healthy and bool(b.url)
                views.append(View(b.index, free=up and bool(st.get("free")), in_session=bool(st.get("in_session")),
                                  relays=bool(st.get("relays", False)),
                                  waiting=[s for s, state in st.get("sessions", {}).items() if state == "waiting"]
                                  if up else [], ready=set(st.get("ready", ()))))
            assigned, positions = plan(views, self.order)
            for sid, host, engine in assigned:
                h, e = self.backends[host], self.backends[engine]
                if await self._assign(h, sid, e):  # this round's view, until the next poll shows it
                    e.status.update(free=False, in_session=True)
                    h.status["sessions"][sid] = "active"
            for b in self.backends:
                told = (b.instance, positions.get(b.index, {}))
                if b.healthy and b.url and self._told.get(b.index) != told:
                    if await self._internal(b, "/internal/line", {"positions": told[1]}) is not None:
                        self._told[b.index] = told

    async def _assign(self, host, sid: str, engine) -> bool:
        answer = await self._internal(host, "/internal/assign", {"session_id": sid, "engine": engine.index,
                                                                 "engine_url": engine.url})
        ok = bool(answer and answer.get("ok"))
        self.metrics.inc("line_assignments_total", result="local" if ok and host is engine else
                         "relayed" if ok else "refused")
        if not ok:
            log.info("session %s not started on replica %d's engine: %s", sid[:8], engine.index,
                     (answer or {}).get("reason", "its host did not answer"))
        return ok

    async def _internal(self, b, path: str, body: dict) -> dict | None:
        try:
            async with self.http.post(b.url + path, json=body,
                                      headers={"Authorization": f"Bearer {self.pool.token}"}) as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("replica %d did not take %s: %s", b.index, path, exc or type(exc).__name__)
            return None

    async def _watch(self, b) -> None:
        """Run the line when replica `b` says it could move (internal.py's /internal/changes)."""
        while True:
            changed = False
            if b.healthy and b.url:
                try:
                    async with self.http.get(b.url + "/internal/changes", timeout=aiohttp.ClientTimeout(total=30),
                                             headers={"Authorization": f"Bearer {self.pool.token}"}) as r:
                        changed = r.status == 200 and bool((await r.json()).get("changed"))
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the poll notices a replica gone
                    changed = False
            if changed:
                await self._kick()
            else:
                await asyncio.sleep(self.poll_interval)

    async def _kick(self) -> None:
        """A session ended through the front: the next in line need not wait for the poll."""
        try:
            await self.refresh()
            await self.run_line()
        except Exception:  # noqa: BLE001 - the poller does it again shortly
            log.exception("running the line failed")
