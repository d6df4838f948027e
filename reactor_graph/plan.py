"""From a validated spec to a plan: node instances, checked edges, the on-change / hot-path partition.

Every rule of the graph file that needs node types (ports, shapes, cycles, commands against slots, swaps)
is checked here, and all problems found are reported together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import networkx as nx
from pydantic import ValidationError

from .errors import GraphError, Issue
from .node import GraphInfo, Node, Port, registry, resolve_type
from .slots import RESET, Command, slot_value
from .spec import SLOT_REF, LoadedSpec, NodeSpec, SlotSpec, load_spec, near, pydantic_issues

_KIND_OF_SLOT = {"str": "str", "int": "int", "float": "float", "bool": "bool", "tensor": "tensor",
                 "video": "tensor", "image": "tensor"}


@dataclass(frozen=True)
class Source:
    """Where an input comes from: a slot, or a node's output."""

    node: str | None  # None for a slot
    name: str  # slot name, or the node's output port

    def __str__(self) -> str:
        return f"$slots.{self.name}" if self.node is None else f"{self.node}.{self.name}"


@dataclass(frozen=True)
class Wiring:
    """Which node runs under each name, and what feeds each of its inputs. The plan's wiring is the graph as
    declared; a swap makes a new one for the session (`swapped`), so the plan never changes after load."""

    nodes: Mapping[str, Node]
    bindings: Mapping[str, Mapping[str, Source]]

    def swapped(self, target: str, node: Node, binds: Mapping[str, Source]) -> Wiring:
        return Wiring(MappingProxyType({**self.nodes, target: node}),
                      MappingProxyType({**self.bindings, target: MappingProxyType(dict(binds))}))


@dataclass(frozen=True)
class Plan:
    """The validated graph: immutable after load (mappings are read-only views)."""

    spec: LoadedSpec
    info: GraphInfo
    nodes: Mapping[str, Node]
    bindings: Mapping[str, Mapping[str, Source]]
    graph: nx.DiGraph
    on_change: tuple[str, ...]
    hot: tuple[str, ...]
    output: str
    commands: Mapping[str, Command]
    alternatives: Mapping[str, Node] = field(default_factory=dict)
    alt_bindings: Mapping[str, Mapping[str, Source]] = field(default_factory=dict)

    @cached_property
    def wiring(self) -> Wiring:
        """One object, so `engine.wiring is plan.wiring` tells a session that swapped nothing."""
        return Wiring(self.nodes, self.bindings)

    @property
    def name(self) -> str:
        return self.spec.spec.name

    @property
    def slots(self) -> dict[str, SlotSpec]:
        return self.spec.spec.slots

    def describe(self) -> dict[str, Any]:
        """The plan as data, for `show` and for clients."""

        def node_row(name: str, node: Node, binds: dict[str, Source]) -> dict:
            ins, outs = node.ports()
            return {
                "name": name,
                "type": node.type_name,
                "inputs": {p: {"from": str(binds.get(p, "-")), "port": ins[p].describe()} for p in ins},
                "outputs": {p: outs[p].describe() for p in outs},
                "phases": node.num_phases(),
            }

        return {
            "name": self.name,
            "fps": self.spec.spec.fps,
            "size": list(self.spec.spec.size),
            "on_change": [node_row(n, self.nodes[n], self.bindings[n]) for n in self.on_change],
            "hot": [node_row(n, self.nodes[n], self.bindings[n]) for n in self.hot],
            "output": self.output,
            "alternatives": [node_row(n, a, self.alt_bindings[n]) for n, a in self.alternatives.items()],
            "understands": {n: u for n, node in self.nodes.items() if (u := node.understands())},
            "slots": {k: v.model_dump(exclude_none=True) for k, v in self.slots.items()},
            "commands": [c.schema() for c in self.commands.values()],
        }


