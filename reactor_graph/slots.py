"""Versioned slots and the command queue.

Commands are validated with pydantic in the thread they arrive on (so a bad one is refused before anything
changes) and queued; the loop applies the queue at the next block boundary. Every slot write bumps that
slot's version, which is how on-change nodes know to run once per change rather than once per block.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import CommandError
from .inputs import IMAGE_PARAM, MEDIA_TYPES, media_value
from .spec import CommandSpec, ParamSpec, SlotSpec, near

_PY_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
RESET = "reset"


def slot_value(spec: SlotSpec, value: Any) -> Any:
    """Coerce a value to what the slot holds; raises ValueError naming what was expected."""
    if spec.type in MEDIA_TYPES:  # video / image slots: reactor_graph/inputs.py
        return media_value(spec, value)
    if spec.type == "tensor":
        t = torch.as_tensor(value, dtype=torch.float32)
        if spec.shape is not None and list(t.shape) != list(spec.shape):
            raise ValueError(f"expected a tensor of shape {list(spec.shape)}, got {list(t.shape)}")
        return t
    if spec.type == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    py = _PY_TYPES[spec.type]
    if not isinstance(value, py) or (py is int and isinstance(value, bool)):
        raise ValueError(f"expected {spec.type}, got {type(value).__name__} {value!r}")
    return value


def params_model(name: str, params: dict[str, ParamSpec]) -> type[BaseModel]:
    """A pydantic model for a command's params; its JSON schema is what clients are shown."""
    fields: dict[str, Any] = {}
    for pname, p in params.items():
        typ: Any = IMAGE_PARAM if p.type == "image" else _PY_TYPES[p.type]
        if p.enum:
            typ = Literal[tuple(p.enum)]
        kw = {k: getattr(p, k) for k in ("min_length", "max_length", "ge", "le") if getattr(p, k) is not None}
        default = ... if p.default is None else p.default
        fields[pname] = (typ, Field(default, description=p.description or None, **kw))
    # strict: a client's true is not 1, "17" is not 17 and 18.0 is not an int (a JSON integer is a float)
    return create_model(f"{name}_params", __config__=ConfigDict(extra="forbid", strict=True), **fields)


@dataclass
class Command:
    """A command as the graph declares it: validated params -> slot writes and/or node swaps."""

    name: str
    spec: CommandSpec
    model: type[BaseModel]

    @classmethod
    def build(cls, name: str, spec: CommandSpec) -> Command:
        return cls(name, spec, params_model(name, spec.params))

    def validate(self, params: dict | None) -> BaseModel:
        if params is not None and not isinstance(params, dict):
            raise CommandError(self.name, f"params must be an object, got {type(params).__name__}")
        try:
            return self.model.model_validate(params or {})
        except ValidationError as err:
            errors = err.errors()
            # a misspelt key shows as both "missing" and "extra": name the unknown key, with what it may mean
            e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
            field_name = ".".join(str(p) for p in e["loc"]) or None
            msg = e["msg"].removeprefix("Value error, ")
            takes = ", ".join(self.model.model_fields) or "nothing"
            if e["type"] == "extra_forbidden":
                msg = f"unknown parameter '{field_name}'{near(str(field_name), self.model.model_fields)}; " \
                      f"this command takes: {takes}"
            elif e["type"] == "missing":
                msg = "required parameter is missing"
            raise CommandError(self.name, msg, field_name) from None

    def writes(self, params: BaseModel) -> dict[str, Any]:
        """Slot name -> new raw value, with '$param' replaced and declared mappings applied."""
        values = {k: getattr(params, k) for k in type(params).model_fields}  # as validated (an image stays one)
        out = {}
        for slot, template in self.spec.set.items():
            if isinstance(template, str) and template.startswith("$"):
                pname = template[1:]
                value = values[pname]
                if pname in self.spec.map:
                    value = self.spec.map[pname][str(value)]
                out[slot] = value
            else:
                out[slot] = template
        return out

    def schema(self) -> dict:
        return {"name": self.name, "description": self.spec.description, "schema": self.model.model_json_schema()}


@dataclass
class SlotStore:
    """The current value and version of every slot. Written only by the loop thread."""

    specs: dict[str, SlotSpec]
    values: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.restore_defaults()

    def restore_defaults(self) -> None:
        for name, spec in self.specs.items():
            self.write(name, spec.default)

    def write(self, name: str, value: Any) -> None:
        spec = self.specs[name]
        self.values[name] = None if value is None else slot_value(spec, value)
        self.versions[name] = self.versions.get(name, 0) + 1


@dataclass
class Pending:
    command: Command | None  # None for the built-in reset (or an action)
    params: BaseModel | None
    reply: Any = None  # optional callback(result: dict) for whoever sent it
    action: Any = None  # engine-side work for the boundary (a swap); returns the reply dict
    submitted: float = field(default_factory=time.perf_counter)  # when it arrived (traces: arrival -> frame)


class CommandQueue:
    """Thread-safe: `submit` from any thread, `drain` from the loop at a block boundary."""

    def __init__(self, commands: dict[str, Command]):
        self.commands = commands
        self._q: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def validate(self, name: str, params: dict | None) -> Pending:
        if name == RESET:
            if params:
                raise CommandError(RESET, "takes no parameters")
            return Pending(None, None)
        if not isinstance(name, str) or name not in self.commands:
            from .spec import near

            known = ", ".join(sorted([*self.commands, RESET]))
            raise CommandError(str(name), f"unknown command{near(str(name), self.commands)}; known: {known}")
        cmd = self.commands[name]
        return Pending(cmd, cmd.validate(params))

    def submit(self, name: str, params: dict | None = None, reply=None) -> Pending:
        pending = self.validate(name, params)
        pending.reply = reply
        self._q.put(pending)
        return pending

    def submit_action(self, action, reply=None) -> Pending:
        pending = Pending(None, None, reply, action)
        self._q.put(pending)
        return pending

    def drain(self) -> list[Pending]:
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out
