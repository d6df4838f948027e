"""ModelHost: a Reactor-API VideoModel behind the StreamHost protocol (reactor_graph.host), so it gets the same
server, page, metrics, render and bench as a graph Engine.

Threads. A session runs the model's `start_session()` in its own thread ("reactor-model-session"); every
`emit_block` is converted there (RGB -> yuv420p on the block's own device, the Triton kernel on CUDA) and handed
to `on_block` as a reactor_graph.emit.Block. Commands are validated in the submitting thread (a CommandError
names the field) and then run in the host's command thread ("reactor-model-commands"), one after another in the
order they came, concurrently with `start_session()`, as the Reactor API promises: they are not deferred to
block boundaries. A command that raises is answered `{"ok": False, "error": ...}` and the session goes on.

Stream size. A manifest `size` fixes [height, width]; without one, the first block ever emitted fixes it for the
life of the process (`height`/`width` read 0 until then). A block of any other size is refused: emit_block
raises a FrameError in the model's thread, which ends that session with the message (a stream keeps one size;
the encoder and the client's video element are set up for it). yuv420p/nv12 streams need an even size.

Built-in `reset` (when the model defines no `reset` command): the running `start_session()` is asked to stop,
and once it has returned it is called again in the same host session: the client's stream goes on (block
indices continue, `on_end` is not called), the model goes through its own end-of-session cleanup and starts
fresh. A model that defines `reset` gets its own method called, like any command.

Ends. `start_session()` returning ends the session (reason "finished", or "stopped" after stop()); reaching
`max_blocks` sets should_stop() and drops any later block (reason "finished"); an exception ends it with reason
"error" and the exception (type, message, where it was raised) in `.error`; a failing `on_block` ends it with
reason "sink". The model instance stays loaded and the next `start_session()` call starts a fresh session.
`stop()` waits `stop_timeout` seconds and then raises SessionError naming the function and line the model is
stuck in; the host refuses new sessions until that thread ends.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch
from pydantic import BaseModel

from ..emit import Block, HostCopier
from ..errors import CommandError, SessionError
from ..host import HostFeatures
from ..loop import SessionResult, Stats
from ..session_thread import SessionThread
from ..slots import RESET, Command
from ..spec import CommandSpec, near
from .api import ModelCommand, SessionContext, bound, commands_of
from .frames import FrameError, to_uint8

log = logging.getLogger("reactor_graph.compat")
_HERE = os.path.dirname(os.path.abspath(__file__))
FORMATS = ("yuv420p", "nv12", "rgb24")
_SYNC = "\0sync"  # an internal ticket: answered once every command before it has run
WORKER_IDLE_S = 0.5  # the command thread ends after this long with nothing to run


@dataclass
class Ticket:
    """A submitted command: `wait(timeout)` returns its reply once it ran (None if it has not yet)."""

    name: str
    command: ModelCommand | None  # None: the built-in reset
    params: BaseModel | None
    reply: Callable[[dict], None] | None = None
    result: dict | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> dict | None:
        self.done.wait(timeout)
        return self.result

    def finish(self, result: dict) -> None:
        self.result = result
        self.done.set()
        if self.reply is not None:
            try:
                self.reply(result)
            except Exception:  # the client went away; nothing to tell
                log.exception("reply to command %s failed", self.name)


def where_raised(exc: BaseException) -> str:
    """' (at file.py:42 in fn)' for the innermost frame of the traceback, or ''."""
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    return f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"


def where_running(thread: threading.Thread) -> str:
    """The innermost frame of a running thread outside this package, as 'file.py:42 in fn'."""
    frame = sys._current_frames().get(thread.ident)
    if frame is None:
        return "an unknown place"
    stack = traceback.extract_stack(frame)
    for f in reversed(stack):
        if not f.filename.startswith(_HERE) and "threading.py" not in f.filename:
            return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
    return f"{os.path.basename(stack[-1].filename)}:{stack[-1].lineno} in {stack[-1].name}"


def _fps_of(model: Any) -> float | None:
    for attr in ("fps", "_fps"):
        v = getattr(model, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    return None


class CommandTable(dict):
    """The model's commands by name (ModelCommand), plus `validate(name, params)` as the engine's queue has it
    (so render's script check works on either); the built-in reset is known when the model has none."""

    def __init__(self, commands: dict[str, ModelCommand]):
        super().__init__(commands)
        self.checkers = {n: Command(n, CommandSpec(description=c.description), c.params_model)
                         for n, c in commands.items()}

    def validate(self, name: str, params: dict | None) -> Ticket:
        """A ticket for a valid command; CommandError (naming the field) for anything else. Runs nothing."""
        if name == RESET and RESET not in self:
            if params:
                raise CommandError(RESET, "takes no parameters")
            return Ticket(RESET, None, None)
        if not isinstance(name, str) or name not in self:
            known = ", ".join(sorted({*self, RESET}))
            raise CommandError(str(name), f"unknown command{near(str(name), self)}; known: {known}")
        return Ticket(name, self[name], self.checkers[name].validate(params))

    def schemas(self) -> list[dict]:
        out = [c.schema() for c in self.checkers.values()]
        if RESET not in self:
            out.append({"name": RESET, "description": "Restart the session: the model's start_session() ends and "
                                                      "starts again; the stream goes on",
                        "schema": {"type": "object", "properties": {}}})
        return out


class _Run:
    """State of one host session (which may span several start_session() calls after resets)."""

    def __init__(self, on_block, max_blocks, before_block=None):
        self.on_block, self.max_blocks, self.before_block = on_block, max_blocks, before_block
        self.result = SessionResult()
        self.last = time.perf_counter()

    @property
    def full(self) -> bool:
        return self.max_blocks is not None and self.result.blocks >= self.max_blocks


class ModelHost(HostFeatures):
    """A loaded VideoModel instance, served one session at a time (reactor_graph.host.StreamHost)."""

    def __init__(self, model: Any, *, name: str | None = None, version: str = "0.1.0", fps: float | None = None,
                 size: tuple[int, int] | None = None, format: str = "yuv420p", matrix: str = "bt601",
                 stop_timeout: float = 5.0, commands: dict[str, ModelCommand] | None = None, driver: Any = None):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        self.model = model
        self.name = name or getattr(model, "name", "") or type(model).__name__
        self.version = version
        self.fps = float(fps or _fps_of(model) or 16.0)
        self.format, self.matrix = format, matrix
        self.stop_timeout = stop_timeout
        self.stats = Stats()
        self.manifest = None  # set by open_manifest
        self.runtime: dict | None = None  # open_manifest: the runtime version written for and what drives it
        self.on_message: Callable[[Any], None] | None = None  # the server's hook for get_ctx().send(data)
        self.messages: deque = deque(maxlen=256)  # the last messages sent, whoever listens
        self._size: tuple[int, int] | None = tuple(size) if size else None
        if self._size and format != "rgb24" and (self._size[0] % 2 or self._size[1] % 2):
            raise ValueError(f"{format} needs an even frame size, got {self._size[0]}x{self._size[1]}")
        # driver: reactor_graph.compat.real.RealRuntime for a model built on the installed reactor_runtime (its own
        # context and command registry); None for reactor-graph's own API
        self.driver = driver
        self.commands = CommandTable(commands if commands is not None else commands_of(type(model)))
        self._lock = threading.RLock()
        self._runner = SessionThread("reactor-model-session")
        self._ctx: SessionContext | None = None
        self._run: _Run | None = None
        self._stopping = self._runner.stop_event
        self._restart = False
        self._restarted = threading.Event()
        self._in_before = False  # the session thread waits in run_session's before_block for commands to run
        self._queue: queue.SimpleQueue[Ticket] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._copiers: dict[torch.device, HostCopier] = {}

    # -- what a server shows ---------------------------------------------------------------------------
    @property
    def height(self) -> int:
        return self._size[0] if self._size else 0

    @property
    def width(self) -> int:
        return self._size[1] if self._size else 0

    @property
    def busy(self) -> bool:
        return self._runner.busy

    def command_schemas(self) -> list[dict]:
        return self.commands.schemas()

    # -- commands (any thread) -----------------------------------------------------------------------------
    def submit(self, name: str, params: dict | None = None, reply: Callable[[dict], None] | None = None) -> Ticket:
        """Validate now (CommandError naming the field; nothing ran) and run the method in the command thread."""
        ticket = self.commands.validate(name, params)
        ticket.reply = reply
        self._queue.put(ticket)  # first: an idle worker ends only once it sees the queue empty
        self._ensure_worker()
        return ticket

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="reactor-model-commands", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        """Runs the queued commands, then ends once the queue stays empty: no thread idles for ever."""
        while True:
            try:
                t = self._queue.get(timeout=WORKER_IDLE_S)
            except queue.Empty:
                with self._lock:  # submit() puts first, then looks for a worker under this lock
                    if self._queue.empty():
                        self._worker = None
                        return
                continue
            if t.name == _SYNC:
                t.finish({"ok": True})
                continue
            if t.command is None:
                t.finish(self._reset())
                continue
            try:
                with bound(self._ctx):
                    t.command.call(self.model, t.params)
                result = {"ok": True}
            except Exception as exc:  # a failing command never ends the session
                log.warning("command %s failed: %s", t.name, exc, exc_info=True)
                result = {"ok": False, "error": f"command '{t.name}' failed: {type(exc).__name__}: {exc}"
                                                f"{where_raised(exc)}"}
            t.finish(result)

    def _reset(self) -> dict:
        with self._lock:
            ctx, thread = self._ctx, self._runner.thread
            if ctx is None or thread is None or not thread.is_alive():
                return {"ok": True}  # no session: the next one starts fresh anyway
            self._restarted.clear()
            self._restart = True
            ctx.stop()
            if self._in_before:  # a scripted reset: the model thread waits for this very command; don't wait back
                return {"ok": True}
        if not self._restarted.wait(self.stop_timeout):
            return {"ok": False, "error": f"reset: {type(self.model).__name__}.start_session() did not return within "
                                          f"{self.stop_timeout:.1f}s of being asked to stop; it is at "
                                          f"{where_running(thread)}"}
        return {"ok": True}

    # -- sessions ----------------------------------------------------------------------------------------
    def start_session(self, on_block: Callable[[Block], None], on_end: Callable[[SessionResult], None] | None = None,
                      max_blocks: int | None = None, *, before_block: Callable[[int], None] | None = None
                      ) -> threading.Thread:
        with self._lock:
            run = _Run(on_block, max_blocks, before_block)
            return self._runner.start(lambda: self._session(run, on_end),
                                      f"a session is still running ({type(self.model).__name__}.start_session() "
                                      f"has not returned)")

    def run_session(self, on_block: Callable[[Block], None], max_blocks: int | None = None,
                    stop: threading.Event | None = None, before_block: Callable[[int], None] | None = None,
                    timeout: float | None = None) -> SessionResult:
        """Run one session and wait for it, like Engine.run_session (for render, bench and tests).

        `before_block(n)` is called before block n: for n=0 before start_session(), then inside the model's
        emit_block of block n-1, after it was handed on; emit_block returns only once the commands it submitted
        have run, so a model that reads its state once per block makes block n with them (a scripted render is
        deterministic). `stop` (an Event) or `timeout` seconds end the session early."""
        done: list[SessionResult] = []
        t = self.start_session(on_block, done.append, max_blocks, before_block=before_block)
        end = None if timeout is None else time.monotonic() + timeout
        while t.is_alive():
            t.join(0.05)
            if (stop is not None and stop.is_set()) or (end is not None and time.monotonic() > end):
                self.stop()
                break
        t.join()
        return done[0]

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until every command submitted so far has run. False if that took longer than `timeout`."""
        ticket = Ticket(_SYNC, None, None)
        self._queue.put(ticket)  # first: an idle worker ends only once it sees the queue empty
        self._ensure_worker()
        return ticket.done.wait(timeout)

    def _session(self, run: _Run, on_end) -> None:
        res = run.result
        self.stats.sessions += 1
        cls = type(self.model).__name__
        try:
            if run.before_block is not None:
                self._before(run)
            while True:
                ctx = SessionContext(sink=None, messages=self._deliver, size=lambda: self._size, owner=self.name)
                ctx._sink = functools.partial(self._on_frames, run, ctx=ctx)  # this ctx, also after a reset
                with self._lock:
                    self._ctx, self._run = ctx, run
                    self._restart = False
                    if self._stopping.is_set() or run.full:
                        ctx.stop()
                    self._restarted.set()  # a waiting reset is answered once the new ctx is in place
                try:
                    with bound(ctx, register=True), self._driven(ctx):
                        self.model.start_session()
                except Exception as exc:
                    self.stats.errors += 1
                    res.reason = "error"
                    res.error = f"model '{self.name}' failed in {cls}.start_session(): {type(exc).__name__}: {exc}" \
                                f"{where_raised(exc)}{self.driver.explain(exc) if self.driver else ''}"
                    log.error("session ended: %s", res.error, exc_info=exc)
                    break
                finally:
                    ctx.stop()  # helper threads the model left running see should_stop(); late blocks are dropped
                with self._lock:
                    again = self._restart and not self._stopping.is_set() and not run.full and res.reason != "sink"
                    self._restart = False
                if not again:
                    break
            if res.reason not in ("error", "sink"):
                res.reason = "stopped" if self._stopping.is_set() else "finished"
        finally:
            with self._lock:
                self._ctx = None
            self._restarted.set()
        if on_end is not None:
            try:
                on_end(res)
            except Exception:
                log.exception("on_end failed")

    def _driven(self, ctx: SessionContext):
        """The real package's own context around ctx, for a model built on it (else nothing)."""
        return self.driver.session(self.model, ctx) if self.driver is not None else contextlib.nullcontext()

    def push_frame(self, frame: Any, track: str | None = None) -> None:
        """A client video frame ([H, W, 3] uint8 RGB numpy) to the model: on_frame(frame), or for a model on
        reactor_runtime 1.6+ its _dispatch_media(MediaBundle) (VideoIn tracks' latest(), on_media)."""
        with bound(self._ctx):
            if self.driver is not None:
                self.driver.deliver_frame(self.model, frame, track)
            elif callable(getattr(self.model, "on_frame", None)):
                self.model.on_frame(frame)

    def _on_frames(self, run: _Run, frames: torch.Tensor, *, ctx: SessionContext) -> None:
        """emit_block's sink, in the model's thread: check the size, convert, count, hand on."""
        res = run.result
        if ctx.should_stop() or run.full or res.reason == "sink":
            return  # a block emitted after should_stop() turned True is dropped
        h, w = int(frames.shape[-2]), int(frames.shape[-1])
        with self._lock:
            if self._size is None:
                if self.format != "rgb24" and (h % 2 or w % 2):
                    raise FrameError(f"emit_block got {h}x{w} (HxW) frames; a {self.format} stream needs an even "
                                     f"height and width: crop or pad the frames, or use format='rgb24'")
                self._size = (h, w)
        if (h, w) != self._size:
            raise FrameError(f"emit_block got {h}x{w} (HxW) frames, but this stream is {self._size[0]}x"
                             f"{self._size[1]} (fixed by the manifest's 'size' or by the first block): a stream keeps "
                             f"one size; resize the frames before emit_block")
        block = self._make_block(res.blocks, frames, run.last)
        self.stats.last_block_s = block.ready - run.last
        self.stats.blocks += 1
        self.stats.frames += block.frames
        res.blocks += 1
        if run.full:
            ctx.stop()
        try:
            run.on_block(block)
        except Exception as exc:  # the consumer went away: end the session, keep the model
            res.reason, res.error = "sink", f"the stream's consumer failed: {exc}"
            ctx.stop()
        if run.before_block is not None and not ctx.should_stop():
            self._before(run)
        run.last = time.perf_counter()

    def _before(self, run: _Run) -> None:
        try:
            run.before_block(run.result.blocks)
        except Exception:
            log.exception("before_block failed")
        with self._lock:
            self._in_before = True
        try:
            if not self.sync(self.stop_timeout):
                log.warning("commands submitted before block %d did not finish within %.1fs; going on",
                            run.result.blocks, self.stop_timeout)
        finally:
            with self._lock:
                self._in_before = False

    def _make_block(self, index: int, frames: torch.Tensor, started: float) -> Block:
        if self.format == "rgb24":
            video = to_uint8(frames).permute(0, 2, 3, 1).contiguous()
        else:
            from reactor_graph.kernels import colour

            convert = colour.rgb_to_nv12 if self.format == "nv12" else colour.rgb_to_yuv420p
            video = convert(frames, matrix=self.matrix)
        copier = self._copiers.get(video.device)
        if copier is None:
            copier = self._copiers[video.device] = HostCopier(video.device)
        return copier.emit(index, {"video": video}, SimpleNamespace(format=self.format), started)

    def _deliver(self, data: Any) -> None:
        self.messages.append(data)
        hook = self.on_message
        if hook is not None:
            try:
                hook(data)
            except Exception:
                log.exception("on_message failed")

    def stop(self, timeout: float | None = None) -> None:
        """Ask the session to stop and wait for start_session() to return; the watchdog gives up after
        `timeout` (default `stop_timeout`) seconds and raises SessionError naming where the model is stuck."""
        wait = self.stop_timeout if timeout is None else timeout
        with self._lock:
            self._stopping.set()
            if self._ctx is not None:
                self._ctx.stop()
        self._runner.stop(wait, lambda t: f"watchdog: {type(self.model).__name__}.start_session() did not return "
                                          f"within {wait:.1f}s of being asked to stop; it is at {where_running(t)} "
                                          f"and does not check get_ctx().should_stop() there")
        return None

    def __repr__(self) -> str:
        return f"<ModelHost {self.name!r} {type(self.model).__name__} {self.height}x{self.width}@{self.fps:g}>"