def _shape_issue(out_port: Port, in_port: Port, binds: dict[str, Any], producer: str) -> str | None:
    """Why an output cannot feed an input, or None. Symbols in the input unify per consuming node."""
    if in_port.kind != "any" and out_port.kind != in_port.kind:
        return f"kind mismatch: {producer} gives {out_port.describe()}, this input takes {in_port.describe()}"
    if in_port.kind != "tensor":
        return None
    if in_port.dtype and out_port.dtype and in_port.dtype != out_port.dtype:
        return f"dtype mismatch: {producer} gives {out_port.dtype}, this input takes {in_port.dtype}"
    if in_port.shape is None or out_port.shape is None:
        return None
    if len(in_port.shape) != len(out_port.shape):
        return (f"shape mismatch: {producer} gives {out_port.describe()} (rank {len(out_port.shape)}), "
                f"this input takes {in_port.describe()} (rank {len(in_port.shape)})")
    for i, (d_in, d_out) in enumerate(zip(in_port.shape, out_port.shape)):
        src = d_out if isinstance(d_out, int) else f"{producer}:{d_out}"
        if isinstance(d_in, int):
            if isinstance(d_out, int) and d_in != d_out:
                return (f"shape mismatch at dim {i}: {producer} gives {out_port.describe()}, "
                        f"this input takes {in_port.describe()}")
            continue
        if d_in in binds and binds[d_in] != src and isinstance(binds[d_in], int) and isinstance(src, int):
            return (f"shape mismatch at dim {i}: '{d_in}' is {binds[d_in]} on another input but "
                    f"{src} from {producer}")
        binds.setdefault(d_in, src)
    return None


def _slot_port(spec: SlotSpec) -> Port:
    shape = tuple(spec.shape) if spec.shape is not None else None
    if spec.type in ("video", "image"):  # inputs.py
        from .inputs import slot_shape

        shape = slot_shape(spec)
    return Port(_KIND_OF_SLOT[spec.type], "float" if _KIND_OF_SLOT[spec.type] == "tensor" else None, shape)


def instantiate(ls: LoadedSpec, section: str, name: str, ns: NodeSpec, info: GraphInfo,
                issues: list[Issue]) -> Node | None:
    """The node a spec describes, or None with what is wrong appended to `issues`."""
    types = registry()
    try:
        cls = resolve_type(ns.type)
    except KeyError:
        issues.append(ls.issue((section, name, "type"), f"unknown node type '{ns.type}'{near(ns.type, types)}; "
                                                        f"known types: {', '.join(sorted(types))}"))
        return None
    except (ImportError, AttributeError, TypeError) as exc:
        issues.append(ls.issue((section, name, "type"), f"cannot load node type '{ns.type}': {exc}"))
        return None
    try:
        params = cls.Params.model_validate(ns.params)
    except ValidationError as err:
        issues.extend(pydantic_issues(err, ls.pos, (section, name, "params")))
        return None
    weights = getattr(params, "weights", None)
    if isinstance(weights, str) and weights != "random":  # checked here, so `validate` says so, not `render`
        from .weights import resolve

        path = resolve(weights, ls.root)
        if not path.exists():
            issues.append(ls.issue((section, name, "params", "weights"),
                                   f"weights file {path} does not exist (weights are read from local files only; "
                                   f"fix the path, or use weights: random / --random-weights)"))
            return None
    try:
        return cls(name, params, info)
    except (ValueError, TypeError) as exc:
        issues.append(ls.issue((section, name, "params"), f"{ns.type}: {exc}"))
        return None


