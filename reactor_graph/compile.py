"""Executors of the hot path: the per-block function over the graph's hot nodes.

`eager` runs node.forward in topological order and is the reference. The compiled modes (compile,
cudagraph) wrap the same function; see `make_executor`.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .errors import NodeError
from .node import Node
from .plan import Plan, Source

MODES = ("eager", "compile", "cudagraph")


class HotPath:
    """Runs the hot nodes in order. `external` holds slot values and on-change outputs by Source."""

    def __init__(self, plan: Plan, nodes: dict[str, Node]):
        self.plan, self.nodes = plan, nodes
        self.order = list(plan.hot)
        self.current: str | None = None  # the node running now, for watchdog and error messages
        self.timer: Callable[[str, float], None] | None = None  # bench's per-node hook

    def external_sources(self) -> list[Source]:
        """Inputs of the hot path that come from outside it (slots, on-change node outputs)."""
        srcs = []
        for n in self.order:
            for src in self.plan.bindings[n].values():
                if (src.node is None or src.node not in self.order) and src not in srcs:
                    srcs.append(src)
        return srcs

    def __call__(self, external: dict[Source, Any], phases: dict[str, int]) -> dict[str, Any]:
        values: dict[Source, Any] = dict(external)
        for name in self.order:
            node = self.nodes[name]
            node.phase = phases.get(name, 0)
            inputs = {port: values[src] for port, src in self.plan.bindings[name].items()}
            self.current = name
            t0 = time.perf_counter() if self.timer else 0.0
            try:
                outs = node.forward(**inputs)
            except NodeError:
                raise
            except Exception as exc:
                raise NodeError(name, node.type_name, "forward", exc) from exc
            if self.timer:
                self.timer(name, time.perf_counter() - t0)
            for port, value in outs.items():
                values[Source(name, port)] = value
        self.current = None
        return {port: values[Source(self.plan.output, port)] for port in self.nodes[self.plan.output].ports()[1]}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import ReactorGraphError

        raise ReactorGraphError(f"device '{requested}' was asked for but CUDA is not available here; "
                                f"use --device cpu (or device: auto in the graph)")
    return dev


def resolve_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    if requested is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, requested)


def make_executor(engine, progress=None):
    """The per-block callable for the engine's mode. Eager is the hot path itself."""
    return engine.hot
