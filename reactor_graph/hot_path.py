"""Running nodes: `run_node`, the one way a node is run on its inputs, and the eager hot path built on it.

Every executor (eager, the prologue and captured segment of the compiled modes) and the loop's on-change
nodes run a node through `run_node`, so input gathering, host-input splitting and error naming live here
once.
"""
from __future__ import annotations

from typing import Any

from .errors import NodeError
from .plan import Plan, Source, Wiring


class HotPath:
    """The hot nodes of a plan under one wiring, in order: the eager executor, and what the compiled ones
    read their nodes and bindings from. A swap builds a new one; nothing here changes after construction
    but `current`."""

    def __init__(self, plan: Plan, wiring: Wiring):
        self.plan, self.wiring = plan, wiring
        self.nodes, self.bindings = wiring.nodes, wiring.bindings
        self.order = list(plan.hot)
        self.current: str | None = None  # the node running now, for the watchdog and error messages
        self._host_ports = {n: self._find_host_ports(n) for n in wiring.nodes}
        self.external_sources: list[Source] = self._find_external()

    def _find_host_ports(self, name: str) -> frozenset[str]:
        ins = self.nodes[name].ports()[0]
        return frozenset(p for p in self.bindings[name] if ins[p].kind != "tensor")

    def _find_external(self) -> list[Source]:
        """Inputs of the hot path that come from outside it (slots, on-change node outputs)."""
        srcs: list[Source] = []
        for n in self.order:
            for src in self.bindings[n].values():
                if (src.node is None or src.node not in self.order) and src not in srcs:
                    srcs.append(src)
        return srcs

    def host_ports(self, name: str) -> frozenset[str]:
        """Ports of node `name` that take host values (str/int/... rather than tensors)."""
        return self._host_ports[name]

    def prepare_host(self, name: str, values: dict[Source, Any]) -> None:
        """Hand a splitting node its host inputs (outside any captured graph)."""
        node = self.nodes[name]
        if node.splits_host_inputs():
            binds = self.bindings[name]
            node.prepare(**{p: values[binds[p]] for p in self.host_ports(name)})

    def forward_inputs(self, name: str, values: dict[Source, Any]) -> dict[str, Any]:
        binds = self.bindings[name]
        skip = self.host_ports(name) if self.nodes[name].splits_host_inputs() else frozenset()
        return {p: values[src] for p, src in binds.items() if p not in skip}

    def outputs(self, values: dict[Source, Any]) -> dict[str, Any]:
        out = self.plan.output
        return {port: values[Source(out, port)] for port in self.nodes[out].ports()[1]}

    def __call__(self, external: dict[Source, Any], phases: dict[str, int],
                 versions: dict[Source, int] | None = None) -> dict[str, Any]:
        values: dict[Source, Any] = dict(external)
        for name in self.order:
            run_node(self, name, values, phases.get(name, 0))
        return self.outputs(values)


def run_node(hot: HotPath, name: str, values: dict[Source, Any], phase: int = 0, traced: bool = False) -> None:
    """Run node `name` on its inputs taken from `values`; its outputs are added to `values`.

    `traced`: inside a compiled/captured segment, where host inputs were handed over beforehand and an error
    is the segment's (it is named there); otherwise a failure raises NodeError naming the node."""
    node = hot.nodes[name]
    node.phase = phase
    if traced:
        outs = node.forward(**hot.forward_inputs(name, values))
    else:
        hot.current = name
        try:
            hot.prepare_host(name, values)
            outs = node.forward(**hot.forward_inputs(name, values))
        except NodeError:
            raise
        except Exception as exc:
            raise NodeError(name, node.type_name, "forward", exc) from exc
        finally:
            hot.current = None
    for port, value in outs.items():
        values[Source(name, port)] = value
