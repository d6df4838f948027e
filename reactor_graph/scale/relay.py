"""The engine relay: one line across replicas although a peer connection cannot leave its process.

A client's peer connection lives in the replica that answered its offer (its *host*); when the front gives
it another replica's engine, the host opens a websocket to that replica (its *engine*; `/internal/relay`,
the replicas' internal token only) and:

- host -> engine: the client's data-channel messages as they are (the host's dispatcher has counted them
  against the client's rate and size; the engine's checks them as it checks its own clients'), each upload
  a message names sent ahead of it (the bytes, kept there under the same id), `ack` for each block fed to
  the client's track (at most WINDOW blocks in flight: under `lossless` the engine waits for the stream, as
  with a local track; under `latest` a block without room is dropped), and `end` when the client goes;
- engine -> host: the blocks (relay_wire.py) that the host pushes into the client's video track exactly as a
  local engine's, and every message for the client (command results, stats, errors, `sessionEnded`).

On the engine side the relay is a Client (`relayed`) whose channel and track are the websocket, so the
session runs there like any other: time limit, block watchdog, pings (the client's, forwarded), errors.

Faults: the engine replica dies or hangs (the websocket drops, or its heartbeat goes unanswered): the
client is sent an `error` (`replica_lost`) and its session ends with that reason; it does not re-enter the
line, since its stream's state died with the engine and a fresh session under the old one would show a
different video without saying so; the SDK's client starts a new session. The host replica dies: the
websocket drops and the engine ends the relay's session, so the engine is free for the next in line.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from ..server import protocol as P
from ..server.clients import Client
from ..server.uploads import UploadError
from . import relay_wire as W

log = logging.getLogger("reactor_graph.scale")

WINDOW = 2  # blocks sent but not yet in the client's track
HEARTBEAT = 5.0  # s: a websocket ping unanswered for this long drops the relay
MAX_MSG = W.MAX_BLOCK_BYTES + W.MAX_HEADER + 4


def authorized(request: web.Request, token: str) -> bool:
    return hmac.compare_digest(request.headers.get("Authorization", "").encode(), f"Bearer {token}".encode())


class Link:
    """A websocket's outbound side: one writer, in order; `put` from the loop, `put_threadsafe` from others."""

    def __init__(self, ws: Any, loop: asyncio.AbstractEventLoop):
        self.ws, self.loop = ws, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queued = 0  # bytes waiting (a channel's bufferedAmount)
        self.open = True
        self._writer = asyncio.ensure_future(self._write())

    def put(self, item: str | bytes) -> None:
        if self.open:
            self.queued += len(item)
            self.queue.put_nowait(item)

    def put_threadsafe(self, item: bytes) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.put, item)

    async def _write(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                self.queued -= len(item)
                if isinstance(item, str):
                    await self.ws.send_str(item)
                else:
                    await self.ws.send_bytes(item)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:  # the other side went away
            log.debug("relay write failed: %s", exc)
        finally:
            self.open = False

    async def close(self) -> None:
        """Send what is queued (briefly), then close the websocket."""
        if self.open:
            self.open = False
            self.queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), 2.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._writer.cancel()
        try:
            await asyncio.wait_for(self.ws.close(), 2.0)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


# -- the engine's side -----------------------------------------------------------------------------------------
class RelayChannel:
    """The relay standing for a data channel: what the engine's server sends its client goes to the host."""

    def __init__(self, link: Link):
        self.link = link

    @property
    def readyState(self) -> str:  # noqa: N802 - the data channel's name
        return "open" if self.link.open else "closed"

    @property
    def bufferedAmount(self) -> int:  # noqa: N802
        return self.link.queued

    def send(self, text: str) -> None:
        self.link.put(text)


