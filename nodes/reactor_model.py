"""A Reactor-API VideoModel class as one node: the model's own loop feeds the graph, block by block.

    nodes:
      model:
        type: reactor_model
        params: {class: "my_model:MyModel", path: models, args: {steps: 4}, frames: 4,
                 commands: {prompt: set_prompt}}        # optional: slot-bound inputs that call commands
        in: {prompt: $slots.prompt}
      out: {type: emit, in: {frames: model.frames}}

`load()` imports the class (from `path`, relative to the graph file) and builds it once with `args`. The first
`forward()` of a session starts the model's `start_session()` in a background thread; every block the model emits
goes into a small frame queue (the model's emit_block waits while the queue is full, so it runs at the graph's
pace), and each `forward()` hands on the next `frames` frames as `[T, 3, H, W]` (uint8, or float in [-1, 1] with
`output: float`) on the graph's device, waiting for them and polling should_stop() while it waits. The model may
emit blocks of any length (single frames too); they are regrouped into T frames. Frames must have the graph's
size; a model that emits another size ends its session with a clear error, reported by this node.

`reset()` ends the model's session (its should_stop() turns True and its start_session() is waited for); the next
forward() starts a new one. A model whose start_session() returns on its own is started again (a finite model
wraps, as everywhere in the engine); one that raises ends the graph's session with its error.

Commands. The engine routes client commands to slots, not to nodes; a graph reaches the model's `@command`
methods through slots: `commands: {port: "command"}` (a one-parameter command) or `{port: "command.param"}`
declares an input port; bind a slot to it, and whenever the slot's value changes (and at the start of each model
session) the node calls that command with it, in the engine thread at the block boundary, before taking the next
frames. A value the model's command refuses is logged and skipped. `commands()` / `call_command(name, params)`
reach every command of the class directly, for code that holds the node.
"""
from __future__ import annotations

import logging
import threading
import time
import typing
from collections import deque
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.compat import api as compat_api
from reactor_graph.compat.frames import FrameError, to_float, to_uint8
from reactor_graph.compat.host import where_raised, where_running
from reactor_graph.compat.manifest import ModelLoadError, init_problems, instantiate, load_class
from reactor_graph.errors import CommandError, SessionError
from reactor_graph.slots import Command
from reactor_graph.spec import CommandSpec
from reactor_graph.node import Node, Port, register
from reactor_graph.session_thread import SessionThread

log = logging.getLogger("reactor_graph.compat")
_KINDS = {str: "str", int: "int", float: "float", bool: "bool"}


def _port_kind(annotation: Any) -> str:
    if annotation in _KINDS:
        return _KINDS[annotation]
    if typing.get_origin(annotation) is Literal:
        kinds = {_KINDS.get(type(a)) for a in typing.get_args(annotation)}
        return kinds.pop() if len(kinds) == 1 and None not in kinds else "any"
    if isinstance(annotation, type) and issubclass(annotation, torch.Tensor):
        return "tensor"
    return "any"


