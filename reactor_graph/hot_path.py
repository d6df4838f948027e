"""Running nodes: `run_node`, the one way a node is run on its inputs, and the eager hot path built on it.

Every executor (eager, the prologue and captured segment of the compiled modes) and the loop's on-change
nodes run a node through `run_node`, so input gathering, host-input splitting and error naming live here
once.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from .errors import NodeError
from .untraced import not_traced
from .plan import Plan, Source, Wiring


class Probe:
    """Timing marks at node boundaries, taken by `run_node` (the one place), in every mode.

    A mark is (name, kind, edge, host perf_counter, CUDA event or None). On a GPU the event is recorded on the
    current stream with `external=True`, so inside a CUDA graph capture it becomes an event-record node of the
    graph and is re-recorded by every replay (the compiled executor keeps a capture's marks in its Capture and
    hands them back here at replay: `replayed`). On the CPU the host clock is exact (work is synchronous).
    `mark` is excluded from torch.compile: under compile it is a graph break, so the compiled hot path is split
    at node boundaries and each piece is timed. That changes the compiled code (no fusion across nodes), which
    is why a probe is opt-in and bench reports the un-probed block next to the probed one.

    kinds: block (a whole block), on_change, hot_path, node (a hot node), copy (to the host)."""

    def __init__(self, device: torch.device, keep: int | None = None):
        """`keep`: hold only the last `keep` blocks (and their commands), for a probe left on in a server."""
        self.cuda = device.type == "cuda"
        self.keep = keep
        self.marks: list[tuple] = []  # of the block now running
        self.blocks: list[dict] = []  # resolved blocks: {"index", "host_t0", "spans": [...]}, see resolve
        self._pending: list[tuple[int, list[tuple]]] = []
        self.commands: list[dict] = []  # each command applied: name, params, block, submitted, applied (host s)

    @not_traced
    def mark(self, name: str, kind: str, edge: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True, external=True)
            event.record()
        self.marks.append((name, kind, edge, time.perf_counter(), event))

    def applied(self, block: int, pending: list, at: float) -> None:
        """Commands applied at the boundary of `block` (arrival -> application; the block's frames show them)."""
        now = time.perf_counter()
        for p in pending:
            name = p.command.name if p.command is not None else ("swap" if p.action is not None else "reset")
            params = p.params.model_dump() if p.params is not None else {}
            self.commands.append({"name": name, "params": params, "block": block, "submitted": p.submitted,
                                  "applied": now, "boundary": at})

    def take(self) -> list[tuple]:
        marks, self.marks = self.marks, []
        return marks

    def replayed(self, marks: list[tuple]) -> None:
        """The marks a CUDA graph recorded at capture ran again now (their host times are this replay's)."""
        now = time.perf_counter()
        self.marks.extend((n, k, e, now, ev, "replayed") for n, k, e, _, ev in marks)

    def end_block(self, index: int) -> None:
        marks = self.take()
        self._pending.append((index, marks))
        if any(len(m) > 5 for m in marks) or len(self._pending) >= 64:  # replayed events are re-recorded by
            self.resolve()                                                 # the next replay: read them now

    def resolve(self) -> list[dict]:
        """Spans of every finished block: (name, kind, device start ms, device ms, host start s, host s),
        device times relative to the block's first mark (on the CPU the host clock stands for both)."""
        for index, marks in self._pending:
            if self.cuda and marks:
                marks[-1][4].synchronize()
            t0_host, ev0 = marks[0][3], marks[0][4]
            open_: dict[tuple[str, str], tuple] = {}
            spans = []
            for m in marks:
                name, kind, edge, host, ev = m[:5]
                if edge == "start":
                    open_[(name, kind)] = m
                    continue
                s = open_.pop((name, kind), None)
                if s is None:
                    continue
                if self.cuda:
                    dev0, dev = ev0.elapsed_time(s[4]), s[4].elapsed_time(ev)
                else:
                    dev0, dev = (s[3] - t0_host) * 1000, (host - s[3]) * 1000
                spans.append((name, kind, dev0, dev, s[3], host - s[3]))
            self.blocks.append({"index": index, "host_t0": t0_host, "spans": spans})
        self._pending.clear()
        if self.keep is not None and len(self.blocks) > self.keep:
            del self.blocks[:-self.keep]
            since = self.blocks[0]["host_t0"]
            self.commands = [c for c in self.commands if c["applied"] >= since]
        return self.blocks


class HotPath:
    """The hot nodes of a plan under one wiring, in order: the eager executor, and what the compiled ones
    read their nodes and bindings from. A swap builds a new one; nothing here changes after construction
    but `current`."""

    def __init__(self, plan: Plan, wiring: Wiring):
        self.plan, self.wiring = plan, wiring
        self.nodes, self.bindings = wiring.nodes, wiring.bindings
        self.order = list(plan.hot)
        self.current: str | None = None  # the node running now, for the watchdog and error messages
        self.probe: Probe | None = None  # timing marks at node boundaries (bench, --trace)
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
            run_node(self, name, values, phases.get(name, 0), probe=self.probe)
        return self.outputs(values)


def run_node(hot: HotPath, name: str, values: dict[Source, Any], phase: int = 0, traced: bool = False,
             probe: Probe | None = None, kind: str = "node") -> None:
    """Run node `name` on its inputs taken from `values`; its outputs are added to `values`.

    `traced`: inside a compiled/captured segment, where host inputs were handed over beforehand and an error
    is the segment's (it is named there); otherwise a failure raises NodeError naming the node.
    `probe`: marks the node's start and end (`kind`: node | on_change), the one place nodes are timed."""
    node = hot.nodes[name]
    node.phase = phase
    if probe is not None:
        probe.mark(name, kind, "start")
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
    if probe is not None:
        probe.mark(name, kind, "end")
    for port, value in outs.items():
        values[Source(name, port)] = value
