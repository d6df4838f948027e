"""Tiered start: the stream starts from a quick tier at once and moves to the compiled tier at a block
boundary, so the first frame never waits for inductor.

  quick tier     cudagraph mode: CUDA graphs captured over the eager code (seconds to build; for a
                 launch-bound model most of the speed). compile mode: the eager hot path.
  compiled tier  built in a background thread while the quick tier serves.

The compiled tier's compile and warm-up run on *warm-up copies* of the hot nodes (parameters shared, every
other tensor copied), so the live stream's state (KV caches, noise buffers) is never touched by them. Each
phase key has one compiled function (`Capture.fn`, compiled `Segment.__call__`) whose Dynamo cache serves any
segment of the same structure: guards are on types, shapes and dtypes, not on which object, so the live nodes
then run the code compiled on the copies without compiling again (counted: a compile there is an error, and the
quick tier keeps serving). In cudagraph mode the compiled graphs are captured at the switch, on the stream's
thread, over the live nodes and the quick tier's own input buffers (recording runs nothing on the device, so it
costs milliseconds, and no capture ever overlaps the stream's CUDA calls).

The build waits until the first block has been served (or `START_AFTER_S` without a block: a server waiting for
its first client): it shares the GIL and, at first, the import machinery (Dynamo's import alone is seconds of
Python) with the stream's thread, which must not be slowed on its way to the first frame.

`TieredHotPath` is the executor the engine calls every block: at the first call after the build finished it
switches tiers (a block boundary), and from then on only the compiled tier runs. If the build fails, the quick
tier goes on serving and the reason is logged and shown (`status()`: log, /health, the page).
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from types import MappingProxyType
from typing import Any, Callable

import torch

from .compile import CompiledHotPath, Segment
from .errors import CaptureError
from .hot_path import HotPath
from .plan import Source, Wiring

log = logging.getLogger("reactor_graph")


def warm_up_copies(hot: HotPath) -> HotPath:
    """A hot path over copies of `hot`'s nodes for compiling and warming up off the live state: parameters are
    shared (no second copy of the weights), every other tensor and attribute is copied. Raises if a node
    cannot be copied (it holds a thread, a file...): such a graph starts untiered."""
    memo: dict[int, Any] = {}
    for name in hot.order:
        for module in _modules_of(hot.nodes[name]):
            for p in module.parameters():
                memo[id(p)] = p
    copies = {name: copy.deepcopy(hot.nodes[name], memo) for name in hot.order}
    wiring = Wiring(MappingProxyType({**hot.wiring.nodes, **copies}), hot.wiring.bindings)
    return HotPath(hot.plan, wiring)


def _modules_of(obj: Any, depth: int = 3) -> list[torch.nn.Module]:
    """The nn.Modules a node holds (its attributes, and theirs, a few levels down)."""
    found: dict[int, torch.nn.Module] = {}
    todo, seen = [(obj, 0)], set()
    while todo:
        o, d = todo.pop()
        if id(o) in seen or d > depth:
            continue
        seen.add(id(o))
        if isinstance(o, torch.nn.Module):
            found[id(o)] = o
            continue  # its parameters() covers its submodules
        if isinstance(o, dict):
            children = list(o.values())
        elif isinstance(o, (list, tuple)):
            children = list(o)
        elif hasattr(o, "__dict__") and not isinstance(o, (type, torch.Tensor)):
            children = list(vars(o).values())
        else:
            continue
        todo.extend((c, d + 1) for c in children)
    return list(found.values())


class TieredHotPath:
    """The per-block executor of a tiered start: the quick tier until the compiled tier is built, then it."""

    START_AFTER_S = 3.0  # the build starts when the first block is served, or after this long without one

    def __init__(self, quick: Callable, quick_name: str, build: Callable[[TieredHotPath], CompiledHotPath]):
        self.quick = quick
        self.compiled: CompiledHotPath | None = None
        self.serving = quick_name  # eager | eager-captured | compiled
        self.progress = "compiling in the background"
        self.error: str | None = None
        self.started = time.perf_counter()
        self.ready_s: float | None = None  # build time of the compiled tier
        self.switched_block: int | None = None  # the block index (of this executor's calls) it served from
        self.switch_ms: float | None = None  # the switch's own stall (cudagraph: capturing the compiled graphs)
        self.calls = 0
        self.cancelled = threading.Event()
        self._go = threading.Event()  # set once the first block has been served (or by wait/cancel)
        self._built: CompiledHotPath | None = None
        self._build = build
        self._thread = threading.Thread(target=self._run, name="reactor-graph-compile", daemon=True)

    def start(self) -> TieredHotPath:
        self._thread.start()
        return self

    def _run(self) -> None:
        self._go.wait(self.START_AFTER_S)
        if self.cancelled.is_set():
            return
        try:
            built = self._build(self)
            if not self.cancelled.is_set():
                self.ready_s = time.perf_counter() - self.started
                self._built = built
                log.info("compiled hot path ready after %.1fs; switching at the next block boundary", self.ready_s)
        except Exception as exc:  # noqa: BLE001 - the quick tier keeps serving; the reason is shown
            self.error = f"{type(exc).__name__}: {exc}"
            self.progress = f"compiled tier failed; serving {self.serving}"
            log.error("the compiled hot path could not be built (%s); the stream stays on %s", self.error,
                      self.serving)

    def say(self, msg: str) -> None:
        self.progress = msg
        log.info("compiled tier: %s", msg)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background build ends (tests, benches); True if the compiled tier is ready."""
        self._go.set()
        self._thread.join(timeout)
        return self._built is not None or self.compiled is not None

    @property
    def building(self) -> bool:
        return self._thread.is_alive()

    def cancel(self) -> None:
        """The engine moved on (a swap, a probe): the build's result is not used; it stops at its next phase."""
        self.cancelled.set()
        self._go.set()

    def _switch(self) -> None:
        """At a block boundary, on the stream's thread. In cudagraph mode the compiled graphs are captured here,
        over the live nodes and the quick tier's input buffers (recording runs nothing, so it takes
        milliseconds per phase): a capture never overlaps the stream's own CUDA calls."""
        built, self._built = self._built, None
        quick = self.quick
        t0 = time.perf_counter()
        if isinstance(quick, CompiledHotPath):
            try:
                for key, record in built.captures.items():
                    served = quick.captures[key]
                    built.capture(record, served.static_in)
                    record.copied = dict(served.copied)  # the replay's "already copied" marks go with the buffers
            except Exception as exc:  # noqa: BLE001 - the quick tier keeps serving
                self.error = f"{type(exc).__name__}: {exc}"
                self.progress = f"capturing the compiled tier failed; serving {self.serving}"
                log.error("the compiled hot path could not be captured (%s); the stream stays on %s", self.error,
                          self.serving)
                return
        self.switch_ms = (time.perf_counter() - t0) * 1000
        self.compiled, self.quick = built, None
        self.serving, self.progress, self.switched_block = "compiled", "compiled", self.calls
        log.info("now serving the compiled hot path (from block %d; the switch took %.0f ms)", self.calls,
                 self.switch_ms)

    def __call__(self, external: dict[Source, Any], phases: dict[str, int],
                 versions: dict[Source, int] | None = None) -> dict[str, Any]:
        if self._built is not None:
            self._switch()
        if self.calls:  # the first block has been served (and delivered): the build may take its share now
            self._go.set()
        self.calls += 1
        serving = self.compiled if self.compiled is not None else self.quick
        return serving(external, phases, versions)

    def status(self) -> dict:
        return {"serving": self.serving, "progress": self.progress, "error": self.error, "switch_ms": self.switch_ms,
                "compiled_ready_s": None if self.ready_s is None else round(self.ready_s, 2),
                "compiling_s": round(time.perf_counter() - self.started, 1) if self.ready_s is None else None}

    # what benches and tests read of a compiled executor
    @property
    def recompiles(self) -> int:
        return self.compiled.recompiles if self.compiled is not None else 0