@register("reactor_model")
class ReactorModel(Node):
    description = ("A Reactor-API VideoModel class (module:Class) as one node: runs its start_session() in a "
                   "background thread and hands on the frames it emits, T per block, as [T, 3, H, W].")
    every_block = True
    # as declared (the instance's ports(): one input per bound start_session() argument, shapes from params)
    outputs = {"frames": Port("tensor", None, ("T", 3, "H", "W"), "[T, 3, H, W] RGB, T = params.frames, "
                                                                  "uint8 or float per params.output")}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        class_: str = Field(alias="class", description="'module:Class' of a VideoModel subclass")
        args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the class's __init__")
        frames: int = Field(ge=1, le=1024, description="frames per block handed on (T)")
        path: str | None = Field(None, description="folder holding the module, relative to the graph file")
        output: Literal["uint8", "float"] = Field("uint8", description="uint8 [0, 255], or float [-1, 1] in the "
                                                                       "graph's dtype")
        commands: dict[str, str] = Field(default_factory=dict, description="input port -> 'command' or "
                                                                           "'command.param' it calls on change")
        buffer_blocks: int = Field(2, ge=1, le=64, description="blocks of frames the model may run ahead")
        stop_timeout: float = Field(5.0, gt=0, description="seconds reset() waits for start_session() to return")

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        folder = Path(params.path).expanduser() if params.path else None
        root = Path(graph.root) if graph.root is not None else Path.cwd()
        folder = root if folder is None else (folder if folder.is_absolute() else root / folder)
        try:
            self.cls = load_class(params.class_, folder)
        except ModelLoadError as exc:
            raise ValueError(str(exc)) from None
        problems = init_problems(self.cls, params.args)
        if problems:
            raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
        self._cmds = compat_api.commands_of(self.cls)
        self._bindings: dict[str, tuple[str, str]] = {}  # port -> (command, param)
        self._kinds: dict[str, str] = {}
        for port, target in params.commands.items():
            cname, _, pname = target.partition(".")
            if cname not in self._cmds:
                raise ValueError(f"commands.{port}: {self.cls.__name__} has no command '{cname}'; its commands: "
                                 f"{', '.join(sorted(self._cmds)) or 'none'}")
            fields = self._cmds[cname].params_model.model_fields
            if not pname:
                if len(fields) != 1:
                    raise ValueError(f"commands.{port}: '{cname}' takes {len(fields)} parameters "
                                     f"({', '.join(fields) or 'none'}); name one as '{cname}.PARAM'")
                pname = next(iter(fields))
            if pname not in fields:
                raise ValueError(f"commands.{port}: '{cname}' has no parameter '{pname}'; it takes "
                                 f"{', '.join(fields) or 'nothing'}")
            self._bindings[port] = (cname, pname)
            self._kinds[port] = _port_kind(fields[pname].annotation)
        self.model = None
        self._cond = threading.Condition()
        self._fifo: deque[torch.Tensor] = deque()
        self._ctx: compat_api.SessionContext | None = None
        self._runner = SessionThread(f"reactor-model-{name}")
        self._error: str | None = None
        self._emitted = 0  # frames the running model session emitted
        self._applied: dict[str, Any] = {}
        self._last: torch.Tensor | None = None
        self.sessions = 0  # model sessions started (wraps and resets included)
        self.waited_s = 0.0  # how long the last forward() waited for frames (the model slower than the graph)

    def ports(self):
        g, t = self.graph, self.params.frames
        ins = {port: Port(self._kinds[port], description=f"calls {c}({p}=...) when it changes")
               for port, (c, p) in self._bindings.items()}
        dtype = "uint8" if self.params.output == "uint8" else "float"
        return ins, {"frames": Port("tensor", dtype, (t, 3, g.height, g.width), "[T, 3, H, W] RGB")}

    # -- life cycle ----------------------------------------------------------------------------------------
    def load(self, device, dtype):
        super().load(device, dtype)
        if self.model is None:  # the heavy part, once per process
            self.model = instantiate(self.cls, self.params.args)

    def reset(self):
        """End the model's session (if one runs) and forget its frames; the next forward() starts a new one."""
        ctx = self._ctx
        if ctx is not None:
            ctx.stop()
        with self._cond:
            self._cond.notify_all()
        try:
            self._runner.stop(self.params.stop_timeout, lambda t: (
                f"node {self.name}: {self.cls.__name__}.start_session() did not return within "
                f"{self.params.stop_timeout:.1f}s of being asked to stop; it is at {where_running(t)}"))
        except SessionError as exc:  # reset() must not raise; the next _start() refuses while it runs
            log.error("%s", exc)
        self._ctx = None
        with self._cond:
            self._fifo.clear()
        self._error = None
        self._applied.clear()

    def _start(self) -> None:
        stuck = self._runner.thread
        busy = (f"the model's previous session has not ended: {self.cls.__name__}.start_session() is still "
                f"running at {where_running(stuck) if stuck else '?'} and ignores should_stop()")
        if self._runner.busy:
            raise RuntimeError(busy)
        ctx = compat_api.SessionContext(sink=lambda frames: self._take(ctx, frames), messages=self._message,
                                        size=lambda: (self.graph.height, self.graph.width), owner=self.name)
        self._ctx, self._emitted, self._error = ctx, 0, None
        self.sessions += 1
        self._applied.clear()  # a new model session gets every bound command again
        self._runner.start(lambda: self._run_model(ctx), busy)

    def _run_model(self, ctx) -> None:
        try:
            with compat_api.bound(ctx, register=True):
                self.model.start_session()
        except Exception as exc:
            self._error = (f"{self.cls.__name__}.start_session() raised {type(exc).__name__}: {exc}"
                           f"{where_raised(exc)}")
            log.error("node %s: %s", self.name, self._error)
        finally:
            with self._cond:
                self._cond.notify_all()

    def _message(self, data) -> None:
        log.info("node %s: message from the model: %s", self.name, data)

    def _take(self, ctx, frames: torch.Tensor) -> None:
        """emit_block's sink, in the model's thread: check the size, queue the frames (waiting while full)."""
        g = self.graph
        if tuple(frames.shape[-2:]) != (g.height, g.width):
            raise FrameError(f"emit_block got {frames.shape[-2]}x{frames.shape[-1]} (HxW) frames, but the graph's "
                             f"size is {g.height}x{g.width}; emit frames of the graph's size (or change 'size')")
        frames = to_uint8(frames) if self.params.output == "uint8" else frames
        frames = frames.clone()  # the model may reuse its buffer (numpy arrays, static CUDA outputs)
        cap = self.params.frames * self.params.buffer_blocks
        with self._cond:
            while len(self._fifo) >= cap and not ctx.should_stop():
                self._cond.wait(0.05)
            if ctx.should_stop():
                return
            self._fifo.extend(frames.unbind(0))
            self._emitted += frames.shape[0]
            self._cond.notify_all()

    # -- commands --------------------------------------------------------------------------------------------
    def commands(self) -> list[dict]:
        """[{name, description, schema}] of the class's @command methods."""
        return [{"name": n, "description": c.description, "schema": c.params_model.model_json_schema()}
                for n, c in self._cmds.items()]

    def call_command(self, name: str, params: dict | None = None) -> dict:
        """Validate and call one of the model's commands now, in this thread. Returns {"ok": ...}."""
        if name not in self._cmds:
            return {"ok": False, "error": f"unknown command '{name}'; known: {', '.join(sorted(self._cmds))}"}
        cmd = self._cmds[name]
        try:  # the same validation as every command a client sends
            validated = Command(name, CommandSpec(description=cmd.description), cmd.params_model).validate(params)
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        try:
            with compat_api.bound(self._ctx):
                cmd.call(self.model, validated)
        except Exception as exc:
            return {"ok": False, "error": f"command '{name}' failed: {type(exc).__name__}: {exc}{where_raised(exc)}"}
        return {"ok": True}

    def _apply_bound(self, inputs: dict[str, Any]) -> None:
        by_cmd: dict[str, dict[str, Any]] = {}
        for port, value in inputs.items():
            if port not in self._bindings:
                continue
            old = self._applied.get(port, _UNSET)
            same = old is not _UNSET and (torch.equal(old, value) if isinstance(value, torch.Tensor)
                                          and isinstance(old, torch.Tensor) else old == value)
            if not same:
                cname, pname = self._bindings[port]
                by_cmd.setdefault(cname, {})[pname] = value
                self._applied[port] = value
        for cname, params in by_cmd.items():
            for port, (c, p) in self._bindings.items():  # a multi-parameter command gets all its bound values
                if c == cname and p not in params and port in self._applied:
                    params[p] = self._applied[port]
            result = self.call_command(cname, params)
            if not result["ok"]:
                log.warning("node %s: %s", self.name, result["error"])

    # -- the block ------------------------------------------------------------------------------------------
    def forward(self, **inputs):
        if self._ctx is None:  # no model session since the last reset
            self._start()
        if self._bindings:
            self._apply_bound(inputs)
        t = self.params.frames
        waited_since = time.monotonic()
        with self._cond:
            while len(self._fifo) < t:
                if self._error is not None:
                    raise RuntimeError(self._error)
                if not self._runner.busy:  # returned on its own: wrap, unless it emitted nothing at all
                    if self._emitted == 0:
                        raise RuntimeError(f"{self.cls.__name__}.start_session() returned without emitting a frame")
                    self._cond.release()
                    try:
                        self._start()
                    finally:
                        self._cond.acquire()
                    continue
                if self.should_stop():
                    return {"frames": self._fallback()}
                self._cond.wait(0.05)
            block = [self._fifo.popleft() for _ in range(t)]
            self._cond.notify_all()
        out = torch.stack(block).to(self.device, non_blocking=True)
        out = out if self.params.output == "uint8" else to_float(out, self.dtype)
        self._last = out
        self.waited_s = time.monotonic() - waited_since
        return {"frames": out}

    def _fallback(self) -> torch.Tensor:
        """What a block interrupted by stop hands on: the last block, or black."""
        if self._last is not None:
            return self._last
        g, t = self.graph, self.params.frames
        if self.params.output == "uint8":
            return torch.zeros((t, 3, g.height, g.width), dtype=torch.uint8, device=self.device)
        return torch.full((t, 3, g.height, g.width), -1.0, dtype=self.dtype, device=self.device)


_UNSET = object()
