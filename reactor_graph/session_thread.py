"""One session at a time in a thread of its own: start, cooperative stop, watchdog, idempotent stop.

The graph Engine, the Reactor ModelHost and the `reactor_model` node all run their sessions through this,
so "still running", "did not stop in time" and "stuck since the last stop" mean the same everywhere, and
no thread is started that its owner cannot join.
"""
from __future__ import annotations

import threading
from typing import Callable

from .errors import SessionError


class SessionThread:
    def __init__(self, name: str):
        self.name = name
        self.stop_event = threading.Event()  # what the session polls (should_stop())
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def busy(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def start(self, body: Callable[[], None], busy_message: str) -> threading.Thread:
        """Run `body` in a new thread; SessionError(busy_message) while the last one is still alive."""
        with self._lock:
            if self.busy:
                raise SessionError(busy_message)
            self.stop_event.clear()
            self._thread = threading.Thread(target=body, name=self.name, daemon=True)
            self._thread.start()
            return self._thread

    def stop(self, timeout: float, stuck_message: Callable[[threading.Thread], str]) -> None:
        """Ask the session to stop and wait `timeout` seconds for it. Idempotent; the watchdog's
        SessionError(stuck_message(thread)) if it does not end, and the thread stays `busy` until it does."""
        self.stop_event.set()
        t = self._thread
        if t is None:
            return
        if t is not threading.current_thread():
            t.join(timeout)
        if t.is_alive():
            raise SessionError(stuck_message(t))
        with self._lock:
            if self._thread is t:
                self._thread = None