def bind(ls: LoadedSpec, section: str, name: str, node: Node, ns: NodeSpec, nodes: Mapping[str, Node],
         issues: list[Issue]) -> dict[str, Source]:
    """Each input port of `node` -> its Source; what does not fit is appended to `issues`."""
    ins, _ = node.ports()
    binds: dict[str, Source] = {}
    symbols: dict[str, Any] = {}
    for port, ref in ns.in_.items():
        path = (section, name, "in", port)
        if port not in ins:
            issues.append(ls.issue(path, f"node '{name}' ({ns.type}) has no input '{port}'{near(port, ins)}; "
                                         f"its inputs: {', '.join(ins) or 'none'}"))
            continue
        if not isinstance(ref, str):
            issues.append(ls.issue(path, f"an input is bound to '$slots.NAME' or 'node.output', got {ref!r}"))
            continue
        if ref.startswith(SLOT_REF):
            slot = ref[len(SLOT_REF):]
            if slot not in ls.spec.slots:
                issues.append(ls.issue(path, f"no slot '{slot}'{near(slot, ls.spec.slots)}; "
                                             f"declared slots: {', '.join(ls.spec.slots) or 'none'}"))
                continue
            why = _shape_issue(_slot_port(ls.spec.slots[slot]), ins[port], symbols, f"slot '{slot}'")
            if why:
                issues.append(ls.issue(path, why))
            binds[port] = Source(None, slot)
            continue
        src, dot, out = ref.partition(".")
        if dot and src in ls.spec.nodes and src not in nodes:
            continue  # that node's own problem is reported already; don't echo it here
        if not dot or src not in nodes:
            choices = list(nodes)
            issues.append(ls.issue(path, f"'{ref}' is not '$slots.NAME' or 'node.output' with a known node"
                                         f"{near(src, choices)}; nodes: {', '.join(choices)}"))
            continue
        src_outs = nodes[src].ports()[1]
        if out not in src_outs:
            issues.append(ls.issue(path, f"node '{src}' has no output '{out}'{near(out, src_outs)}; "
                                         f"its outputs: {', '.join(src_outs) or 'none'}"))
            continue
        why = _shape_issue(src_outs[out], ins[port], symbols, f"'{src}.{out}'")
        if why:
            issues.append(ls.issue(path, why))
        binds[port] = Source(src, out)
    for port, p in ins.items():
        if port not in ns.in_ and not p.optional:
            issues.append(ls.issue((section, name, "in"), f"input '{port}' of node '{name}' ({ns.type}) is not "
                                                          f"bound; bind it to '$slots.NAME' or 'node.output'"))
    return binds


def outputs_mismatch(old: Node, new: Node) -> str | None:
    """Why `new` cannot stand in for `old` (names, kinds, dtypes, shapes of outputs), or None."""
    o_old, o_new = old.ports()[1], new.ports()[1]
    missing = [k for k in o_old if k not in o_new]
    if missing:
        return f"'{new.name}' lacks output(s) {', '.join(missing)} that '{old.name}' produces"
    for k, p in o_old.items():
        q = o_new[k]
        if (p.kind, p.dtype, p.shape) != (q.kind, q.dtype, q.shape):
            return f"output '{k}' differs: '{old.name}' gives {p.describe()}, '{new.name}' gives {q.describe()}"
    return None


def _check_commands(ls: LoadedSpec, nodes: dict[str, Node], alts: dict[str, Node], issues: list[Issue]):
    spec = ls.spec
    commands: dict[str, Command] = {}
    for cname, cs in spec.commands.items():
        base = ("commands", cname)
        if cname == RESET:
            issues.append(ls.issue(base, "'reset' is built in (it restarts the session); choose another name"))
            continue
        for slot, value in cs.set.items():
            path = base + ("set", slot)
            if slot not in spec.slots:
                issues.append(ls.issue(path, f"writes slot '{slot}' which does not exist{near(slot, spec.slots)}; "
                                             f"declared slots: {', '.join(spec.slots) or 'none'}"))
                continue
            sspec = spec.slots[slot]
            if isinstance(value, str) and value.startswith("$"):
                pname = value[1:]
                if pname not in cs.params:
                    issues.append(ls.issue(path, f"'{value}' names no parameter of '{cname}'"
                                                 f"{near(pname, cs.params)}; params: {', '.join(cs.params) or 'none'}"))
                    continue
                pspec = cs.params[pname]
                if pname in cs.map:
                    if pspec.enum is None:
                        issues.append(ls.issue(base + ("params", pname), "a mapped parameter needs 'enum'"))
                        continue
                    for choice in pspec.enum:
                        if str(choice) not in cs.map[pname]:
                            issues.append(ls.issue(base + ("map", pname), f"no value for choice '{choice}'"))
                        else:
                            try:
                                slot_value(sspec, cs.map[pname][str(choice)])
                            except (ValueError, TypeError, RuntimeError) as exc:
                                issues.append(ls.issue(base + ("map", pname, str(choice)), f"slot '{slot}': {exc}"))
                    continue
                ok = pspec.type == sspec.type or (pspec.type == "int" and sspec.type == "float") \
                    or (pspec.type == "image" and sspec.type == "video")  # a still while no camera is live
                if not ok:
                    issues.append(ls.issue(path, f"slot '{slot}' holds {sspec.type} but parameter '{pname}' is "
                                                 f"{pspec.type}; use a {sspec.type} parameter or a 'map'"))
            else:
                try:
                    slot_value(sspec, value)
                except (ValueError, TypeError, RuntimeError) as exc:
                    issues.append(ls.issue(path, f"slot '{slot}': {exc}"))
        for pname in cs.map:
            if pname not in cs.params:
                issues.append(ls.issue(base + ("map", pname), f"maps '{pname}', which is not a parameter"))
        for target, alt in cs.swap.items():
            path = base + ("swap", target)
            if target not in nodes:
                issues.append(ls.issue(path, f"swaps node '{target}' which does not exist{near(target, nodes)}"))
            elif alt != target and alt not in spec.alternatives:  # swapping a node for itself restores it
                issues.append(ls.issue(path, f"'{alt}' is not declared under 'alternatives'"
                                             f"{near(alt, spec.alternatives)}"))
            elif alt in alts and alt != target:
                why = outputs_mismatch(nodes[target], alts[alt])
                if why:
                    issues.append(ls.issue(path, f"cannot swap: {why}"))
        commands[cname] = Command.build(cname, cs)
    return commands