def build_compiled_tier(tier: TieredHotPath, hot: HotPath, mode: str, device: torch.device, backend: str,
                        phase_list: list[tuple[int, dict[str, int]]], external: dict[Source, Any],
                        quick: Callable) -> CompiledHotPath:
    """The compiled tier of `hot` (see the module docstring); runs in the background thread. `external`: the
    hot path's external inputs as they were at start (read only), `quick`: the serving tier (its capture
    buffers are shared in cudagraph mode)."""
    shadow = warm_up_copies(hot)
    built = CompiledHotPath(hot, mode, device, backend=backend)
    built.compile_regions(shadow)  # the copies get the same compiled region functions as the live nodes
    twin = CompiledHotPath(shadow, "compile", device, backend="none")  # runs the copies' prologue
    for name in shadow.order:  # the copies start where a session starts
        shadow.nodes[name].reset()
    with torch.inference_mode():
        for i, (_, phases) in enumerate(phase_list):
            if tier.cancelled.is_set():
                raise CaptureError("cancelled")
            key = built.key_of(phases)
            if key in built.captures:
                continue
            tier.say(f"compiling phase {i + 1}/{len(phase_list)}")
            record = built.record_for(key, phases)
            inputs = twin.segment_inputs(twin.run_prologue(dict(external), phases))
            built.warm(record, Segment(shadow, built.captured, phases), built.static_inputs(inputs))
            if mode == "cudagraph" and not (isinstance(quick, CompiledHotPath) and key in quick.captures):
                raise CaptureError(f"phase {key} has no captured buffers in the serving tier")
    return built
