"""Hot-swapping a node while a session runs.

A swap is checked before anything changes (same outputs: names, kinds, dtypes, shapes; inputs bound to
things that exist; an on-change node stays on-change), then applied at the next block boundary. A condition
(on-change) node writes into the same static buffers the compiled hot path already reads, so nothing is
recompiled or recaptured and the stall is the new node's one forward. A hot-path node is allowed too: the
hot path is recompiled/recaptured for it and the sequence restarts; that stall is measured and reported. A node
may take a replacement in place (`Node.swap_in_place`, e.g. a LoRA alternative rewriting merged weights): then
nothing is recompiled or recaptured, the sequence goes on, and the stall is that rewrite.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from pydantic import ValidationError

from .errors import GraphError, SessionError
from .plan import Plan, Source, Wiring, bind, instantiate, outputs_mismatch
from .spec import NodeSpec

log = logging.getLogger("reactor_graph")

if TYPE_CHECKING:
    from .loop import Engine
    from .node import Node


def _check(engine: Engine, target: str, new: Node, binds: dict[str, Source]) -> None:
    if target not in engine.plan.nodes:
        raise SessionError(f"cannot swap '{target}': no such node; nodes: {', '.join(engine.plan.nodes)}")
    why = outputs_mismatch(engine.nodes[target], new)
    if why:
        raise SessionError(f"cannot swap '{target}' for '{new.name}': {why}")
    if target in engine.plan.on_change:
        hot_inputs = [str(s) for s in binds.values() if s.node is not None and s.node not in engine.plan.on_change]
        if new.every_block or hot_inputs:
            raise SessionError(f"cannot swap condition node '{target}' for '{new.name}': a replacement must run on "
                               f"change (read only slots or condition nodes), but it "
                               f"{'runs every block' if new.every_block else 'reads ' + ', '.join(hot_inputs)}")


def resolve(engine: Engine, target: str, alternative: str) -> tuple[Node, dict[str, Source]]:
    """A declared alternative, or the target's own original node (to swap back)."""
    plan = engine.plan
    if alternative == target:
        return plan.nodes[target], plan.bindings[target]
    if alternative not in plan.alternatives:
        known = ", ".join(plan.alternatives) or "none declared"
        raise SessionError(f"cannot swap '{target}' for '{alternative}': not a declared alternative ({known}); "
                           f"send a node spec to load one on demand")
    return plan.alternatives[alternative], plan.alt_bindings[alternative]


def build_on_demand(engine: Engine, name: str, spec: dict[str, Any]) -> tuple[Node, dict[str, Source]]:
    """Instantiate and bind a node described at run time ({type, params, in}); not loaded yet."""
    ls = engine.plan.spec
    try:
        ns = NodeSpec.model_validate(spec)
    except ValidationError as err:
        e = err.errors()[0]
        raise SessionError(f"node spec for '{name}': {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    issues: list = []
    node = instantiate(ls, "alternatives", name, ns, engine.plan.info, issues)
    binds = bind(ls, "alternatives", name, node, ns, engine.plan.nodes, issues) if node else {}
    if issues:
        raise SessionError(str(GraphError(issues, "runtime swap")))
    return node, binds


def hot_changed(plan: Plan, wiring: Wiring, other: Wiring | None = None) -> bool:
    """Whether a hot-path node differs between `wiring` and `other` (default: the plan as declared)."""
    other = other or plan.wiring
    return any(wiring.nodes[n] is not other.nodes[n] for n in plan.hot)


def _sync(engine: Engine) -> None:
    if getattr(engine.device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(engine.device)  # the stall is the work, not its launch


def apply(engine: Engine, target: str, new: Node, binds: dict[str, Source]) -> dict[str, Any]:
    """At a block boundary: put `new` in place of `target` for this session. Returns the reply."""
    _check(engine, target, new, binds)
    t0 = time.perf_counter()
    if engine.nodes[target].swap_in_place(new):
        # the node rewrote its own weights (a LoRA alternative): same code, same buffers, nothing to recapture
        _sync(engine)
        result = {"ok": True, "node": target, "now": new.name, "recaptured": False, "in_place": True,
                  "stall_ms": (time.perf_counter() - t0) * 1000}
        engine.stats.swaps.append(result)
        return result
    recapture = target in engine.plan.hot and engine.mode != "eager"  # new code on the hot path
    engine.use_wiring(engine.wiring.swapped(target, new, binds), recapture=recapture)
    engine.forget(target)
    result: dict[str, Any] = {"ok": True, "node": target, "now": new.name, "recaptured": False}
    if recapture:
        result.update(recaptured=True, restarted=True)
        engine.restart_pending = True
    result["stall_ms"] = (time.perf_counter() - t0) * 1000
    engine.stats.swaps.append(result)
    return result


def restore_in_place(engine: Engine) -> None:
    """Swap back the nodes that took a replacement in place (their wiring never changed, so the session's end
    does not see them): a session's swaps end with it."""
    for target, declared in engine.plan.nodes.items():
        if declared.swapped_in_place:
            try:
                apply(engine, target, declared, engine.plan.bindings[target])
            except Exception:  # noqa: BLE001 - the next session must still start; the log says why
                log.exception("could not swap '%s' back to its own weights", target)


def request(engine: Engine, target: str, alternative: str | None = None, spec: dict | None = None,
            reply: Callable[[dict], None] | None = None) -> None:
    """Thread-safe. Checks now; a node given as a spec is loaded in the background (the session keeps
    streaming) and swapped in at the first block boundary after it is ready. Raises SessionError if the
    swap does not fit; nothing changes then."""
    if spec is None:
        new, binds = resolve(engine, target, alternative or target)
        _check(engine, target, new, binds)
        engine.commands.submit_action(lambda: apply(engine, target, new, binds), reply)
        return
    new, binds = build_on_demand(engine, alternative or f"{target}_swap", spec)
    _check(engine, target, new, binds)

    def load_then_queue():
        try:
            new.load(engine.device, engine.dtype)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, the session goes on
            if reply:
                reply({"ok": False, "error": f"loading '{new.name}' for the swap failed: {exc}"})
            return
        engine.commands.submit_action(lambda: apply(engine, target, new, binds), reply)

    threading.Thread(target=load_then_queue, name="reactor-graph-swap-load", daemon=True).start()
