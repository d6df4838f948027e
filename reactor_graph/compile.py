"""Executors of the hot path: the per-block function over the graph's hot nodes.

`eager` runs node.forward in topological order and is the reference. The compiled modes split the hot
path into a *prologue* (nodes that take host values, such as the noise node's seed; run eagerly) and a
*captured segment* (everything else, over static input buffers):

  compile    the segment is torch.compile'd, one compiled function per phase key
  cudagraph  the compiled segment is captured into one CUDA graph per phase key and replayed

Capture is an explicit life cycle per phase key: warm-up (compiles, settles allocations) -> capture ->
replay. Before each replay the external inputs are checked against what was captured and copied into
the static buffers, so a new prompt is a copy, never a recompile or a recapture.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

import logging

from .errors import CaptureError, NodeError
from .node import Node
from .plan import Plan, Source

MODES = ("eager", "compile", "cudagraph")
log = logging.getLogger("reactor_graph")


class HotPath:
    """Runs the hot nodes in order. `external` holds slot values and on-change outputs by Source."""

    def __init__(self, plan: Plan, nodes: dict[str, Node]):
        self.plan, self.nodes = plan, nodes
        self.order = list(plan.hot)
        self.current: str | None = None  # the node running now, for watchdog and error messages
        self._external: list[Source] | None = None  # computed once; a swap clears it
        self._host_ports: dict[tuple, set[str]] = {}

    def host_ports(self, name: str) -> set[str]:
        """Ports of node `name` that take host values (str/int/... rather than tensors)."""
        node = self.nodes[name]
        key = (name, id(node))
        if key not in self._host_ports:
            ins = node.ports()[0]
            self._host_ports[key] = {p for p in self.plan.bindings[name] if ins[p].kind != "tensor"}
        return self._host_ports[key]

    def prepare_host(self, name: str, values: dict[Source, Any]) -> None:
        """Hand a splitting node its host inputs (outside any captured graph)."""
        node = self.nodes[name]
        if node.splits_host_inputs():
            binds = self.plan.bindings[name]
            node.prepare(**{p: values[binds[p]] for p in self.host_ports(name)})

    def forward_inputs(self, name: str, values: dict[Source, Any]) -> dict[str, Any]:
        binds = self.plan.bindings[name]
        skip = self.host_ports(name) if self.nodes[name].splits_host_inputs() else set()
        return {p: values[src] for p, src in binds.items() if p not in skip}

    def external_sources(self) -> list[Source]:
        """Inputs of the hot path that come from outside it (slots, on-change node outputs)."""
        if self._external is not None:
            return self._external
        srcs = []
        for n in self.order:
            for src in self.plan.bindings[n].values():
                if (src.node is None or src.node not in self.order) and src not in srcs:
                    srcs.append(src)
        self._external = srcs
        return srcs

    def __call__(self, external: dict[Source, Any], phases: dict[str, int],
                 versions: dict[Source, int] | None = None) -> dict[str, Any]:
        values: dict[Source, Any] = dict(external)
        for name in self.order:
            node = self.nodes[name]
            node.phase = phases.get(name, 0)
            self.current = name
            try:
                self.prepare_host(name, values)
                outs = node.forward(**self.forward_inputs(name, values))
            except NodeError:
                raise
            except Exception as exc:
                raise NodeError(name, node.type_name, "forward", exc) from exc
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


class Segment:
    """The capturable part of the hot path as one function of static inputs, for one phase key."""

    def __init__(self, hot: HotPath, names: list[str], phases: dict[str, int]):
        self.hot, self.names, self.phases = hot, names, dict(phases)

    def __call__(self, inputs: dict[Source, Any]) -> dict[Source, Any]:
        values = dict(inputs)
        for name in self.names:
            node = self.hot.nodes[name]
            node.phase = self.phases.get(name, 0)
            outs = node.forward(**self.hot.forward_inputs(name, values))
            for port, value in outs.items():
                values[Source(name, port)] = value
        return {k: v for k, v in values.items() if k.node in self.names}


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}"


class CompiledHotPath:
    """compile / cudagraph executor. State per phase key: warm -> captured -> replayed."""

    WARMUP = 2

    def __init__(self, hot: HotPath, mode: str, device: torch.device, backend: str = "inductor"):
        self.hot, self.mode, self.device, self.backend = hot, mode, device, backend
        plan = hot.plan
        # Prologue: hot nodes that need host values; they must depend only on external inputs.
        self.prologue: list[str] = []
        for name in hot.order:
            node = hot.nodes[name]
            host_inputs = bool(hot.host_ports(name)) and not node.splits_host_inputs()
            if not node.capturable or host_inputs:
                upstream = [s.node for s in plan.bindings[name].values() if s.node in hot.order]
                if any(u not in self.prologue for u in upstream):
                    raise CaptureError(f"node '{name}' cannot be captured (it takes host values) and depends on "
                                       f"captured nodes {upstream}; run this graph with compile: eager")
                self.prologue.append(name)
        self.captured = [n for n in hot.order if n not in self.prologue]
        self.states: dict[tuple, str] = {}  # phase key -> "warm" | "captured"
        self.fns: dict[tuple, Callable] = {}
        self.graphs: dict[tuple, Any] = {}
        self.static_in: dict[tuple, dict[Source, torch.Tensor]] = {}
        self.static_out: dict[tuple, dict[Source, Any]] = {}
        self.copied: dict[tuple, dict[Source, int | None]] = {}  # version last copied into each static input
        self.compiles: dict[tuple, int] = {}  # backend invocations per key; >1 after warm-up = recompile
        self.recompiles = 0
        self.replays = 0
        self.times: dict[str, float] = {"compile_s": 0.0, "capture_s": 0.0}
        self.pool = torch.cuda.graph_pool_handle() if mode == "cudagraph" else None

    # -- the one place torch.compile is applied -------------------------------------------------------
    def _compile(self, key: tuple, seg: Segment) -> Callable:
        if self.backend == "none":
            return seg
        from torch._dynamo.backends.registry import lookup_backend

        inner = lookup_backend(self.backend)

        def counting_backend(gm, example_inputs):
            self.compiles[key] = self.compiles.get(key, 0) + 1
            if self.states.get(key) is not None:  # past warm-up: this is a recompile
                self.recompiles += 1
                log.warning("recompile of the hot path in phase %s (graph %d); inputs changed shape or type",
                            key, self.compiles[key])
            return inner(gm, example_inputs)

        return torch.compile(seg, backend=counting_backend, dynamic=False)

    def _key(self, phases: dict[str, int]) -> tuple:
        return tuple(phases.get(n, 0) for n in self.captured)

    def _run_prologue(self, external: dict[Source, Any], phases: dict[str, int]) -> dict[Source, Any]:
        values = dict(external)
        for name in self.prologue:
            node = self.hot.nodes[name]
            node.phase = phases.get(name, 0)
            try:
                self.hot.prepare_host(name, values)
                outs = node.forward(**self.hot.forward_inputs(name, values))
            except Exception as exc:
                raise NodeError(name, node.type_name, "forward", exc) from exc
            for port, value in outs.items():
                values[Source(name, port)] = value
        return values

    def _segment_inputs(self, values: dict[Source, Any]) -> dict[Source, Any]:
        """The tensors the captured part reads from outside it (host values go to prepare())."""
        needed = set()
        for n in self.captured:
            for port, src in self.hot.plan.bindings[n].items():
                if src.node not in self.captured and port not in self.hot.host_ports(n):
                    needed.add(src)
        return {s: values[s] for s in needed}

    def _prepare_captured(self, values: dict[Source, Any]) -> None:
        for name in self.captured:
            self.hot.prepare_host(name, values)

    def prepare(self, key: tuple, phases: dict[str, int], inputs: dict[Source, Any]) -> None:
        """Warm-up, then (cudagraph) capture for one phase key. Leaves node state dirty: reset after."""
        seg = Segment(self.hot, self.captured, phases)
        t0 = time.perf_counter()
        fn = self.fns.get(key) or self._compile(key, seg)
        self.fns[key] = fn
        if self.mode == "compile":
            fn(inputs)  # first call compiles
            self.times["compile_s"] += time.perf_counter() - t0
            self.states[key] = "warm"
            return
        # Prologue outputs that live in fixed buffers (noise) are used in place: no copy per block.
        static = {s: v if s.node in self.prologue or not isinstance(v, torch.Tensor) else v.clone()
                  for s, v in inputs.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                fn(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.times["compile_s"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(static)
        torch.cuda.synchronize(self.device)
        self.times["capture_s"] += time.perf_counter() - t1
        self.graphs[key], self.static_in[key], self.static_out[key] = graph, static, out
        self.states[key] = "captured"

    def _check(self, key: tuple, inputs: dict[Source, Any]) -> None:
        for src, want in self.static_in[key].items():
            got = inputs[src]
            same = (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
                    and got.device == want.device) if isinstance(want, torch.Tensor) else got == want
            if not same:
                raise CaptureError(f"replay of phase {key}: input '{src}' was captured as {_describe(want)} "
                                   f"but is now {_describe(got)}; shapes and dtypes must stay fixed")

    def __call__(self, external: dict[Source, Any], phases: dict[str, int],
                 versions: dict[Source, int] | None = None) -> dict[str, Any]:
        values = self._run_prologue(external, phases)
        self._prepare_captured(values)
        inputs = self._segment_inputs(values)
        key = self._key(phases)
        self.hot.current = "(compiled hot path)"
        try:
            if self.mode == "compile":
                if key not in self.states:
                    self.prepare(key, phases, inputs)
                    out = self.fns[key](inputs)
                else:
                    out = self.fns[key](inputs)
            else:
                if key not in self.states:
                    raise CaptureError(f"phase {key} was not captured at start-up (captured: "
                                       f"{sorted(self.graphs)}); a node's phase_for_block exceeds num_phases")
                self._check(key, inputs)
                copied = self.copied.setdefault(key, {})
                for src, buf in self.static_in[key].items():
                    if not isinstance(buf, torch.Tensor) or buf.data_ptr() == inputs[src].data_ptr():
                        continue
                    version = versions.get(src) if versions else None
                    if version is None or copied.get(src) != version:  # a new prompt: copy once per phase
                        buf.copy_(inputs[src], non_blocking=True)
                        copied[src] = version
                self.graphs[key].replay()
                self.replays += 1
                out = self.static_out[key]
        except (CaptureError, NodeError):
            raise
        except Exception as exc:
            raise NodeError("(compiled hot path)", self.mode, "forward", exc) from exc
        finally:
            self.hot.current = None
        values.update(out)
        return {port: values[Source(self.hot.plan.output, port)]
                for port in self.hot.nodes[self.hot.plan.output].ports()[1]}


def phase_keys(engine, horizon: int | None = None) -> list[tuple[int, dict[str, int]]]:
    """(first block, phases) for every distinct phase combination a session goes through, in order."""
    limit = horizon or 1 + max((engine.nodes[n].num_phases() for n in engine.plan.hot), default=1)
    every_input = {n: frozenset(engine.plan.bindings[n]) for n in engine.plan.hot}
    seen, out = set(), []
    for block in range(limit):  # each block as it comes, then as it runs when every input just changed
        for phases in (engine.phases(block), engine.phases(block, every_input)):
            key = tuple(sorted(phases.items()))
            if key not in seen:
                seen.add(key)
                out.append((block, phases))
    return out


def make_executor(engine, progress: Callable[[str], None] | None = None) -> Callable:
    """The per-block callable for the engine's mode; compiled modes are warmed (and captured) here."""
    say = progress or (lambda msg: None)
    mode = engine.mode
    if mode == "cudagraph" and engine.device.type != "cuda":
        log.warning("compile mode 'cudagraph' needs a CUDA GPU; this engine runs on %s, so it falls back to "
                    "'eager'", engine.device)
        engine.mode_note = f"cudagraph needs a CUDA GPU; fell back to eager on {engine.device}"
        engine.mode = mode = "eager"
    if mode == "eager":
        return engine.hot
    if mode not in MODES:
        raise CaptureError(f"unknown compile mode '{mode}'; choose one of {', '.join(MODES)}")
    # Dynamo keeps a bounded number of compiled entries per code object (8 by default) and silently runs
    # the rest uncompiled; a graph has one entry per phase key (and nodes compile regions of their own).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    ex = CompiledHotPath(engine.hot, mode, engine.device, backend=engine.compile_backend)
    # Start-up (or a hot-path swap): real inputs from the current slots, then each phase of a session in
    # the order it occurs. Warm-up runs write node state (KV caches), so nodes are reset afterwards.
    engine.reset_nodes()
    with torch.inference_mode():
        engine.run_on_change()
        for block, phases in phase_keys(engine):
            key = ex._key(phases)
            if key in ex.states:
                continue
            say(f"{'capturing' if mode == 'cudagraph' else 'compiling'} phase {block} of the hot path")
            values = ex._run_prologue(engine.external(), phases)
            ex._prepare_captured(values)
            ex.prepare(key, phases, ex._segment_inputs(values))
    engine.reset_nodes()
    return ex