class RelaySink:
    """The relay standing for a video track (the engine's thread pushes blocks): frames go to the host."""

    readyState = "live"
    depth = 0
    last_queue_s = 0.0

    def __init__(self, link: Link, policy: str, compress: bool = False):
        self.link, self.policy, self.compress = link, policy, compress
        self.capacity = 0
        self._credits = threading.Semaphore(WINDOW)
        self._closed = threading.Event()
        self._armed = threading.Event()  # the host knows the session started: blocks may follow
        self.sent = 0
        self.drops = 0
        self.bytes = 0

    def arm(self) -> None:
        self._armed.set()

    def credit(self) -> None:
        self._credits.release()

    def push_block(self, block: Any) -> int:
        frames = block.video()  # [T, ...] uint8, copied into the message below (the buffer is reused)
        return self.push(frames, block.format, block.index, block.made_s)

    def push(self, frames: np.ndarray, fmt: str, index: int = -1, made_s: float = 0.0) -> int:
        while not self._armed.wait(0.1):
            if self._closed.is_set():
                return 0
        if self.policy == "lossless":
            while not self._credits.acquire(timeout=0.1):
                if self._closed.is_set():
                    return 0
        elif not self._credits.acquire(blocking=False):
            self.drops += len(frames)
            return 0
        if self._closed.is_set():
            return 0
        data = W.pack_block(frames, fmt, index, made_s, self.compress)
        self.bytes += len(data)
        self.link.put_threadsafe(data)
        self.sent += len(frames)
        return len(frames)

    def close_producer(self) -> None:
        self._closed.set()

    @property
    def producer_closed(self) -> bool:
        return self._closed.is_set()

    def stop(self) -> None:  # the session's end (the loop): what is queued goes, then the relay closes
        self._closed.set()
        self.readyState = "ended"
        asyncio.ensure_future(self.link.close())

    def counters(self) -> dict[str, int]:
        # the frames a client saw are counted where it is hosted; here only what never left
        return {"drops": self.drops}


async def engine_end(request: web.Request, manager: Any, token: str, index: int,
                     compress: bool = False) -> web.StreamResponse:
    """`GET /internal/relay` (websocket): run a session on this replica's engine for another replica's client."""
    if not authorized(request, token):
        return web.Response(status=403, text="replicas only", content_type="text/plain")
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=64 * 1024 * 1024)
    await ws.prepare(request)
    try:
        hello = json.loads((await ws.receive(timeout=10)).data)
        remote = str(hello.get("remote", ""))[:100]
        session = str(hello.get("session", ""))[:8]
    except Exception:  # noqa: BLE001 - not a relay's hello
        await ws.close()
        return ws
    link = Link(ws, asyncio.get_running_loop())
    s = manager.settings
    client = Client("relay-" + secrets.token_hex(16), remote=remote, relayed=True)
    client.bucket = P.TokenBucket(s.rate, s.burst)
    client.channel, client.track = RelayChannel(link), RelaySink(link, s.policy, compress)
    client.connected, client.state, client.offered = True, "waiting", time.monotonic()
    manager.clients[client.id] = client
    if not await manager.promote(client):
        manager.clients.pop(client.id, None)
        why = "this replica's engine is not free" if not manager.closing else "this replica is shutting down"
        link.put(W.pack({"k": "refused", "reason": why}))
        await link.close()
        return ws
    link.put(W.pack({"k": "started", "engine": index}))
    client.track.arm()
    log.info("replica %d: relaying a session for %s (its client %s)", index, remote or "?", session)
    why = "its host replica is gone"
    try:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                manager.dispatch.handle(client, msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                header, payload = W.unpack(msg.data)
                if header["k"] == "ack":
                    client.track.credit()
                elif header["k"] == "upload":
                    try:
                        manager.uploads.put(client.id, header.get("upload_id"), str(header.get("name", "")),
                                            str(header.get("mime_type", "")), bytes(payload))
                    except UploadError as exc:
                        log.warning("a relayed upload was refused: %s", exc)
                elif header["k"] == "end":
                    why = f"its client left ({str(header.get('reason'))[:200]})"
                    break
    except W.WireError as exc:
        why = f"the relay broke ({exc})"
    finally:
        await manager.end(client, f"relay: {why}")
        await link.close()
    return ws


# -- the host's side -----------------------------------------------------------------------------------------
class HostRelay:
    """On the client's host: its session on another replica's engine. Made by `open_relay`."""

    def __init__(self, manager: Any, client: Client, ws: Any, engine: int):
        self.manager, self.client, self.ws, self.engine = manager, client, ws, engine
        self.loop = asyncio.get_running_loop()
        self.link = Link(ws, self.loop)
        self.uploads_sent: set[str] = set()
        self.closing = False
        self.blocks = 0
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read())

    def forward(self, raw: str) -> None:
        """A message of the client (the loop): to the engine, each upload it names ahead of it."""
        if '"upload' in raw:
            self._uploads_first(raw)
        self.link.put(raw)

    def _uploads_first(self, raw: str) -> None:
        try:
            inner = json.loads(raw).get("data") or {}
            refs = list((inner.get("uploads") or {}).values()) if isinstance(inner.get("uploads"), dict) else []
            if inner.get("type") == P.FILE_UPLOADED and isinstance(inner.get("data"), dict):
                refs.append(inner["data"])
        except (ValueError, AttributeError, TypeError):
            return  # not an envelope: the engine's dispatcher answers it
        store = self.manager.uploads
        for ref in refs[:8]:
            uid = ref.get("upload_id") if isinstance(ref, dict) else None
            if not isinstance(uid, str) or uid in self.uploads_sent:
                continue
            try:
                up = store.get(self.client.id, uid)
            except UploadError:
                continue  # not this session's: the engine refuses the reference
            if not up.complete:
                continue
            with open(up.path, "rb") as f:
                data = f.read()
            self.uploads_sent.add(uid)
            self.link.put(W.pack({"k": "upload", "upload_id": uid, "name": up.name, "mime_type": up.mime_type},
                                 data))

    async def close(self, reason: str) -> None:
        """The client's session ends here (it left, or the engine ended it): free the engine."""
        self.closing = True
        self.link.put(W.pack({"k": "end", "reason": reason[:200]}))
        await self.link.close()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        ended: dict | None = None  # the engine's sessionEnded, its reason the client's
        why = "its relay closed"
        c = self.client
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    text = msg.data
                    if '"sessionEnded"' in text or '"sessionStarted"' in text or '"stats"' in text:
                        kind, data = _runtime(text)
                        if kind == P.SESSION_ENDED:
                            ended = data if isinstance(data, dict) else {}
                            continue
                        if kind == P.SESSION_STARTED:
                            continue  # the host sent its own, with the client's session id
                        if kind == P.STATS and isinstance(data, dict) and c.track is not None:
                            text = self._stats(data)
                    c.send(text)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    header, payload = W.unpack(msg.data)
                    if header["k"] != "block":
                        continue
                    track = c.track
                    frames = W.unpack_block(header, payload, int(self.manager.host.height),
                                            int(self.manager.host.width))
                    if track is not None:
                        await self.loop.run_in_executor(None, track.push, frames.copy(), header["format"])
                    self.blocks += 1
                    self.link.put(W.pack({"k": "ack"}))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    why = f"its relay failed ({self.ws.exception()})"
        except asyncio.CancelledError:
            raise
        except W.WireError as exc:
            why = f"its relay broke ({exc})"
        except Exception as exc:  # noqa: BLE001 - the connection, whatever broke it
            why = f"its relay failed ({type(exc).__name__})"
        if self.closing or c.state == "ended":
            return
        if ended is not None:
            reason = str(ended.get("reason") or "ended")
            await self.manager.end(c, reason, ended.get("error"))
        else:
            reason = f"engine replica {self.engine} lost: {why}"
            c.send(P.error_message("replica_lost", reason))
            await self.manager.end(c, reason, reason)

    def _stats(self, data: dict) -> str:
        """The engine's stats, with the frames as this host's track sent them."""
        c, track, now = self.client, self.client.track, time.monotonic()
        dt = max(1e-6, now - c.last_stats)
        data.update(fps=round((track.sent - c.last_sent) / dt, 2), queue_depth=track.depth,
                    queue_ms=round(track.last_queue_s * 1000, 2), engine_replica=self.engine, **track.counters())
        c.last_sent, c.last_stats = track.sent, now
        return P.runtime(P.STATS, data)