def build_plan(ls: LoadedSpec) -> Plan:
    spec = ls.spec
    h, w = spec.size
    info = GraphInfo(height=h, width=w, fps=spec.fps, root=ls.root, seed=spec.seed)
    issues: list[Issue] = []

    for slot, ss in spec.slots.items():
        if ss.default is not None:
            try:
                slot_value(ss, ss.default)
            except (ValueError, TypeError, RuntimeError) as exc:
                issues.append(ls.issue(("slots", slot, "default"), str(exc)))
        elif ss.type != "tensor":
            issues.append(ls.issue(("slots", slot), "needs a 'default' (the value a session starts with)"))

    nodes: dict[str, Node] = {}
    for name, ns in spec.nodes.items():
        node = instantiate(ls, "nodes", name, ns, info, issues)
        if node is not None:
            nodes[name] = node
    alts: dict[str, Node] = {}
    for name, ns in spec.alternatives.items():
        if name in spec.nodes:
            issues.append(ls.issue(("alternatives", name), f"'{name}' is already a node name; pick another"))
            continue
        node = instantiate(ls, "alternatives", name, ns, info, issues)
        if node is not None:
            alts[name] = node

    bindings = {n: bind(ls, "nodes", n, nodes[n], spec.nodes[n], nodes, issues) for n in nodes}
    alt_bindings = {n: bind(ls, "alternatives", n, alts[n], spec.alternatives[n], nodes, issues) for n in alts}

    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    for n, binds in bindings.items():
        for port, src in binds.items():
            if src.node is not None:
                g.add_edge(src.node, n, port=port, out=src.name)
    cycles = list(nx.simple_cycles(g))
    for cyc in cycles:
        issues.append(ls.issue(("nodes", cyc[0]), "cycle: " + " -> ".join(cyc + [cyc[0]]) +
                               "; a graph must flow one way (state across blocks lives inside a node)"))

    outputs = [n for n, node in nodes.items() if node.is_output]
    if len(outputs) != 1:
        where = ", ".join(outputs) if outputs else "none"
        issues.append(ls.issue(("nodes",), f"a graph needs exactly one output node (type 'emit'); found {where}"))

    commands = _check_commands(ls, nodes, alts, issues)
    if issues:
        raise GraphError(issues, ls.file)

    order = list(nx.topological_sort(g))
    on_change: list[str] = []
    for n in order:
        node = nodes[n]
        srcs = bindings[n].values()
        if not node.every_block and not node.is_output and all(s.node is None or s.node in on_change for s in srcs):
            on_change.append(n)
    hot = [n for n in order if n not in on_change]
    ro = MappingProxyType
    return Plan(ls, info, ro(nodes), ro({n: ro(b) for n, b in bindings.items()}), g, tuple(on_change), tuple(hot),
                outputs[0], ro(commands), ro(alts), ro({n: ro(b) for n, b in alt_bindings.items()}))


def load_plan(path: str | Path) -> Plan:
    return build_plan(load_spec(path))
