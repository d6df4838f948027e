"""Sessions: reset, the block loop, cooperative stop, the watchdog, error handling.

One Engine per process holds the loaded nodes and serves sessions one after another. A session is:
reset every node; then per block: apply pending commands, run on-change nodes whose inputs moved, run the
hot path, hand the block on. A node that raises ends the session with its name in the reason, every node
is reset, and the engine is ready for the next session.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import node as node_mod
import torch

from . import swap
from .compile import CompiledHotPath, build_executor, phase_keys
from .devices import resolve_device, resolve_dtype
from .emit import Block, HostCopier
from .inputs import InputFeeds
from .errors import CommandError, NodeError, ReactorGraphError, SessionError
from .host import HostFeatures
from .hot_path import HotPath, Probe, run_node
from .plan import Plan, Source, Wiring
from .session_thread import SessionThread
from .compile_cache import CompileCache
from .tiers import TieredHotPath, build_compiled_tier
from .slots import RESET, CommandQueue, Pending, SlotStore

log = logging.getLogger("reactor_graph")


@dataclass
class SessionResult:
    blocks: int = 0
    reason: str = "stopped"  # stopped | finished | error | watchdog | sink
    error: str | None = None  # human-readable, names the node where one failed
    node: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Stats:
    """Counters a server exposes as metrics."""

    sessions: int = 0
    blocks: int = 0
    frames: int = 0
    errors: int = 0
    on_change_runs: dict[str, int] = field(default_factory=dict)
    last_block_s: float = 0.0
    slowest_block_s: float = 0.0  # what a block may take here (compile warm-up included): sizes the watchdog
    swaps: list[dict] = field(default_factory=list)  # each swap's reply: node, now, stall_ms, recaptured


class Engine(HostFeatures):
    def __init__(self, plan: Plan, device: str | None = None, dtype: str | None = None, compile: str | None = None,
                 compile_backend: str = "inductor", start: str = "full"):
        spec = plan.spec.spec
        self.plan = plan
        self.device = resolve_device(device or spec.device)
        self.dtype = resolve_dtype(dtype if dtype is not None else spec.dtype, self.device)
        # The CPU runs eager unless a mode is asked for explicitly (compiling on a small CPU costs more
        # than it saves); on a GPU the graph's own mode applies.
        self.mode = compile or ("eager" if self.device.type == "cpu" else spec.compile)
        self.mode_note = ""
        self.compile_backend = compile_backend  # tests use "aot_eager": same guards and graphs, no C++ build
        if start not in ("full", "tiered"):
            raise SessionError(f"unknown start '{start}'; choose full or tiered")
        # full: compile (and capture) before the first block. tiered: serve at once from a quick tier and switch
        # to the compiled one when a background build is ready (tiers.py); `run` uses it on a GPU.
        self.start = start
        self.compile_cache: CompileCache | None = None  # compile_cache.py; loaded before the first compile
        self._tiers: dict[tuple, TieredHotPath] = {}  # tiered start: per set of hot nodes
        self._cache_lock = threading.Lock()
        self.wiring: Wiring = plan.wiring  # this session's: the plan's, or what swaps made of it
        self.commands = CommandQueue(plan.commands)
        self.slots = SlotStore(plan.slots)
        self.inputs = InputFeeds(plan.slots, self.device, self.dtype)  # video/image slots (inputs.py)
        self.stats = Stats()
        self.hot = HotPath(plan, self.wiring)
        self.copier: HostCopier | None = None
        self.loaded = False
        self.stop_timeout = 5.0
        self.load_times: dict[str, float] = {}
        self._session_lock = threading.Lock()
        self._runner = SessionThread("reactor-graph-session")
        self._stop = self._runner.stop_event
        self._seen: dict[str, dict[Source, int]] = {}  # on-change node -> versions of its inputs last run
        self._last_versions: dict[Source, int] | None = None  # hot path's external versions at the last block
        self._versions: dict[Source, int] = {}
        self._values: dict[Source, Any] = {}
        self.executor: Callable = self.hot
        self.probe: Probe | None = None  # timing marks at node boundaries (use_probe: bench, --trace)
        self.restart_pending = False
        self._block_t0: float | None = None  # when the block now running began (None between blocks)

    @property
    def nodes(self):
        """The node running under each name in this session (a swapped-in alternative, or the declared one)."""
        return self.wiring.nodes

    # -- what a server shows (reactor_graph.host.StreamHost) ----------------------------------------
    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def version(self) -> str:
        return self.plan.spec.spec.version

    @property
    def fps(self) -> float:
        return self.plan.spec.spec.fps

    @property
    def height(self) -> int:
        return self.plan.info.height

    @property
    def width(self) -> int:
        return self.plan.info.width

    def alternatives(self) -> list[dict]:
        """Declared alternatives and the nodes each can stand in for (same outputs)."""
        from .plan import outputs_mismatch

        return [{"name": name, "type": alt.type_name,
                 "targets": [n for n, node in self.plan.nodes.items() if outputs_mismatch(node, alt) is None]}
                for name, alt in self.plan.alternatives.items()]

    def command_schemas(self) -> list[dict]:
        reset = {"name": RESET, "description": "Restart the sequence with default slots",
                 "schema": {"type": "object", "properties": {}}}
        return [c.schema() for c in self.plan.commands.values()] + [reset]

    # -- start-up -------------------------------------------------------------------------------
    def load(self, progress: Callable[[str], None] | None = None) -> Engine:
        """Load every node (and declared alternative) once, then build the hot-path executor."""
        say = progress or (lambda msg: None)
        for name, node in [*self.plan.nodes.items(), *self.plan.alternatives.items()]:
            say(f"loading {name} ({node.type_name})")
            t0 = time.perf_counter()
            try:
                node.load(self.device, self.dtype)
            except Exception as exc:
                raise NodeError(name, node.type_name, "load", exc) from exc
            self.load_times[name] = time.perf_counter() - t0
        self.copier = HostCopier(self.device)
        self.inputs.sync(self.slots)  # video/image slots on the device before anything is warmed or captured
        self._warm_alternatives(say)
        say(f"preparing the hot path ({self.mode})")
        t0 = time.perf_counter()
        self.prepare_executor(progress=say)
        self.load_times["(hot path)"] = time.perf_counter() - t0  # compile/capture, or the quick tier's capture
        self.loaded = True
        return self

    def phase_keys(self) -> list[tuple[int, dict[str, int]]]:
        return phase_keys(self.hot, self.phases)

    def prepare_executor(self, progress: Callable[[str], None] | None = None) -> Callable:
        """Build the executor for `mode` over the current wiring; a compiled one is warmed (and captured)
        on real inputs from the current slots, phase by phase as a session meets them."""
        say = progress or (lambda msg: None)
        if self.mode == "cudagraph" and self.device.type != "cuda":
            log.warning("compile mode 'cudagraph' needs a CUDA GPU; this engine runs on %s, so it falls back to "
                        "'eager'", self.device)
            self.mode_note = f"cudagraph needs a CUDA GPU; fell back to eager on {self.device}"
            self.mode = "eager"
        if self.start == "tiered" and self.mode != "eager" and self.probe is None:
            # one tiered executor per set of hot nodes: swapping back (a session's end) finds its compiled
            # tier (or its build still under way) instead of starting over
            key = tuple(self.wiring.nodes[n] for n in self.plan.hot)
            ex = self._tiers.get(key)
            if ex is None or ex.error is not None:
                ex = self._tiers[key] = self._prepare_tiered(say)
            self.executor = ex
            return ex
        ex = build_executor(self.hot, self.mode, self.device, self.compile_backend, probe=self.probe)
        if isinstance(ex, CompiledHotPath):
            cache = self.load_compile_cache()
            self._warm_up(ex, "capturing" if self.mode == "cudagraph" else "compiling", "the hot path", say)
            if cache is not None:
                cache.save()
        self.executor = ex
        return ex

    def _warm_up(self, ex: CompiledHotPath | None, verb: str, what: str,
                 say: Callable[[str], None]) -> tuple[list, dict[Source, Any]]:
        """Build `ex`'s record of every phase key on real inputs from the current slots (None: only run the
        on-change nodes). Returns the phase keys and the hot path's external inputs as they were."""
        keys = self.phase_keys()
        self.reset_nodes()  # warm-up writes node state (KV caches): reset before and after
        with torch.inference_mode():
            self.run_on_change()
            for i, key in enumerate(keys if ex is not None else ()):
                say(f"{verb} phase {key[0]} of {what} ({i + 1}/{len(keys)})")
                ex.warm_up([key], self.external)
            external = self.external()
        self.reset_nodes()
        return keys, external

    def _prepare_tiered(self, say: Callable[[str], None]) -> TieredHotPath:
        """The quick tier now (cudagraph: eager code captured, phase by phase; compile: eager), the compiled tier
        in the background (tiers.py)."""
        quick: Callable = self.hot
        name = "eager"
        if self.mode == "cudagraph":
            quick, name = build_executor(self.hot, "cudagraph", self.device, "none"), "eager-captured"
        keys, external = self._warm_up(quick if name == "eager-captured" else None, "capturing",
                                       "the eager hot path", say)
        hot, mode, device, backend = self.hot, self.mode, self.device, self.compile_backend

        def build(tier: TieredHotPath):
            cache = self.load_compile_cache()  # here, not before the first frame: a cache takes seconds to read
            built = build_compiled_tier(tier, hot, mode, device, backend, keys, external, quick)
            if cache is not None:
                cache.save()
            return built

        tier = TieredHotPath(quick, name, build)
        say(f"serving {name}; compiling the hot path in the background")
        return tier.start()

    def load_compile_cache(self) -> CompileCache | None:
        """This graph's compile cache, loaded once before the first compile (None for backends that make no
        artifacts worth keeping: the tests' aot_eager)."""
        if self.compile_backend != "inductor":
            return None
        with self._cache_lock:
            if self.compile_cache is None:
                self.compile_cache = CompileCache(self.plan, self.device, self.mode)
                self.compile_cache.load()
        return self.compile_cache

    @property
    def compiling(self) -> bool:
        """Whether a tiered start's compiled tier is still being built in the background."""
        return any(t.building for t in self._tiers.values())

    def serving(self) -> dict:
        """What runs the hot path now: {mode, serving (eager | eager-captured | compiled), progress, ...}."""
        ex = self.executor
        if isinstance(ex, TieredHotPath):
            return {"mode": self.mode, **ex.status()}
        return {"mode": self.mode, "serving": "eager" if self.mode == "eager" else "compiled", "progress": None,
                "error": None}

    def use_wiring(self, wiring: Wiring, recapture: bool) -> None:
        """Run with `wiring` from the next block on: a new hot path over it, and a new executor when
        hot-path code changed (`recapture`; compiled modes compile and capture it now)."""
        self.wiring = wiring
        old = self.hot
        self.hot = HotPath(self.plan, wiring)
        self.hot.probe = self.probe
        if recapture or self.executor is old:
            self.prepare_executor()

    def use_probe(self, probe: Probe | None, progress: Callable[[str], None] | None = None,
                  executor: Callable | None = None) -> Callable:
        """Time every node (on-change and hot) at its boundaries with `probe` from the next block on (None:
        stop). A compiled executor is built anew, split at node boundaries (see Probe), unless `executor` (one
        built before for this probe state, over this hot path) is given. Returns the previous executor, so a
        caller can put the un-probed one back without compiling it again."""
        prev = self.executor
        if isinstance(prev, TieredHotPath) and probe is not None:
            prev.cancel()  # a probed executor is built in full; the un-probed one comes back through `executor`
            self._tiers.clear()
        self.probe = self.hot.probe = probe
        if executor is not None:
            self.executor = executor
        elif isinstance(prev, (CompiledHotPath, TieredHotPath)):
            self.prepare_executor(progress)
        return prev

    def _warm_alternatives(self, say) -> None:
        """Run each declared condition alternative once on default slots, so its first swap is not its first
        call (lazy initialisation, kernel selection happen here, not in a user's session)."""
        for name, node in self.plan.alternatives.items():
            binds = self.plan.alt_bindings[name]
            if any(src.node is not None for src in binds.values()) or node.every_block:
                continue
            say(f"warming alternative {name}")
            try:
                with torch.inference_mode():
                    node.forward(**{port: self.slots.values[src.name] for port, src in binds.items()})
            except Exception as exc:
                raise NodeError(name, node.type_name, "warm-up", exc) from exc

    # -- commands (any thread) --------------------------------------------------------------------
    def submit(self, name: str, params: dict | None = None, reply=None) -> Pending:
        """Validate now (raises CommandError, nothing changed) and apply at the next block boundary. Nodes fed
        by the slots it writes may refuse the value (CommandError) or add a `warning` to the reply's result
        (Node.check_input: e.g. words the text encoder does not know)."""
        warnings = self.check_command(name, params)
        if warnings and reply is not None:
            inner, note = reply, "; ".join(warnings)
            reply = lambda result: inner({**result, "warning": note} if result.get("ok") else result)  # noqa: E731
        return self.commands.submit(name, params, reply)

    def check_command(self, name: str, params: dict | None = None) -> list[str]:
        """The warnings nodes give for what command `name` would write; raises CommandError if one refuses."""
        pending = self.commands.validate(name, params)
        if pending.command is None:
            return []
        writes = pending.command.writes(pending.params)
        out = []
        for node_name, binds in self.plan.bindings.items():
            for port, src in binds.items():
                if src.node is None and src.name in writes:
                    try:
                        note = self.nodes[node_name].check_input(port, writes[src.name])
                    except ValueError as exc:
                        raise CommandError(name, str(exc)) from exc
                    if note:
                        out.append(note)
        return out

    # -- sessions -------------------------------------------------------------------------------------
    def reset_nodes(self) -> None:
        for name, node in self.nodes.items():
            try:
                node.reset()
            except Exception:  # a reset that fails must not stop the others from resetting
                log.exception("reset of node %s failed", name)
        self._seen.clear()
        self._last_versions = None

    def _apply(self, pending: list[Pending]) -> bool:
        """Apply queued commands at a block boundary. Returns True if the sequence restarts."""
        restart = False
        for p in pending:
            result: dict[str, Any] = {"ok": True}
            try:
                if p.action is not None:
                    result = p.action()
                elif p.command is None:  # built-in reset
                    self.slots.restore_defaults()
                    restart = True
                else:
                    for slot, value in p.command.writes(p.params).items():
                        self.slots.write(slot, value)
                    for target, alt in p.command.spec.swap.items():
                        result = swap.apply(self, target, *swap.resolve(self, target, alt))
            except ReactorGraphError as exc:
                result = {"ok": False, "error": str(exc)}
            if p.reply:
                p.reply(result)
        restart = restart or self.restart_pending
        self.restart_pending = False
        return restart

    def request_swap(self, target: str, alternative: str | None = None, spec: dict | None = None,
                     reply: Callable[[dict], None] | None = None) -> None:
        """Swap node `target` for a declared alternative (or back to itself), or for a node described by
        `spec` ({type, params, in}), loaded in the background. Checked now: raises SessionError if it does
        not fit, and nothing changes. Applied at the next block boundary."""
        swap.request(self, target, alternative, spec, reply)

    def forget(self, node: str) -> None:
        """Make an on-change node run again at the next boundary (its inputs are as good as new)."""
        self._seen.pop(node, None)

    def _source_value(self, src: Source) -> tuple[Any, int]:
        if src.node is None:
            return self.slots.values[src.name], self.slots.versions[src.name]
        return self._values[src], self._versions.get(src, 0)

    def run_on_change(self) -> None:
        for name in self.plan.on_change:
            binds = self.wiring.bindings[name]
            versions = {src: self._source_value(src)[1] for src in binds.values()}
            if self._seen.get(name) == versions:
                continue
            values = {src: self._source_value(src)[0] for src in binds.values()}
            run_node(self.hot, name, values, probe=self.probe, kind="on_change")
            for port in self.nodes[name].ports()[1]:
                src = Source(name, port)
                self._values[src] = values[src]
                self._versions[src] = self._versions.get(src, 0) + 1
            self._seen[name] = versions
            self.stats.on_change_runs[name] = self.stats.on_change_runs.get(name, 0) + 1

    def external(self) -> dict[Source, Any]:
        return {src: self._source_value(src)[0] for src in self.hot.external_sources}

    def external_versions(self) -> dict[Source, int]:
        return {src: self._source_value(src)[1] for src in self.hot.external_sources}

    def _wrap_length(self) -> int | None:
        lengths = [n.max_blocks() for n in self.nodes.values() if n.max_blocks()]
        if self.plan.spec.spec.wrap_blocks:
            lengths.append(self.plan.spec.spec.wrap_blocks)
        return min(lengths) if lengths else None

    def phases(self, block: int, changed: dict[str, frozenset[str]] | None = None) -> dict[str, int]:
        """Each hot node's phase for `block`; `changed`: per node, its inputs whose value moved since the
        previous block of the sequence (a node may pick another phase for that: `Node.phase_on_change`)."""
        out = {}
        for n in self.plan.hot:
            node = self.nodes[n]
            phase = node.phase_for_block(block)
            if changed and changed.get(n):
                phase = node.phase_on_change(phase, changed[n])
            out[n] = phase
        return out

    def changed_inputs(self, versions: dict[Source, int]) -> dict[str, frozenset[str]]:
        """Per hot node, the inputs whose source has a new version since the previous block (none for the
        first block of a sequence); remembers `versions` for the next call."""
        last, self._last_versions = self._last_versions, versions
        if last is None:
            return {}
        moved = {src for src, v in versions.items() if last.get(src) != v}
        if not moved:
            return {}
        return {n: frozenset(p for p, src in self.wiring.bindings[n].items() if src in moved) for n in self.plan.hot}

    def run_block(self, block: int) -> dict[str, Any]:
        """One block: on-change nodes whose inputs moved, then the hot path. Returns the output's values."""
        probe = self.probe
        with torch.inference_mode():
            self.inputs.sync(self.slots)  # the newest camera frame into its slot (a copy; inputs.py)
            self.run_on_change()
            versions = self.external_versions()
            phases = self.phases(block, self.changed_inputs(versions))
            if probe is None:
                return self.executor(self.external(), phases, versions)
            probe.mark("hot path", "hot_path", "start")
            out = self.executor(self.external(), phases, versions)
            probe.mark("hot path", "hot_path", "end")
            return out

    def run_session(self, on_block: Callable[[Block], None], max_blocks: int | None = None,
                    stop: threading.Event | None = None,
                    before_block: Callable[[int], None] | None = None) -> SessionResult:
        """Run one session in this thread until stopped, `max_blocks`, or an error. Never raises for a node."""
        if not self.loaded:
            raise SessionError("the engine is not loaded; call load() first")
        if not self._session_lock.acquire(blocking=False):
            raise SessionError("a session is already running on this engine")
        stop = stop or self._stop
        stop.clear()
        node_mod._session.stop_event = stop
        result = SessionResult()
        self.stats.sessions += 1
        try:
            self.slots.restore_defaults()
            self.reset_nodes()
            wrap = self._wrap_length()
            seq = 0
            while not stop.is_set() and (max_blocks is None or result.blocks < max_blocks):
                if before_block:
                    before_block(result.blocks)
                t0 = time.perf_counter()  # the block starts at its boundary: commands and swaps count
                self._block_t0 = t0
                probe = self.probe
                if probe is not None:
                    probe.mark("block", "block", "start")
                pending = self.commands.drain()
                if self._apply(pending):
                    self.reset_nodes()
                    seq = 0
                if probe is not None:
                    probe.applied(result.blocks, pending, t0)
                out = self.run_block(seq)
                if probe is not None:
                    probe.mark("copy to host", "copy", "start")
                block = self.copier.emit(result.blocks, out, self.plan.nodes[self.plan.output].params, t0)
                if probe is not None:
                    probe.mark("copy to host", "copy", "end")
                    probe.mark("block", "block", "end")
                    probe.end_block(result.blocks)
                self._block_t0 = None  # handing the block on may wait for the viewer: that is not a hang
                self.stats.last_block_s = time.perf_counter() - t0
                self.stats.slowest_block_s = max(self.stats.slowest_block_s, self.stats.last_block_s)
                self.stats.blocks += 1
                self.stats.frames += block.frames
                result.blocks += 1
                seq += 1
                if wrap is not None and seq >= wrap:  # a finite sequence restarts from its beginning
                    self.reset_nodes()
                    seq = 0
                try:
                    on_block(block)
                except Exception as exc:  # the consumer went away: end the session, keep the engine
                    result.reason, result.error = "sink", f"the stream's consumer failed: {exc}"
                    break
            else:
                result.reason = "stopped" if stop.is_set() else "finished"
        except NodeError as exc:
            self.stats.errors += 1
            result.reason, result.error, result.node = "error", str(exc), exc.node
            log.error("session ended: %s", exc)
        finally:
            self._block_t0 = None
            if self.wiring is not self.plan.wiring:  # a session's swaps end with it
                self.use_wiring(self.plan.wiring, recapture=swap.hot_changed(self.plan, self.wiring))
                self.restart_pending = False  # the next session starts from its beginning anyway
            swap.restore_in_place(self)
            self.inputs.clear()  # a client's camera frames end with its session
            self.reset_nodes()
            self.commands.drain()  # commands for an ended session must not leak into the next
            node_mod._session.stop_event = None
            self._session_lock.release()
        return result

    # -- background sessions, stop and watchdog ----------------------------------------------------------
    def start_session(self, on_block: Callable[[Block], None], on_end: Callable[[SessionResult], None] | None = None,
                      max_blocks: int | None = None) -> threading.Thread:
        def body():
            res = self.run_session(on_block, max_blocks=max_blocks, stop=self._stop)
            if on_end:
                on_end(res)

        return self._runner.start(body, "a session is still running (or a node has not stopped yet)")

    def stop(self, timeout: float | None = None) -> SessionResult | None:
        """Ask the running session to stop and wait for it. If it does not end in time, the watchdog
        gives up on it and names the node that is stuck; the engine refuses new sessions until it ends."""
        wait = self.stop_timeout if timeout is None else timeout
        self._runner.stop(wait, lambda t: f"watchdog: the session did not stop within {wait:.1f}s; node "
                                          f"'{self.hot.current or '(between nodes)'}' is still running and "
                                          f"ignores should_stop()")
        return None

    def block_progress(self) -> tuple[float | None, str | None]:
        """(seconds the current block has run, the node running) while in a block, else (None, None)."""
        t0 = self._block_t0
        if t0 is None:
            return None, None
        return time.perf_counter() - t0, self.hot.current or "(the compiled hot path)"

    @property
    def busy(self) -> bool:
        return self._runner.busy


def open_engine(path: str, device: str | None = None, dtype: str | None = None, compile: str | None = None,
                progress: Callable[[str], None] | None = None) -> Engine:
    from .plan import load_plan

    return Engine(load_plan(path), device=device, dtype=dtype, compile=compile).load(progress)
