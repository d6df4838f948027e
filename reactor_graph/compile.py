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

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import CaptureError, NodeError
from .hot_path import HotPath, Probe, run_node
from .plan import Source
from .untraced import not_traced

MODES = ("eager", "compile", "cudagraph")
log = logging.getLogger("reactor_graph")


def compile_function(fn: Callable, backend: str, counted: Callable[[], None] | None = None) -> Callable:
    """The one place torch.compile is applied: static shapes, and `counted()` at every backend call (a
    compile; one after warm-up is a recompile). Backend "none" returns `fn` itself."""
    if backend == "none":
        return fn
    import torch._dynamo  # here, not at start: an eager start and a quick tier never pay its import
    from torch._dynamo.backends.registry import lookup_backend

    not_traced.apply()
    # Dynamo keeps a bounded number of compiled entries per code object (8 by default) and silently runs
    # the rest uncompiled; a graph has one entry per phase key (and nodes compile regions of their own).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))

    inner = lookup_backend(backend)

    def counting_backend(gm, example_inputs):
        if counted is not None:
            counted()
        return inner(gm, example_inputs)

    return torch.compile(fn, backend=counting_backend, dynamic=False)


@contextlib.contextmanager
def capturing(graph: Any, pool: Any, stream: Any):
    """torch.cuda.graph without its gc.collect() and empty_cache() on entry: a start captures one graph per
    phase key (a tier switch does so while the stream runs), and a full garbage collection of a process that
    imported torch costs tens to hundreds of milliseconds each time."""
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        graph.capture_begin(*(() if pool is None else (pool,)))
        try:
            yield
        finally:
            graph.capture_end()


class Segment:
    """The capturable part of the hot path as one function of static inputs, for one phase key."""

    def __init__(self, hot: HotPath, names: list[str], phases: dict[str, int], probe: Probe | None = None):
        self.hot, self.names, self.phases, self.probe = hot, names, dict(phases), probe

    def __call__(self, inputs: dict[Source, Any]) -> dict[Source, Any]:
        values = dict(inputs)
        for name in self.names:
            run_node(self.hot, name, values, self.phases.get(name, 0), traced=True, probe=self.probe)
        return {k: v for k, v in values.items() if k.node in self.names}


@dataclass
class Capture:
    """One phase key's record: its compiled function and, in cudagraph mode, its graph and static buffers.
    Life cycle: warm (compiled, settled) -> captured (cudagraph) -> replayed."""

    key: tuple
    fn: Callable  # compiled Segment.__call__: fn(segment, inputs); one Dynamo cache for any segment of this key
    segment: Segment | None = None  # over the live nodes: what replays and serving run
    state: str = "new"  # new | warm | captured
    compiles: int = 0  # backend invocations; one more after warm-up is a recompile
    graph: Any = None
    static_in: dict[Source, Any] = field(default_factory=dict)
    static_out: dict[Source, Any] = field(default_factory=dict)
    copied: dict[Source, int | None] = field(default_factory=dict)  # version last copied into each input
    marks: list[tuple] = field(default_factory=list)  # a probe's marks recorded inside the graph (cudagraph)

    def run(self, inputs: dict[Source, Any]) -> dict[Source, Any]:
        return self.fn(self.segment, inputs)


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}"


