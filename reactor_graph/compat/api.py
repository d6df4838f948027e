"""The Reactor runtime model API, implemented on reactor-graph: `VideoModel`, `@command`, `get_ctx()`.

A model written for that API is one class:

    class MyModel(VideoModel):
        def __init__(self, **args): ...            # heavy load, once per process (manifest `args`)
        @command("set_prompt", description="...")
        def set_prompt(self, prompt: str = Field(..., max_length=500)): self._prompt = prompt
        def start_session(self):                    # one session; returns when it ends
            while not get_ctx().should_stop():
                get_ctx().emit_block(self.generate(self._prompt))

Commands run concurrently with `start_session()` (in the host's command thread), as the API promises; they
change instance state the loop reads. `get_ctx()` is a plain function, importable anywhere; it returns the
running session's context (see `SessionContext`) and raises a RuntimeError outside a session.
"""
from __future__ import annotations

import inspect
import json
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, create_model
from pydantic.fields import FieldInfo

from .frames import FrameError, as_frames

API_VERSION = "0.0.0+reactor-graph"  # what the shim answers for reactor_runtime.__version__


# ---------------------------------------------------------------------------------------------- commands
@dataclass
class ModelCommand:
    """One `@command` method: its name, description and (built lazily, once) the pydantic model of its params."""

    name: str
    description: str
    fn: Callable
    _model: type[BaseModel] | None = field(default=None, repr=False)
    _names: tuple[str, ...] = ()

    @property
    def params_model(self) -> type[BaseModel]:
        if self._model is None:
            self._model, self._names = _params_model(self.name, self.fn)
        return self._model

    def call(self, instance: Any, validated: BaseModel) -> Any:
        self.params_model  # noqa: B018 - builds _names
        kwargs = {n: getattr(validated, n) for n in self._names}
        kwargs.update(validated.model_extra or {})
        method = getattr(instance, self.fn.__name__, None)  # a subclass's override of the method runs
        if callable(method) and getattr(method, "__func__", None) is not None:
            return method(**kwargs)
        return self.fn(instance, **kwargs)


