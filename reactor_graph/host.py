"""What a server needs from whatever produces the stream: a graph Engine, or a wrapped Reactor VideoModel.

The server depends on this protocol only, so both kinds of model get the same server, page and metrics.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

from .emit import Block


class StreamHost(Protocol):
    name: str
    version: str
    fps: float
    height: int
    width: int
    stats: Any  # has .sessions .blocks .frames .errors .last_block_s
    # Optional: a host whose model talks to the client (Reactor's get_ctx().send) has `on_message`, a
    # settable callback(data) that the server points at the client in session.

    @property
    def busy(self) -> bool: ...

    def command_schemas(self) -> list[dict]:
        """[{name, description, schema}] where schema is the params' JSON schema; includes built-ins."""

    def submit(self, name: str, params: dict | None = None, reply: Callable[[dict], None] | None = None) -> Any:
        """Validate now (raise CommandError naming the field) and apply at the next block boundary;
        `reply({"ok": True} | {"ok": False, "error": ...})` is called once applied."""

    def start_session(self, on_block: Callable[[Block], None], on_end: Callable[[Any], None] | None = None,
                      max_blocks: int | None = None) -> threading.Thread:
        """Start a session in a background thread; `on_end(result)` gets .reason/.error/.blocks."""

    def stop(self, timeout: float | None = None) -> None:
        """Stop the running session and wait; raises SessionError when the watchdog gives up."""