class CompiledHotPath:
    """compile / cudagraph executor: one Capture record per phase key, built by `warm_up` at start-up."""

    WARMUP = 2

    def __init__(self, hot: HotPath, mode: str, device: torch.device, backend: str = "inductor",
                 probe: Probe | None = None):
        self.hot, self.mode, self.device, self.backend = hot, mode, device, backend
        self.probe = probe  # marks at node boundaries: splits the compiled segment there (see Probe)
        # Prologue: hot nodes that need host values; they must depend only on external inputs.
        self.prologue: list[str] = []
        for name in hot.order:
            node = hot.nodes[name]
            host_inputs = bool(hot.host_ports(name)) and not node.splits_host_inputs()
            if not node.capturable or host_inputs:
                upstream = [s.node for s in hot.bindings[name].values() if s.node in hot.order]
                if any(u not in self.prologue for u in upstream):
                    raise CaptureError(f"node '{name}' cannot be captured (it takes host values) and depends on "
                                       f"captured nodes {upstream}; run this graph with compile: eager")
                self.prologue.append(name)
        self.captured = [n for n in hot.order if n not in self.prologue]
        self.captures: dict[tuple, Capture] = {}
        self.recompiles = 0
        self.replays = 0
        self.times: dict[str, float] = {"compile_s": 0.0, "capture_s": 0.0}
        self.pool = torch.cuda.graph_pool_handle() if mode == "cudagraph" else None
        self.capture_stream = torch.cuda.Stream(device) if mode == "cudagraph" else None
        self._regions: dict[Callable, Callable] = {}
        self.compile_regions()

    # read-only views of the records, per phase key
    @property
    def states(self) -> dict[tuple, str]:
        return {k: c.state for k, c in self.captures.items() if c.state != "new"}

    @property
    def compiles(self) -> dict[tuple, int]:
        return {k: c.compiles for k, c in self.captures.items() if c.compiles}

    @property
    def graphs(self) -> dict[tuple, Any]:
        return {k: c.graph for k, c in self.captures.items() if c.graph is not None}

    def _torch_compile(self, fn: Callable, counted: Callable[[], None]) -> Callable:
        return compile_function(fn, self.backend, counted)

    def _compile(self, record: Capture) -> Callable:
        def counted():
            record.compiles += 1
            if record.state != "new":  # past warm-up: this is a recompile
                self.recompiles += 1
                log.warning("recompile of the hot path in phase %s (graph %d); inputs changed shape or type",
                            record.key, record.compiles)

        return self._torch_compile(Segment.__call__, counted)

    def compile_regions(self, hot: HotPath | None = None) -> None:
        """Each hot node's repeated pieces (Node.compile_regions), through the same compile function. One
        compiled function per region function, whichever node asks (a warm-up copy and the live node share
        its cache: see tiers.py). Uncompiled (backend "none") nodes keep their plain pieces."""
        if self.backend == "none":
            return
        hot = hot or self.hot
        for name in hot.order:
            node = hot.nodes[name]

            def counted(node=node):
                node.region_compiles += 1

            def compile_region(fn, counted=counted):
                if fn not in self._regions:
                    self._regions[fn] = self._torch_compile(fn, counted)
                return self._regions[fn]

            node.compile_regions(compile_region)

    def key_of(self, phases: dict[str, int]) -> tuple:
        return tuple(phases.get(n, 0) for n in self.captured)

    def run_prologue(self, external: dict[Source, Any], phases: dict[str, int]) -> dict[Source, Any]:
        """The uncaptured nodes, eagerly, then every captured node's host inputs: the values of one block."""
        values = dict(external)
        for name in self.prologue:
            run_node(self.hot, name, values, phases.get(name, 0), probe=self.probe)
        for name in self.captured:
            self.hot.prepare_host(name, values)
        return values

    def segment_inputs(self, values: dict[Source, Any]) -> dict[Source, Any]:
        """The tensors the captured part reads from outside it (host values go to prepare())."""
        needed = set()
        for n in self.captured:
            for port, src in self.hot.bindings[n].items():
                if src.node not in self.captured and port not in self.hot.host_ports(n):
                    needed.add(src)
        return {s: values[s] for s in needed}

    def warm_up(self, phase_list: list[tuple[int, dict[str, int]]], external: Callable[[], dict]) -> None:
        """Build the record of every phase key a session goes through, in the order it occurs, on real
        inputs. Leaves node state dirty (KV caches): the caller resets the nodes after."""
        for _, phases in phase_list:
            key = self.key_of(phases)
            if key not in self.captures:
                self.prepare(key, phases, self.segment_inputs(self.run_prologue(external(), phases)))

    def record_for(self, key: tuple, phases: dict[str, int]) -> Capture:
        record = self.captures.get(key)
        if record is None:
            record = Capture(key, fn=None, segment=Segment(self.hot, self.captured, phases, self.probe))
            record.fn = self._compile(record)
            self.captures[key] = record
        return record

    def static_inputs(self, inputs: dict[Source, Any]) -> dict[Source, Any]:
        """What warm-up and capture run on: in cudagraph mode the capture's input buffers (prologue outputs that
        live in fixed buffers, noise, are used in place: no copy per block; the rest are copies the replay
        refreshes); in compile mode the inputs themselves."""
        if self.mode == "compile":
            return inputs
        return {s: v if s.node in self.prologue or not isinstance(v, torch.Tensor) else v.clone()
                for s, v in inputs.items()}

    def prepare(self, key: tuple, phases: dict[str, int], inputs: dict[Source, Any]) -> Capture:
        """Warm-up, then (cudagraph) capture, for one phase key."""
        record = self.record_for(key, phases)
        held = self.probe.take() if self.probe else None  # warm-up and capture are no block's marks
        try:
            static = self.static_inputs(inputs)
            self.warm(record, record.segment, static)
            if self.mode == "cudagraph":
                self.capture(record, static)
            return record
        finally:
            if self.probe:
                self.probe.marks = held

    def warm(self, record: Capture, segment: Segment, inputs: dict[Source, Any]) -> None:
        """Compile and settle `record` by running it on `segment` (the live nodes, or warm-up copies of them:
        the compiled code is the same, see tiers.py)."""
        t0 = time.perf_counter()
        if self.mode == "compile":
            record.fn(segment, inputs)  # first call compiles
        else:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                # uncompiled code needs one run to settle (lazy kernel loading, library handles); compiled code
                # also its first-call autotuning and allocations
                for _ in range(self.WARMUP if self.backend != "none" else 1):
                    record.fn(segment, inputs)
            side.synchronize()  # not the current stream's wait: in the background that would stall the stream
        record.state = "warm"
        self.times["compile_s"] += time.perf_counter() - t0

    def capture(self, record: Capture, static: dict[Source, Any]) -> None:
        """Capture `record` over the live nodes and `static` input buffers (recording runs nothing on the
        device, so node state is not touched)."""
        t1 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        if self.probe:
            self.probe.take()  # warm-up's marks
        compiles = record.compiles
        with capturing(graph, self.pool, self.capture_stream):
            out = record.run(static)
        torch.cuda.synchronize(self.device)
        if record.compiles != compiles:
            raise CaptureError(f"phase {record.key} compiled again while it was captured; the hot path's guards "
                               f"do not hold between warm-up and capture")
        if self.probe:
            record.marks = self.probe.take()  # event-record nodes of the graph: replayed with it
        self.times["capture_s"] += time.perf_counter() - t1
        record.graph, record.static_in, record.static_out, record.state = graph, static, out, "captured"

    def check(self, record: Capture, inputs: dict[Source, Any]) -> None:
        """Replay's guard: every input as it was captured, or an error naming both sides."""
        for src, want in record.static_in.items():
            got = inputs[src]
            same = (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
                    and got.device == want.device) if isinstance(want, torch.Tensor) else got == want
            if not same:
                raise CaptureError(f"replay of phase {record.key}: input '{src}' was captured as {_describe(want)} "
                                   f"but is now {_describe(got)}; shapes and dtypes must stay fixed")

    def replay(self, record: Capture, inputs: dict[Source, Any], versions: dict[Source, int] | None) -> dict:
        self.check(record, inputs)
        for src, buf in record.static_in.items():
            if not isinstance(buf, torch.Tensor) or buf.data_ptr() == inputs[src].data_ptr():
                continue
            version = versions.get(src) if versions else None
            if version is None or record.copied.get(src) != version:  # a new prompt: copy once per phase
                buf.copy_(inputs[src], non_blocking=True)
                record.copied[src] = version
        record.graph.replay()
        if self.probe:
            self.probe.replayed(record.marks)
        self.replays += 1
        return record.static_out

    def __call__(self, external: dict[Source, Any], phases: dict[str, int],
                 versions: dict[Source, int] | None = None) -> dict[str, Any]:
        values = self.run_prologue(external, phases)
        inputs = self.segment_inputs(values)
        key = self.key_of(phases)
        record = self.captures.get(key)
        self.hot.current = "(compiled hot path)"
        try:
            if self.mode == "compile":
                if record is None:
                    record = self.prepare(key, phases, inputs)
                out = record.run(inputs)
            else:
                if record is None or record.state != "captured":
                    raise CaptureError(f"phase {key} was not captured at start-up (captured: "
                                       f"{sorted(self.graphs)}); a node's phase_for_block exceeds num_phases")
                out = self.replay(record, inputs, versions)
        except (CaptureError, NodeError):
            raise
        except Exception as exc:
            raise NodeError("(compiled hot path)", self.mode, "forward", exc) from exc
        finally:
            self.hot.current = None
        values.update(out)
        return self.hot.outputs(values)


def phase_keys(hot: HotPath, phases_of: Callable, horizon: int | None = None) -> list[tuple[int, dict[str, int]]]:
    """(first block, phases) for every distinct phase combination a session goes through, in order.
    `phases_of(block, changed)` is the engine's `phases`."""
    limit = horizon or 1 + max((hot.nodes[n].num_phases() for n in hot.order), default=1)
    every_input = {n: frozenset(hot.bindings[n]) for n in hot.order}
    seen, out = set(), []
    for block in range(limit):  # each block as it comes, then as it runs when every input just changed
        for phases in (phases_of(block), phases_of(block, every_input)):
            key = tuple(sorted(phases.items()))
            if key not in seen:
                seen.add(key)
                out.append((block, phases))
    return out


def build_executor(hot: HotPath, mode: str, device: torch.device, backend: str = "inductor",
                   probe: Probe | None = None) -> Callable:
    """The per-block callable for `mode` over `hot`; a compiled one still needs its `warm_up`."""
    if mode == "eager":
        return hot
    if mode not in MODES:
        raise CaptureError(f"unknown compile mode '{mode}'; choose one of {', '.join(MODES)}")
    return CompiledHotPath(hot, mode, device, backend=backend, probe=probe)