def _params_model(name: str, fn: Callable) -> tuple[type[BaseModel], tuple[str, ...]]:
    """The method's parameters as a pydantic model: hints, plain defaults, `Field(...)`, `Literal[...]`."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an unresolvable forward reference: fall back to the raw annotations
        hints = {}
    fields: dict[str, Any] = {}
    extra = "forbid"
    params = list(sig.parameters.values())[1:]  # drop self
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            extra = "allow"
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        ann = hints.get(p.name, p.annotation)
        if ann is inspect.Parameter.empty or isinstance(ann, str):
            ann = Any
        default = p.default
        if default is inspect.Parameter.empty:
            fields[p.name] = (ann, ...)
        elif isinstance(default, FieldInfo):
            fields[p.name] = (ann, default)
        else:
            fields[p.name] = (ann, default)
    # strict, as for graph commands: a client's true is not 1 and "17" is not 17
    model = create_model(f"{name}_params", __config__=ConfigDict(extra=extra, arbitrary_types_allowed=True,
                                                                  strict=True), **fields)
    return model, tuple(fields)


def command(name: str | Callable | None = None, description: str = ""):
    """Mark a method of a VideoModel as a client command: `@command("set_prompt", description="...")`.

    The method's parameters (type hints, plain defaults, pydantic `Field(...)` with description and
    constraints, `Literal[...]` choices) become a pydantic model: params are validated before the method runs,
    and its JSON schema is what clients are shown. `@command` and `@command()` use the method's own name.
    """
    if callable(name):  # bare @command
        fn = name
        fn._reactor_command = ModelCommand(fn.__name__, description or _first_paragraph(fn), fn)
        return fn

    def deco(fn: Callable) -> Callable:
        fn._reactor_command = ModelCommand(name or fn.__name__, description or _first_paragraph(fn), fn)
        return fn

    return deco


def _first_paragraph(fn: Callable) -> str:
    return (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")


def model(name: str | type | None = None, config: str | None = None, weights: list[str] | None = None, **extra):
    """`@model(name=..., config=..., weights=[...])` of the newer runtime API: records the metadata on the class
    (as `_reactor_model`); reactor-graph reads the class and its args from the manifest, so this changes nothing
    else. Bare `@model` works too."""
    def deco(cls):
        cls._reactor_model = {"name": name if isinstance(name, str) else None, "config": config,
                              "weights": list(weights or []), **extra}
        return cls

    if isinstance(name, type):
        return deco(name)
    return deco


def commands_of(cls: type) -> dict[str, ModelCommand]:
    """Every `@command` of a class and its bases, by command name (a subclass's definition wins)."""
    found: dict[str, ModelCommand] = {}
    for klass in reversed(cls.__mro__):
        for attr in vars(klass).values():
            fn = getattr(attr, "__func__", attr)
            info = getattr(fn, "_reactor_command", None)
            if isinstance(info, ModelCommand):
                found[info.name] = info
    return found


class VideoModel:
    """Base class of a Reactor-API model. Subclass it; implement `__init__(**args)` and `start_session()`.

    `start_session()` runs one session: loop until `get_ctx().should_stop()`, emitting blocks with
    `get_ctx().emit_block(frames)`; return (or raise) to end it. It is called again for every session.
    """

    name: str = ""

    def start_session(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement start_session()")

    @classmethod
    def commands(cls) -> dict[str, ModelCommand]:
        return commands_of(cls)

    def on_frame(self, frame) -> None:
        """Called with each client video frame ([H, W, 3] uint8 RGB numpy), where the client sends video."""

    @staticmethod
    def weights(name: str):
        """The local folder of the weights called `name` (reactor_graph.compat.weights: the manifest's mapping,
        --weights-dir, the manifest's folder; never a download). WeightsNotFound lists where it looked."""
        from . import weights

        return weights.resolve(name)


class Config(dict):
    """Manifest `args` handed to an `__init__(self, config)`: a dict that also reads as attributes
    (`config.steps`, `config.get("steps", 4)`), the parts of OmegaConf's DictConfig models use."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


# ---------------------------------------------------------------------------------------------- context
class SessionContext:
    """The running session, as the model sees it through `get_ctx()`.

    - `should_stop()`: True once the session was asked to stop (client left, stop(), max_blocks, reset);
      `_stop_evt` (a threading.Event) is the same flag, for models that read it directly;
    - `emit_block(frames)` / `emit_frame(frame)`: hand a block on (see reactor_graph.compat.frames for what is
      taken); `emit_block(None)` emits a black frame;
    - `send(data)`: a JSON-serialisable message to the client;
    - `enable_monitoring()` / `disable_monitoring()`, `get_track(name=None).emit(frames)`: kept for older and
      newer models; monitoring is a flag only (the host measures every block anyway).

    `sink(frames)` receives every accepted block as [N, 3, H, W] (uint8 or float, on the block's device);
    `messages(data)` every sent message. Both run in the calling (model) thread.
    """

    def __init__(self, sink: Callable[[torch.Tensor], None], messages: Callable[[Any], None] | None = None,
                 size: Callable[[], tuple[int, int] | None] | None = None, owner: str = "session"):
        self._stop_evt = threading.Event()
        self._sink = sink
        self._messages = messages
        self._size = size or (lambda: None)
        self.owner = owner
        self.monitoring = False
        self.frames_emitted = 0
        self.blocks_emitted = 0

    def should_stop(self) -> bool:
        return self._stop_evt.is_set()

    def stop(self) -> None:
        self._stop_evt.set()

    def emit_block(self, frames: Any) -> None:
        block = as_frames(frames, self._size())
        self._sink(block)
        self.blocks_emitted += 1
        self.frames_emitted += block.shape[0]

    def emit_frame(self, frame: Any) -> None:
        """One frame; the same forms as emit_block (a [H, W, 3] frame, or a block of one)."""
        self.emit_block(frame)

    def send(self, data: Any) -> None:
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"send() takes JSON-serialisable data (dicts, lists, str, numbers); {exc}") from None
        if self._messages is not None:
            self._messages(data)

    def enable_monitoring(self) -> None:
        self.monitoring = True

    def disable_monitoring(self) -> None:
        self.monitoring = False

    def get_track(self, name: str | None = None) -> _Track:
        return _Track(self, name)


class _Track:
    def __init__(self, ctx: SessionContext, name: str | None):
        self.ctx, self.name = ctx, name

    def emit(self, frames: Any) -> None:
        self.ctx.emit_block(frames)


# get_ctx(): the session thread (and the host's command thread) see their own session through a thread-local;
# any other thread (a helper thread the model started) sees the one active session, when there is exactly one.
_local = threading.local()
_active: list[SessionContext] = []
_active_lock = threading.Lock()


def get_ctx() -> SessionContext:
    """The running session's context. Raises RuntimeError outside a session."""
    ctx = getattr(_local, "ctx", None)
    if ctx is not None:
        return ctx
    with _active_lock:
        active = list(_active)
    if len(active) == 1:
        return active[0]
    if not active:
        raise RuntimeError("get_ctx() was called outside a session: the context exists only while "
                           "start_session() runs (call it from start_session() or code it calls, or from a "
                           "command during a session), not in __init__ or at import time")
    raise RuntimeError(f"get_ctx() is ambiguous here: {len(active)} sessions are running in this process "
                       f"({', '.join(c.owner for c in active)}) and this thread belongs to none of them; call it "
                       f"from the session's own thread")


class bound:
    """`with bound(ctx):` makes get_ctx() return ctx in this thread (and ctx the active one process-wide)."""

    def __init__(self, ctx: SessionContext | None, register: bool = False):
        self.ctx, self.register = ctx, register

    def __enter__(self):
        self.prev = getattr(_local, "ctx", None)
        _local.ctx = self.ctx
        if self.register and self.ctx is not None:
            with _active_lock:
                _active.append(self.ctx)
        return self.ctx

    def __exit__(self, *exc):
        _local.ctx = self.prev
        if self.register and self.ctx is not None:
            with _active_lock:
                if self.ctx in _active:
                    _active.remove(self.ctx)


__all__ = ["VideoModel", "command", "model", "get_ctx", "SessionContext", "ModelCommand", "Config",
           "FrameError", "commands_of", "API_VERSION"]
