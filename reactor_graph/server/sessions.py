"""The line for the model, and sessions (negotiation.py answers offers, dispatch.py handles messages).

The model is loaded once; one client at a time is *in session* (its video track receives the engine's
blocks, its commands reach the engine), the others wait in line and are told their position on the data
channel. A client joins the line when its SDP offer is answered; the engine goes to the first in line whose
connection is up (peer connected, data channel open), so it misses nothing. A client leaves the line, or ends
its session, on
`stop_session`, a failed or closed peer connection, a closed data channel, silence (no message for
`ping_timeout`; the SDK pings every 5 s), a connection that never comes up, a node error, or shutdown.
Every peer connection is closed when its client goes.

Under a front (reactor_graph/scale/) the line is one across replicas and the front decides it (`directed`):
a waiting client is started only when the front gives it an engine, this replica's (`promote(client)`) or
another's (`begin_elsewhere`, the relay feeding its track: scale/relay.py), and its position is the one the
front tells (`told`). With one server nothing of this is used.

All methods run on the event loop, except the callbacks the engine calls from its own thread (`on_block`,
`on_end`, command replies), which only copy data or hop onto the loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection

from ..errors import SessionError
from . import negotiation
from . import protocol as P
from . import rtc_guards
from .clients import Client, Settings
from .dispatch import Dispatcher
from .media_in import InboundMedia
from .metrics import Metrics
from .negotiation import close_pc, discard, flush
from .tracks import BlockVideoTrack
from .uploads import UploadStore

__all__ = ["Client", "SessionManager", "Settings"]

log = logging.getLogger("reactor_graph.server")


class SessionManager:
    def __init__(self, host: Any, settings: Settings | None = None, metrics: Metrics | None = None,
                 server_version: str = "0"):
        self.host = host
        self.settings = settings or Settings()
        self.metrics = metrics or Metrics()
        self.server_version = server_version
        self.clients: dict[str, Client] = {}
        self.waiting: list[Client] = []
        self.active: Client | None = None
        self.stuck = False  # the watchdog gave up on a session; no new ones until its thread ends
        self.stuck_reason: str | None = None
        self.stuck_since: float | None = None
        self.on_fatal = None  # callback(reason): the engine thread never came back; the process must end
        self.closing = False
        self.directed = False  # under a front: it decides who gets an engine, and tells the positions
        self.told: dict[str, dict] = {}  # directed: session id -> its `queue` message's data, from the front
        self.on_line_change = None  # directed: callback() when the line could move here (the front runs it)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._promote_lock = asyncio.Lock()
        self._ticker: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # ends started from transport events
        self._commands = P.sdk_commands(host.command_schemas())
        self.dispatch = Dispatcher(host, self.settings, self.metrics, self._commands, self.position)
        self.media = InboundMedia(host, self.metrics)  # published tracks -> video slots (media_in.py)
        self.uploads = self.dispatch.uploads = UploadStore()  # the SDK's uploadFile, per session (uploads.py)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.dispatch.bind_loop(self._loop)
        self._ticker = asyncio.create_task(self._tick())
        self.host.on_message = self._from_model  # a model may send its own messages (get_ctx().send)

    async def close(self) -> None:
        """Shutdown: end every client (stopping the engine's session), close every peer connection."""
        self.closing = True
        if self.host.on_message == self._from_model:
            self.host.on_message = None
        if self._ticker:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await asyncio.gather(*(self.end(c, "shutdown") for c in list(self.clients.values())),
                             return_exceptions=True)
        if self._background:  # ends already under way (a client that left just before)
            await asyncio.wait(list(self._background), timeout=self.settings.stop_timeout + 6)
        self.uploads.close()

    @property
    def commands(self) -> list[dict]:
        return self._commands

    # -- HTTP-facing operations ----------------------------------------------------------------------------
    def create(self, remote: str = "") -> Client:
        if self.closing:
            raise SessionError("the server is shutting down")
        if self.stuck:
            raise SessionError(f"the model is unusable until its stuck session ends: {self.stuck_reason}")
        pending = [c for c in self.clients.values() if c.remote == remote and not c.connected]
        if len(pending) >= self.settings.max_pending_per_address:
            # The newest request wins over the oldest that never sent its offer: a flood from one address
            # keeps replacing itself instead of keeping everyone else out.
            stale = next((c for c in pending if c.state == "new"), None)
            if stale is None:
                raise SessionError(f"{len(pending)} sessions from your address are still connecting; "
                                   f"try again in a few seconds")
            self._spawn(self.end(stale, "replaced by a newer session from the same address"))
            self.clients.pop(stale.id, None)
        if len(self.clients) >= self.settings.max_clients:
            raise SessionError(f"too many clients ({self.settings.max_clients}); try again later")
        client = Client(uuid.uuid4().hex, remote=remote)
        client.bucket = P.TokenBucket(self.settings.rate, self.settings.burst)
        self.clients[client.id] = client
        log.info("client %s from %s: waiting for the model (%d clients)", client.id[:8], remote or "?",
                 len(self.clients))
        return client

    def session_response(self, client: Client) -> dict:
        return P.session_response(client.id, str(self.host.name), getattr(self.host, "version", None),
                                  self.server_version, self._commands, float(self.host.fps), self.media.tracks())

    def resolve_stop(self, session_id: str | None) -> Client | None:
        """`POST /stop_session` from the SDK carries no id: then stop the one client, if there is only one."""
        if session_id:
            client = self.clients.get(session_id)
            return None if client is None or client.relayed else client
        live = [c for c in self.clients.values() if c.state != "ended" and not c.relayed]
        return live[0] if len(live) == 1 else None

    async def offer(self, client: Client, body: Any) -> None:
        """Answer an SDP offer (POST, or PUT to replace the connection); the answer is ready on return.
        Raises ValueError for a bad body or SDP."""
        sdp, mapping = P.parse_offer(body)
        if client.state == "ended":
            raise SessionError("this session has ended")
        old_pc = client.pc
        client.answer = None
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        track = client.track
        if track is None or track.readyState != "live":
            track = BlockVideoTrack(self.host.fps, self.host.height, self.host.width,
                                    policy=self.settings.policy, capacity=self.media.queue_frames(self.settings))
        client.pc, client.track, client.channel, client.connected = pc, track, None, False
        if old_pc is not None:  # a reconnect: the old connection's events no longer count
            for sender in old_pc.getSenders():
                sender.replaceTrack(None)  # or its sender would stop our track (and its clock) on the way out
            await close_pc(old_pc)
        self._wire(client, pc)
        self.media.expect(pc, mapping)
        try:
            answer = await negotiation.answer(pc, sdp, mapping, track)
        except P.OfferError:
            if client.pc is pc:  # first, so that closing it does not count as the client leaving
                client.pc = None
            await close_pc(pc)
            raise
        client.answer = rtc_guards.advertise(answer, self.settings.advertise_address)
        client.offered = time.monotonic()
        client.last_seen = time.monotonic()
        if client.state == "new":
            client.state = "waiting"
            self.waiting.append(client)
        await self.promote()
        self._send_positions()

    def _wire(self, client: Client, pc: RTCPeerConnection) -> None:
        @pc.on("connectionstatechange")
        async def on_state():
            if client.pc is not pc:
                return
            state = pc.connectionState
            if state == "connected":
                client.connected = True
                client.last_seen = time.monotonic()
                self._spawn(self.promote())
            elif state in ("failed", "closed"):
                self._spawn(self.end(client, f"connection {state}"))

        @pc.on("datachannel")
        def on_channel(channel):
            if client.pc is not pc or channel.label != "data":
                return
            client.channel = channel
            client.last_seen = time.monotonic()

            @channel.on("message")
            def on_message(raw):
                try:
                    self.dispatch.handle(client, raw)
                except Exception:  # noqa: BLE001 - nothing a client sends may break the channel
                    log.exception("handling a message from %s failed", client.id)
                    self.metrics.inc("messages_rejected_total", code="internal")

            @channel.on("close")
            def on_close():
                if client.channel is channel and client.pc is pc:
                    self._spawn(self.end(client, "data channel closed"))

            self._greet(client)
            self._spawn(self.promote())

        @pc.on("track")
        def on_track(remote):  # a track the client publishes: into its video slot, or read and discarded
            reader = self.media.receive(client, pc, remote, lambda: self.active is client)
            client.tasks.append(asyncio.ensure_future(reader or discard(remote)))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    def _greet(self, client: Client) -> None:
        if client.state == "active":  # a reconnect (PUT) of the client in session
            client.send(self._started_message(client))
        elif client.state == "waiting":
            self._send_position(client)

    # -- the line and the session ------------------------------------------------------------------------
    def _started_message(self, client: Client) -> str:
        return P.runtime(P.SESSION_STARTED, {"session_id": client.id, "fps": float(self.host.fps),
                                             "width": self.host.width, "height": self.host.height})

    def position(self, client: Client) -> int | None:
        """1-based place in line, or None for a client not waiting."""
        if client not in self.waiting:
            return None
        if self.directed:
            return self.told.get(client.id, {}).get("position")
        return self.waiting.index(client) + 1

    def _send_position(self, client: Client) -> None:
        if client not in self.waiting:
            return
        if self.directed:  # the front's word, or nothing yet (it tells within a poll)
            if client.id in self.told:
                client.send(P.runtime(P.QUEUE, self.told[client.id]))
            return
        client.send(P.runtime(P.QUEUE, {"position": self.waiting.index(client) + 1,
                                        "waiting": len(self.waiting), "in_session": self.active is not None}))

    def tell(self, positions: dict[str, dict]) -> None:
        """Directed: the front's positions for this replica's waiting clients; sent to those whose place moved."""
        old, self.told = self.told, dict(positions)
        for c in self.waiting:
            if c.id in self.told and self.told[c.id] != old.get(c.id):
                self._send_position(c)

    def ready_to_start(self, client: Client) -> bool:
        """Connection up, data channel open, heard from lately: nothing it would see is lost, and a client that
        vanished while waiting does not hold an engine."""
        fresh = time.monotonic() - self.settings.ping_timeout * 0.75
        return client.state == "waiting" and client.connected and client.ready and client.last_seen >= fresh

    def begin_elsewhere(self, client: Client, relay: Any) -> None:
        """Directed: the client's session runs on another replica's engine; `relay` carries it (scale/relay.py)."""
        if client in self.waiting:
            self.waiting.remove(client)
        client.relay, client.state, client.started = relay, "active", time.monotonic()
        client.last_sent, client.last_stats = client.track.sent, time.monotonic()
        client.send(self._started_message(client))
        log.info("session %s started for %s on another replica's engine", client.id[:8], client.remote or "?")
        self._send_positions()

    def _send_positions(self) -> None:
        for c in self.waiting:
            self._send_position(c)

    async def promote(self, chosen: Client | None = None) -> bool:
        """Give the engine to the first client in line, if it is free; directed, only to the `chosen` one (the
        front's pick, or a relay standing for another replica's client). True when its session started."""
        async with self._promote_lock:
            if self.closing or self.active is not None:
                return False
            if self.host.busy:  # the last session is still winding down; the ticker retries
                return False
            if chosen is None:
                if self.directed:  # the front decides; tell it now rather than at its next poll
                    if self.on_line_change is not None:
                        self.on_line_change()
                    return False
                client = next((c for c in self.waiting if self.ready_to_start(c)), None)
            else:
                client = chosen if chosen.relayed or self.ready_to_start(chosen) else None
            if client is None:
                return False
            if client in self.waiting:
                self.waiting.remove(client)
            loop = self._loop or asyncio.get_running_loop()
            metrics = self.metrics
            follows_camera = bool(self.media.tracks())

            def on_block(block):  # the engine's thread: copy out now (the buffer is reused), maybe wait
                made = block.made_s  # waits for the frames: a GPU's block is only queued when it is handed on
                metrics.observe_block(made)
                track = client.track  # the current one: a reconnect (PUT sdp_params) may replace it
                if track is not None:
                    if follows_camera:
                        track.capacity = self.media.queue_frames(self.settings, made, self.host.fps)
                    track.push_block(block)

            def on_end(result):  # the engine's thread
                if not loop.is_closed():
                    loop.call_soon_threadsafe(lambda: self._spawn(self._engine_ended(client, result)))

            try:
                self.host.start_session(on_block, on_end)
            except SessionError as exc:
                log.warning("could not start a session: %s", exc)
                if not client.relayed:
                    self.waiting.insert(0, client)
                return False
            self.active = client
            client.state = "active"
            client.started = time.monotonic()
            client.last_sent, client.last_stats = client.track.sent, time.monotonic()
            client.send(self._started_message(client))
            log.info("session %s started for %s%s", client.id[:8], client.remote or "?",
                     " (relayed from another replica)" if client.relayed else "")
        self._send_positions()
        return True

    async def _engine_ended(self, client: Client, result: Any) -> None:
        """The engine ended a session by itself (a node error, or its consumer failed)."""
        if self.active is not client or client.state != "active":
            return  # we stopped it: end() has taken care of everything
        error = getattr(result, "error", None)
        reason = getattr(result, "reason", "ended")
        if error:
            client.send(P.error_message("node_error", str(error), node=getattr(result, "node", None)))
        await self.end(client, f"engine: {reason}", error)

    async def end(self, client: Client, reason: str, error: str | None = None) -> None:
        """End a client's session or wait: tell it why, stop the engine if it was in session, close its
        connection, then give the engine to the next in line. Idempotent."""
        if client.state == "ended":
            return
        was_active = self.active is client
        client.state, client.end_reason = "ended", reason
        self.clients.pop(client.id, None)
        if client in self.waiting:
            self.waiting.remove(client)
        if client.track is not None:
            client.track.close_producer()  # a lossless producer waiting for room lets go now
        self.metrics.inc("sessions_ended_total", reason=_reason_label(reason))
        client.send(P.runtime(P.SESSION_ENDED, {"reason": reason, "error": error}))
        self.uploads.drop(client.id)  # a session's uploads end with it
        relay, client.relay = client.relay, None
        if relay is not None:  # its engine is another replica's: the relay's close frees it
            await relay.close(reason)
        if was_active:
            self.active = None
            self.media.ended()
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self.host.stop, self.settings.stop_timeout)
            except SessionError as exc:
                if not self.stuck:
                    self.stuck, self.stuck_reason, self.stuck_since = True, str(exc), time.monotonic()
                self.metrics.inc("sessions_ended_total", reason="watchdog")
                log.error("%s", exc)
            except Exception:  # noqa: BLE001
                log.exception("stopping the session failed")
        await flush(client.channel, 0.3)
        if client.pc is not None:
            await close_pc(client.pc)
        if client.track is not None:
            self.metrics.retire(client.track.counters())
            client.track.stop()
        for task in client.tasks:
            task.cancel()
        lasted = f" after {time.monotonic() - client.started:.1f} s" if was_active and client.started else ""
        log.log(logging.WARNING if error else logging.INFO, "%s %s from %s ended%s: %s%s",
                "session" if was_active else "client", client.id[:8], client.remote or "?", lasted, reason,
                f" ({error})" if error else "")
        if not self.closing:
            await self.promote()
            self._send_positions()

    def _from_model(self, data: Any) -> None:
        """A message the model sends to its client (any thread): forwarded as `{"scope": "application",
        "data": data}`, so the SDK's `message` event gets `data` as it is."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._forward, data)

    def _forward(self, data: Any) -> None:
        c = self.active
        if c is None or c.channel is None:
            return
        if getattr(c.channel, "bufferedAmount", 0) > 1024 * 1024:  # the client is not reading
            self.metrics.inc("model_messages_dropped_total")
            return
        try:
            text = P.raw_envelope(P.APPLICATION, data)
        except (TypeError, ValueError):
            log.warning("a model message is not JSON; dropped")
            return
        c.send(text)

    # -- housekeeping ---------------------------------------------------------------------------------------
    async def _tick(self) -> None:
        s = self.settings
        period = min(0.25, s.stats_interval)
        last_stats = time.monotonic()
        while True:
            await asyncio.sleep(period)
            try:
                now = time.monotonic()
                for c in list(self.clients.values()):
                    if c.state == "new" and now - c.created > s.offer_timeout:
                        await self.end(c, "no offer")
                    elif c.state in ("waiting", "active"):
                        if not (c.connected and c.ready):
                            if c.offered is not None and now - c.offered > s.connect_timeout:
                                await self.end(c, "connect timeout")
                        elif now - c.last_seen > s.ping_timeout:
                            await self.end(c, "no ping")
                await self._watch_session(now)
                if self.active is None and self.waiting and not self.host.busy:
                    await self.promote()
                if now - last_stats >= s.stats_interval:
                    last_stats = now
                    self._send_stats()
                    self._send_positions()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the ticker must survive anything
                log.exception("housekeeping failed")

    def block_timeout(self) -> float:
        """`block_timeout`, or derived: generous next to the slowest block this engine has run (compile and
        warm-up included), never under 30 s."""
        if self.settings.block_timeout is not None:
            return self.settings.block_timeout
        slowest = float(self.host.stats.slowest_block_s)
        return max(30.0, 20.0 * slowest)

    async def _watch_session(self, now: float) -> None:
        """End a session whose block hangs or whose time is up; give up on an engine that never returns."""
        if self.stuck:
            if not self.host.busy:
                log.warning("the stuck session has ended; the model takes sessions again")
                self.stuck, self.stuck_reason, self.stuck_since = False, None, None
            elif now - self.stuck_since > self.settings.stuck_exit_seconds and self.on_fatal is not None:
                fatal, self.on_fatal = self.on_fatal, None
                fatal(f"{self.stuck_reason}; it has not returned in {self.settings.stuck_exit_seconds:g}s")
            return
        c = self.active
        if c is None or c.state != "active":
            return
        limit = self.settings.max_session_seconds
        if limit is not None and c.started is not None and now - c.started > limit:
            await self.end(c, f"session time limit ({limit:g}s) reached")
            return
        elapsed, where = self.host.block_progress()
        timeout = self.block_timeout()
        if elapsed is not None and elapsed > timeout:
            reason = f"block timeout: node '{where}' ran for {elapsed:.1f}s (limit {timeout:.1f}s)"
            log.error("ending the session of %s: %s", c.id, reason)
            self.stuck, self.stuck_reason, self.stuck_since = True, reason, now
            client_error = P.error_message("block_timeout", reason, node=where)
            c.send(client_error)
            await self.end(c, reason, reason)

    def stats(self, client: Client | None = None) -> dict:
        c = client or self.active
        track = c.track if c is not None else None
        now = time.monotonic()
        out = {"model": self.host.name, "target_fps": float(self.host.fps), "policy": self.settings.policy,
               "block_ms": round(self.metrics.last_block_s * 1000, 2), "blocks": self.host.stats.blocks,
               "waiting": len(self.waiting), "queue_capacity": self.settings.queue_frames}
        serving = self.host.serving() if hasattr(self.host, "serving") else None
        if serving:
            out["serving"] = serving  # eager-captured while the compiled hot path builds, then compiled
        inputs = self.media.stats()
        if inputs:
            out["inputs"] = inputs  # per video slot: camera or default, frames received/used, latency
        if track is not None:
            dt = max(1e-6, now - c.last_stats)
            out.update(fps=round((track.sent - c.last_sent) / dt, 2), queue_depth=track.depth,
                       queue_ms=round(track.last_queue_s * 1000, 2), **track.counters())
        return out

    def _send_stats(self) -> None:
        c = self.active
        if c is None or c.track is None:
            return
        if c.channel is not None and getattr(c.channel, "bufferedAmount", 0) > 256 * 1024:
            return  # the client is not reading; do not pile up stats
        c.send(P.runtime(P.STATS, self.stats(c)))
        c.last_sent, c.last_stats = c.track.sent, time.monotonic()


def _reason_label(reason: str) -> str:
    return reason.split(":")[0].replace(" ", "_")[:40]


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())