def _runtime(text: str) -> tuple[str | None, Any]:
    try:
        env = json.loads(text)
        inner = env.get("data") or {}
        return (inner.get("type"), inner.get("data")) if env.get("scope") == P.RUNTIME else (None, None)
    except (ValueError, AttributeError):
        return None, None


async def open_relay(manager: Any, client: Client, http: aiohttp.ClientSession, engine_url: str, token: str,
                     engine: int) -> str | None:
    """Start `client`'s session on the engine at `engine_url`; None when it runs, else why not."""
    try:
        ws = await http.ws_connect(engine_url + "/internal/relay", headers={"Authorization": f"Bearer {token}"},
                                   heartbeat=HEARTBEAT, max_msg_size=MAX_MSG)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return f"engine replica {engine} did not answer ({type(exc).__name__})"
    try:
        await ws.send_str(json.dumps({"session": client.id, "remote": client.remote}))
        while True:  # the engine's own sessionStarted (text) comes before its word
            msg = await ws.receive(timeout=15)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise W.WireError(f"the engine closed the relay ({msg.type.name})")
        header, _ = W.unpack(msg.data)
        if header["k"] != "started":
            raise W.WireError(str(header.get("reason") or header["k"]))
    except (W.WireError, aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
        await ws.close()
        return str(exc) or type(exc).__name__
    if client.state != "waiting":  # it left meanwhile
        await ws.close()
        return "the client left"
    relay = HostRelay(manager, client, ws, engine)
    manager.begin_elsewhere(client, relay)
    relay.start()
    return None
