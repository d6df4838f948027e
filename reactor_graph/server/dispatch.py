"""The data channel: every message a client sends, checked and routed (runtime messages, commands, swaps).

Nothing here knows the line or the peer connection: it gets the client, the host, and how to find the
client's place in line.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from ..errors import CommandError, ReactorGraphError
from . import protocol as P
from . import rtc_guards
from .clients import Client, Settings
from .metrics import Metrics

log = logging.getLogger("reactor_graph.server")


class Dispatcher:
    def __init__(self, host: Any, settings: Settings, metrics: Metrics, commands: list[dict],
                 position: Callable[[Client], int | None]):
        self.host, self.settings, self.metrics = host, settings, metrics
        self._commands = commands
        self._position = position
        self._loop: asyncio.AbstractEventLoop | None = None  # replies from the engine's thread hop onto it
        self.uploads = None  # the manager's UploadStore (uploads.py): FileRefs in commands, fileUploaded

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _reply_later(self, client: Client, text: str) -> None:
        """From the engine's thread: send `text` on the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(client.send, text)

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
        if client.relay is not None and isinstance(raw, str) and len(raw) <= self.settings.max_message:
            client.relay.forward(raw)  # its engine is another replica's, whose dispatcher checks the rest
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
            caps["alternatives"] = self.host.alternatives()
            client.send(P.runtime(P.MODEL_CAPABILITIES, caps))
        elif env.type == P.SWAP_NODE:
            self._swap(client, env.data)
        elif env.type == P.FILE_UPLOADED:  # the SDK's note after uploadFile's PUT; nothing to do but check it
            data = env.data if isinstance(env.data, dict) else {}
            try:
                self.uploads.get(client.id, data.get("upload_id"))
            except Exception:  # noqa: BLE001
                client.send(P.error_message("unknown_upload", "fileUploaded names no upload of this session"))
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
            known = ", ".join(a["name"] for a in self.host.alternatives()) or "none declared"
            client.send(P.runtime(P.SWAP_RESULT, {
                "node": node, "ok": False,
                "error": f"swapNode takes only 'node' and 'alternative' (a name the graph declares: {known}); "
                         f"got {', '.join(map(str, extra))[:100]}"}))
            return
        if client.state != "active":
            client.send(P.runtime(P.SWAP_RESULT, {"node": node, "ok": False, "error": "not in session"}))
            return
        def reply(result: dict) -> None:  # the engine's thread
            self._reply_later(client, P.runtime(P.SWAP_RESULT, {"node": node, **result}))
            if result.get("ok"):
                log.info("swap for %s: %s -> %s (stall %.1f ms)", client.id[:8], node, result.get("now"),
                         result.get("stall_ms") or 0.0)
            else:
                log.info("swap of %s for %s failed: %s", node, client.id[:8], result.get("error"))

        alternative = data.get("alternative")
        if not isinstance(alternative, (str, type(None))):
            client.send(P.runtime(P.SWAP_RESULT, {"node": node, "ok": False,
                                                  "error": "'alternative' is the name of a declared alternative"}))
            return
        try:
            self.host.request_swap(node, alternative, None, reply)
        except ReactorGraphError as exc:
            log.info("swap of %s for %s refused: %s", node, client.id[:8], exc)
            client.send(P.runtime(P.SWAP_RESULT, {"node": node, "ok": False, "error": str(exc)}))

    def _command(self, client: Client, env: P.Envelope) -> None:
        if env.uploads is not None and self.uploads is not None:  # FileRefs: decoded off the loop, then submitted
            client.tasks = [t for t in client.tasks if not t.done()]
            client.tasks.append(asyncio.ensure_future(self._command_with_uploads(client, env)))
            return
        name = env.type[:100]
        if client.state != "active":
            pos = self._position(client)
            self.metrics.inc("commands_total", result="not_in_session")
            client.send(P.command_result(name, False, f"not in session yet (position {pos} in line)"
                                         if pos else "not in session", None, "not_in_session"))
            return
        def reply(result: dict) -> None:  # the engine's thread, at the block boundary that applied it
            ok = bool(result.get("ok"))
            text = P.command_result(name, True, warning=result.get("warning")) if ok else \
                P.command_result(name, False, str(result.get("error")))
            self.metrics.inc("commands_total", result="applied" if ok else "failed")
            self._reply_later(client, text)

        try:
            self.host.submit(env.type, env.data, reply)
        except CommandError as exc:
            self.metrics.inc("commands_total", result="rejected")
            log.info("command %s from %s refused: %s", name, client.id[:8], exc)
            client.send(P.command_result(name, False, str(exc), exc.field, exc.reason))
        except Exception:  # noqa: BLE001 - a host bug must not take the channel down
            log.exception("submit(%r) failed", name)
            self.metrics.inc("commands_total", result="rejected")
            client.send(P.command_result(name, False, "the server could not handle this command (its log says "
                                         "why)", None, "internal error"))

    async def _command_with_uploads(self, client: Client, env: P.Envelope) -> None:
        try:
            data = await self.uploads.resolve(client.id, env.data, env.uploads)
        except (ValueError, OSError) as exc:
            self.metrics.inc("commands_total", result="rejected")
            field_name = next(iter(env.uploads), None) if isinstance(env.uploads, dict) else None
            client.send(P.command_result(env.type[:100], False, str(exc), field_name and str(field_name)[:100]))
            return
        self._command(client, P.Envelope(env.scope, env.type, data))
