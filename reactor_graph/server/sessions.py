"""Clients, the line for the model, and sessions.

The model is loaded once; one client at a time is *in session* (its video track receives the engine's
blocks, its commands reach the engine), the others wait in line and are told their position on the data
channel. A client joins the line when its SDP offer is answered; the engine goes to the first in line whose
connection is up (peer connected, data channel open), so it misses nothing. A client leaves the line, or ends
its session, on
`stop_session`, a failed or closed peer connection, a closed data channel, silence (no message for
`ping_timeout`; the SDK pings every 5 s), a connection that never comes up, a node error, or shutdown.
Every peer connection is closed when its client goes.

All methods run on the event loop, except the callbacks the engine calls from its own thread (`on_block`,
`on_end`, command replies), which only copy data or hop onto the loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from ..errors import CommandError, ReactorGraphError, SessionError
from . import protocol as P
from . import rtc_guards
from .metrics import Metrics
from .tracks import POLICIES, BlockVideoTrack

log = logging.getLogger("reactor_graph.server")


@dataclass
class Settings:
    policy: str = "lossless"  # frame queue: lossless (the engine waits for the stream) | latest (drop oldest)
    queue_frames: int = 8  # frame queue capacity (0.5 s at 16 fps)
    ping_timeout: float = 8.0  # no message for this long: the client is gone (the SDK pings every 5 s)
    connect_timeout: float = 15.0  # offer answered but no connection + open data channel after this long
    offer_timeout: float = 5.0  # start_session but no SDP offer after this long: the place is lost
    max_pending_per_address: int = 4  # clients of one address not connected yet (a flood holds no more)
    max_session_seconds: float | None = None  # a session ends after this long; the next in line gets in
    block_timeout: float | None = None  # a block running longer ends the session (None: derived, see below)
    stuck_exit_seconds: float = 30.0  # a stuck engine thread that has not come back after this: give up
    advertise_address: str | None = None  # host candidates carry this address (NAT, containers)
    stop_timeout: float = 5.0  # the engine's watchdog, when a session is stopped
    max_message: int = 64 * 1024  # bytes per data-channel message
    rate: float = 30.0  # messages a second per client, on average ...
    burst: float = 60.0  # ... with bursts up to this many
    max_clients: int = 32  # in session + waiting + about to connect
    stats_interval: float = 1.0  # seconds between stats/queue messages
    ice_servers: list = field(default_factory=list)  # [{"uris": [...], "credentials"?: {...}}] for clients

    def __post_init__(self):
        if self.block_timeout is not None and self.block_timeout <= 0:
            raise ValueError(f"block_timeout must be > 0 seconds, got {self.block_timeout}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


@dataclass(eq=False)
class Client:
    id: str
    remote: str = ""
    created: float = field(default_factory=time.monotonic)
    state: str = "new"  # new (no offer yet) | waiting | active | ended
    pc: RTCPeerConnection | None = None
    channel: Any = None
    track: BlockVideoTrack | None = None
    answer: str | None = None
    offered: float | None = None  # when the latest offer was answered
    connected: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    bucket: P.TokenBucket | None = None
    limited: bool = False  # a rate-limit error was sent for the current flood
    tasks: list = field(default_factory=list)
    end_reason: str | None = None
    started: float | None = None  # when its session began
    # stats message
    last_sent: int = 0
    last_stats: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.channel is not None and self.channel.readyState == "open"

    def send(self, text: str) -> bool:
        ch = self.channel
        if ch is None or ch.readyState != "open":
            return False
        try:
            ch.send(text)
            return True
        except Exception:  # noqa: BLE001 - a channel closing under us must not break the caller
            return False


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._promote_lock = asyncio.Lock()
        self._ticker: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # ends started from transport events
        self._commands = P.sdk_commands(host.command_schemas())

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ticker = asyncio.create_task(self._tick())
        if hasattr(self.host, "on_message"):  # a host whose model sends its own messages (get_ctx().send)
            self.host.on_message = self._from_model

    async def close(self) -> None:
        """Shutdown: end every client (stopping the engine's session), close every peer connection."""
        self.closing = True
        if getattr(self.host, "on_message", None) == self._from_model:
            self.host.on_message = None
        if self._ticker:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await asyncio.gather(*(self.end(c, "shutdown") for c in list(self.clients.values())),
                             return_exceptions=True)
        if self._background:  # ends already under way (a client that left just before)
            await asyncio.wait(list(self._background), timeout=self.settings.stop_timeout + 6)

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
        return client

    def session_response(self, client: Client) -> dict:
        return P.session_response(client.id, str(self.host.name), getattr(self.host, "version", None),
                                  self.server_version, self._commands, float(self.host.fps))

    def resolve_stop(self, session_id: str | None) -> Client | None:
        """`POST /stop_session` from the SDK carries no id: then stop the one client, if there is only one."""
        if session_id:
            return self.clients.get(session_id)
        live = [c for c in self.clients.values() if c.state != "ended"]
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
                                    policy=self.settings.policy, capacity=self.settings.queue_frames)
        client.pc, client.track, client.channel, client.connected = pc, track, None, False
        if old_pc is not None:  # a reconnect: the old connection's events no longer count
            for sender in old_pc.getSenders():
                sender.replaceTrack(None)  # or its sender would stop our track (and its clock) on the way out
            await _close_pc(old_pc)
        self._wire(client, pc)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            by_mid = {t.mid: t for t in pc.getTransceivers()}
            attached = False
            for entry in mapping:
                t = by_mid.get(entry.mid)
                if t is None:
                    raise P.OfferError(f"track_mapping names mid {entry.mid[:40]!r}, which the offer does not "
                                       f"have")
                if entry.direction == "recvonly" and entry.kind == "video" and not attached:
                    t.sender.replaceTrack(track)
                    t.direction = "sendonly"
                    attached = True
            if not attached and not mapping:  # a client without a mapping: the first video it receives
                for t in pc.getTransceivers():
                    if t.kind == "video" and getattr(t, "_offerDirection", "recvonly") in ("recvonly", "sendrecv"):
                        t.sender.replaceTrack(track)
                        t.direction = "sendonly"
                        attached = True
                        break
            if not attached:
                raise P.OfferError("the offer has no video transceiver for the client to receive "
                                   f"'{P.MAIN_TRACK}' on (a recvonly video entry in track_mapping)")
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            if client.pc is pc:  # first, so that closing it does not count as the client leaving
                client.pc = None
            await _close_pc(pc)
            if isinstance(exc, P.OfferError):
                raise
            log.info("could not answer an offer from %s: %s: %s", client.id, type(exc).__name__, exc)
            raise P.OfferError("could not answer the SDP offer: expected an offer from a WebRTC client with a "
                               "video transceiver and a data channel named 'data'") from None
        client.answer = rtc_guards.advertise(pc.localDescription.sdp, self.settings.advertise_address)
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
                    self.handle(client, raw)
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
        def on_track(remote):  # a track the client publishes (a webcam): read and discard it
            client.tasks.append(asyncio.ensure_future(_discard(remote)))

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

    def _send_position(self, client: Client) -> None:
        if client in self.waiting:
            client.send(P.runtime(P.QUEUE, {"position": self.waiting.index(client) + 1,
                                            "waiting": len(self.waiting), "in_session": self.active is not None}))

    def _send_positions(self) -> None:
        for c in self.waiting:
            self._send_position(c)

    async def promote(self) -> None:
        """Give the engine to the first client in line, if it is free."""
        async with self._promote_lock:
            if self.closing or self.active is not None or not self.waiting:
                return
            if self.host.busy:  # the last session is still winding down; the ticker retries
                return
            # the first in line whose connection is up and who was heard from lately (so nothing it would see
            # is lost before it can, and a client that vanished while waiting does not hold the model)
            fresh = time.monotonic() - self.settings.ping_timeout * 0.75
            client = next((c for c in self.waiting if c.connected and c.ready and c.last_seen >= fresh), None)
            if client is None:
                return
            self.waiting.remove(client)
            loop = self._loop or asyncio.get_running_loop()
            metrics = self.metrics

            def on_block(block):  # the engine's thread: copy out now (the buffer is reused), maybe wait
                metrics.observe_block(max(0.0, (block.ready or time.perf_counter()) - block.started))
                track = client.track  # the current one: a reconnect (PUT sdp_params) may replace it
                if track is not None:
                    track.push_block(block)

            def on_end(result):  # the engine's thread
                if not loop.is_closed():
                    loop.call_soon_threadsafe(lambda: self._spawn(self._engine_ended(client, result)))

            try:
                self.host.start_session(on_block, on_end)
            except SessionError as exc:
                log.warning("could not start a session: %s", exc)
                self.waiting.insert(0, client)
                return
            self.active = client
            client.state = "active"
            client.started = time.monotonic()
            client.last_sent, client.last_stats = client.track.sent, time.monotonic()
            client.send(self._started_message(client))
        self._send_positions()

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
        if was_active:
            self.active = None
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
        await _flush(client.channel, 0.3)
        if client.pc is not None:
            await _close_pc(client.pc)
        if client.track is not None:
            self.metrics.retire(client.track.counters())
            client.track.stop()
        for task in client.tasks:
            task.cancel()
        log.info("client %s ended: %s", client.id, reason)
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

    # -- data channel -----------------------------------------------------------------------------------------
    def handle(self, client: Client, raw: Any) -> None:
        client.last_seen = time.monotonic()
        if client.state == "ended":
            return
        if not client.bucket.take():
            self.metrics.inc("messages_rejected_total", code="rate_limited")
            if not client.limited:
                client.limited = True
                client.send(P.error_message("rate_limited", f"more than {self.settings.rate:g} messages a "
                                            f"second; messages are dropped until the rate falls"))
            return
        if client.limited and client.bucket.tokens >= client.bucket.burst / 2:
            client.limited = False  # the flood is over: a later one gets its own error
        if isinstance(raw, rtc_guards.InvalidText):
            self.metrics.inc("messages_rejected_total", code="bad_utf8")
            client.send(P.error_message("bad_utf8", f"a text frame of {raw.size} bytes is not valid UTF-8; send "
                                        "JSON text"))
            return
        try:
            env = P.parse_envelope(raw, self.settings.max_message)
        except P.ProtocolError as exc:
            self.metrics.inc("messages_rejected_total", code=exc.code)
            client.send(P.error_message(exc.code, exc.message))
            return
        if env.scope == P.RUNTIME:
            self._runtime(client, env)
        else:
            self._command(client, env)

    def _runtime(self, client: Client, env: P.Envelope) -> None:
        if env.type == P.PING:
            return
        if env.type == P.REQUEST_CAPABILITIES:
            caps: dict[str, Any] = {"commands": self._commands}
            if hasattr(self.host, "alternatives"):
                caps["alternatives"] = self.host.alternatives()
            client.send(P.runtime(P.MODEL_CAPABILITIES, caps))
        elif env.type == P.SWAP_NODE:
            self._swap(client, env.data)
        elif env.type == P.FILE_UPLOADED:
            self.metrics.inc("messages_rejected_total", code="unsupported")
            client.send(P.error_message("unsupported", "file uploads are not supported by this server"))
        else:
            self.metrics.inc("messages_rejected_total", code="unknown_runtime")
            client.send(P.error_message("unknown_runtime", f"unknown runtime message {env.type[:60]!r}; known: "
                                        f"{P.PING}, {P.REQUEST_CAPABILITIES}, {P.SWAP_NODE}"))

    def _swap(self, client: Client, data: Any) -> None:
        """Hot-swap a node for the client in session; the result (with the measured stall) comes back as
        a runtime `swapResult` once the swap lands at a block boundary, or at once if it is refused."""
        node = data.get("node") if isinstance(data, dict) else None
        if not isinstance(node, str):
            client.send(P.error_message("bad_envelope", 'swapNode takes {"node": str, "alternative": str}'))
            return
        node = node[:100]
        extra = sorted(set(data) - {"node", "alternative"})
        if extra:  # a spec, params or weights path would let a client choose code and files on this machine
            known = ", ".join(a["name"] for a in getattr(self.host, "alternatives", list)()) or "none declared"
            client.send(P.runtime(P.SWAP_RESULT, {
                "node": node, "ok": False,
                "error": f"swapNode takes only 'node' and 'alternative' (a name the graph declares: {known}); "
                         f"got {', '.join(map(str, extra))[:100]}"}))
            return
        if client.state != "active":
            client.send(P.runtime(P.SWAP_RESULT, {"node": node, "ok": False, "error": "not in session"}))
            return
        if not hasattr(self.host, "request_swap"):
            client.send(P.error_message("unsupported", "this model cannot swap nodes"))
            return
        loop = self._loop

        def reply(result: dict) -> None:  # the engine's thread
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(client.send, P.runtime(P.SWAP_RESULT, {"node": node, **result}))

        alternative = data.get("alternative")
        if not isinstance(alternative, (str, type(None))):
            client.send(P.runtime(P.SWAP_RESULT, {"node": node, "ok": False,
                                                  "error": "'alternative' is the name of a declared alternative"}))
            return
        try:
            self.host.request_swap(node, alternative, None, reply)
        except ReactorGraphError as exc:
            client.send(P.runtime(P.SWAP_RESULT, {"node": node, "ok": False, "error": str(exc)}))

    def _command(self, client: Client, env: P.Envelope) -> None:
        name = env.type[:100]
        if client.state != "active":
            pos = self.waiting.index(client) + 1 if client in self.waiting else None
            self.metrics.inc("commands_total", result="not_in_session")
            client.send(P.command_result(name, False, f"not in session yet (position {pos} in line)"
                                         if pos else "not in session", None, "not_in_session"))
            return
        loop = self._loop

        def reply(result: dict) -> None:  # the engine's thread, at the block boundary that applied it
            ok = bool(result.get("ok"))
            text = P.command_result(name, True) if ok else P.command_result(name, False, str(result.get("error")))
            self.metrics.inc("commands_total", result="applied" if ok else "failed")
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(client.send, text)

        try:
            self.host.submit(env.type, env.data, reply)
        except CommandError as exc:
            self.metrics.inc("commands_total", result="rejected")
            client.send(P.command_result(name, False, str(exc), exc.field, exc.reason))
        except Exception:  # noqa: BLE001 - a host bug must not take the channel down
            log.exception("submit(%r) failed", name)
            self.metrics.inc("commands_total", result="rejected")
            client.send(P.command_result(name, False, "the server could not handle this command (its log says "
                                         "why)", None, "internal error"))

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
        slowest = float(getattr(self.host.stats, "slowest_block_s", 0.0) or 0.0)
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
        progress = getattr(self.host, "block_progress", None)
        elapsed, where = progress() if progress else (None, None)
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


async def _discard(track) -> None:
    try:
        while True:
            await track.recv()
    except Exception:  # noqa: BLE001 - MediaStreamError when it ends, CancelledError at close
        return


async def _flush(channel, timeout: float) -> None:
    """Give queued data-channel messages (e.g. sessionEnded) a moment to leave before closing."""
    if channel is None or channel.readyState != "open":
        return
    end = time.monotonic() + timeout
    await asyncio.sleep(0.02)
    while getattr(channel, "bufferedAmount", 0) > 0 and time.monotonic() < end:
        await asyncio.sleep(0.02)


async def _close_pc(pc: RTCPeerConnection) -> None:
    try:
        await asyncio.wait_for(pc.close(), 5.0)
    except Exception:  # noqa: BLE001 - closing is best effort; never hang shutdown on it
        log.debug("closing a peer connection failed", exc_info=True)
