"""The node contract: typed ports with symbolic shapes, pydantic params, load/reset/forward, a registry.

A node type is one class in one file under nodes/, registered under its YAML name with `@register`.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

Dim = int | str  # a concrete size, or a symbol such as "T" bound per node when edges are checked


@dataclass(frozen=True)
class Port:
    """One input or output of a node.

    kind: tensor | str | int | float | bool | any
    dtype: for tensors, "float" (the graph's compute dtype), "uint8", "int64", ... or None for any
    shape: for tensors, e.g. ("T", 3, "H", "W"); symbols unify per node, ints must match exactly
    """

    kind: str = "tensor"
    dtype: str | None = None
    shape: tuple[Dim, ...] | None = None
    description: str = ""
    optional: bool = False

    def describe(self) -> str:
        if self.kind != "tensor":
            return self.kind
        dims = " ".join(str(d) for d in self.shape) if self.shape is not None else "..."
        return f"tensor[{self.dtype or 'any'}]({dims})"


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class GraphInfo:
    """Graph-wide settings a node may specialise itself on (frame size, fps, where the file lives)."""

    height: int
    width: int
    fps: float
    root: Any = None  # directory of the graph file: relative weight paths resolve against it
    seed: int = 0


_session = threading.local()


def should_stop() -> bool:
    """True once the running session was asked to stop; long nodes poll it between chunks of work."""
    evt = getattr(_session, "stop_event", None)
    return bool(evt is not None and evt.is_set())


class Node:
    """Base class of every node type.

    Subclasses set `type_name`, `description`, `Params`, `inputs` and `outputs` (or override `ports()` to
    specialise shapes from params), and implement `forward`. Heavy work (weights) goes in `load`; state that
    lives across blocks (KV caches) is allocated in `load` at fixed addresses and cleared in `reset`.
    """

    type_name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    inputs: ClassVar[dict[str, Port]] = {}
    outputs: ClassVar[dict[str, Port]] = {}
    # Runs every block even when all its inputs are slots (noise, stateful generators).
    every_block: ClassVar[bool] = False
    # The node whose outputs are the stream (emit); exactly one per graph.
    is_output: ClassVar[bool] = False
    # False: never inside a captured CUDA graph (it runs just before it, on the host's schedule).
    capturable: ClassVar[bool] = True

    def __init__(self, name: str, params: BaseModel, graph: GraphInfo):
        self.name = name
        self.params = params
        self.graph = graph
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.phase = 0

    # -- declaration ----------------------------------------------------------------------------
    def ports(self) -> tuple[dict[str, Port], dict[str, Port]]:
        return dict(self.inputs), dict(self.outputs)

    def num_phases(self) -> int:
        """How many distinct static shapes of work this node has (a filling KV cache); bounded."""
        return 1

    def phase_for_block(self, block: int) -> int:
        """Which phase block `block` of a session runs in. Host-side arithmetic only."""
        return 0

    def phase_on_change(self, phase: int, changed: frozenset[str]) -> int:
        """The phase to run instead of `phase` in a block where the inputs `changed` (names) got new values
        (e.g. a KV cache re-encoding its window under a new prompt). Must stay below num_phases()."""
        return phase

    def max_blocks(self) -> int | None:
        """A finite node (a clip source) returns its length; the loop wraps after it."""
        return None

    # -- life cycle ---------------------------------------------------------------------------------
    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def reset(self) -> None:
        """Back to the state a new session starts from."""

    def check_input(self, port: str, value: Any) -> str | None:
        """A command is about to write `value` into the slot that feeds `port`: a node that knows what it can
        use returns a warning for the sender (the command still applies) or raises ValueError to refuse it
        (nothing changes). Called at submit time, on the sender's thread; must not touch node state."""
        return None

    def understands(self) -> dict | None:
        """What this node can make sense of, for people (`show`, the page): e.g. {"vocabulary": [...],
        "examples": [...]}; None when it does not say."""
        return None

    def forward(self, **inputs) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, **host_inputs) -> None:
        """Optional host half of a node with non-tensor inputs (a seed). A node that overrides it gets those
        inputs here, every block, just before its forward, and forward gets only the tensor inputs; so its
        forward can be captured in a CUDA graph. A node that does not gets everything in forward and runs
        outside the captured graph."""
        raise NotImplementedError

    @classmethod
    def splits_host_inputs(cls) -> bool:
        return cls.prepare is not Node.prepare

    def compile_regions(self, compile: Callable[[Callable], Callable]) -> None:
        """Compiled modes call this once, before warm-up, with the engine's compile function (the one place
        torch.compile is applied; it counts into `region_compiles`). A node built of repeated layers compiles
        its repeated pieces here, once for all layers, and keeps the engine's trace out of them (regional
        compilation); by default the engine traces the node with the rest of the hot path."""

    region_compiles: int = 0  # compilations of this node's regions, counted by the engine

    def swap_in_place(self, new: Node) -> bool:
        """Take `new`'s place by rewriting this node's own state (a LoRA on the same weights): True if done, and
        then nothing is rewired or recaptured. By default a swap replaces the node."""
        return False

    @property
    def swapped_in_place(self) -> bool:
        """True while this node holds a replacement taken in place (the session's end undoes it)."""
        return False

    def should_stop(self) -> bool:
        return should_stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Node]] = {}
_builtins_loaded = False


def register(name: str):
    def deco(cls: type[Node]) -> type[Node]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"node type '{name}' registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.type_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from reactor_graph import nodes

    for info in pkgutil.iter_modules(nodes.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"reactor_graph.nodes.{info.name}")


def registry() -> dict[str, type[Node]]:
    _load_builtins()
    return dict(_REGISTRY)


def resolve_type(type_name: str) -> type[Node]:
    """A registered name, or 'package.module:Class' for a node defined outside the package."""
    _load_builtins()
    if type_name in _REGISTRY:
        return _REGISTRY[type_name]
    if ":" in type_name:
        module, _, attr = type_name.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, Node)):
            raise TypeError(f"{type_name} is not a reactor_graph Node subclass")
        return cls
    raise KeyError(type_name)
