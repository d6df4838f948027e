"""What a server needs from whatever produces the stream: a graph Engine, or a wrapped Reactor VideoModel.

The server depends on this protocol only, so both kinds of model get the same server, page and metrics.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

from .emit import Block
from .errors import SessionError


class StreamHost(Protocol):
    name: str
    version: str
    fps: float
    height: int
    width: int
    stats: Any  # has .sessions .blocks .frames .errors .last_block_s .slowest_block_s
    on_message: Callable[[Any], None] | None  # the server points it at the client in session

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

    # What a host may offer beyond streaming; HostFeatures gives the answers of a host that offers none.
    def alternatives(self) -> list[dict]:
        """Declared swap alternatives: [{name, type, targets}]."""

    def request_swap(self, target: str, alternative: str | None = None, spec: dict | None = None,
                     reply: Callable[[dict], None] | None = None) -> None:
        """Swap a node at the next block boundary; raises SessionError if it does not fit."""

    def block_progress(self) -> tuple[float | None, str | None]:
        """(seconds the current block has run, what is running) while a block runs, else (None, None)."""


class HostFeatures:
    """The optional part of StreamHost for a host that offers none of it: no swaps, no block clock (a
    Reactor model's own loop may wait for its client for as long as it likes), no model messages."""

    on_message: Callable[[Any], None] | None = None
    # The input side: video tracks the host takes from the client (tracks(), size(name), feed(name, yuv,
    # arrived), clear(), stats()): an Engine's inputs.InputFeeds; None here (the server wraps a compat
    # model's on_frame itself: server/media_in.py)
    inputs: Any = None

    def alternatives(self) -> list[dict]:
        return []

    def request_swap(self, target: str, alternative: str | None = None, spec: dict | None = None,
                     reply: Callable[[dict], None] | None = None) -> None:
        raise SessionError("this model cannot swap nodes")

    def block_progress(self) -> tuple[float | None, str | None]:
        return None, None

    def serving(self) -> dict | None:
        """What runs the hot path now ({mode, serving, progress, error}: a tiered start's tier), or None."""
        return None
