"""Hot-swapping nodes mid-session: next-block effect, no recompiles, refusals change nothing, swap back."""
import threading
import time

import pytest

from reactor_graph.errors import SessionError
from reactor_graph.node import registry

Paint = registry()["test_paint"]  # test node types and SWAP_GRAPH live in conftest.py


def engine_for(tiny_engine, seconds=0.0, **kw):
    from reactor_graph.node import registry

    return tiny_engine(registry()["test_paint"].GRAPH.replace("SECONDS", str(seconds)), **kw)


def run(engine, blocks, actions):
    frames = []

    def on_block(b):
        frames.append(b.video()[0, 0, 0])  # one luma sample per block is enough to tell states apart
        if b.index in actions:
            actions[b.index]()

    res = engine.run_session(on_block, max_blocks=blocks)
    assert res.ok, res.error
    return frames


def test_swap_changes_frames_from_next_block_without_recompiles(tiny_engine):
    base = run(engine_for(tiny_engine), 6, {})
    engine = engine_for(tiny_engine, compile="compile", compile_backend="aot_eager")
    ex = engine.executor
    compiles = dict(ex.compiles)
    swapped = run(engine, 6, {1: lambda: engine.submit("use_const")})
    assert swapped[:2] == base[:2] and swapped[2] != base[2]  # from the next block on
    assert ex.recompiles == 0 and ex.compiles == compiles and engine.executor is ex
    assert engine.stats.swaps[-1]["recaptured"] is False


def test_swap_back_restores_first_behaviour(tiny_engine):
    base = run(engine_for(tiny_engine), 6, {})
    engine = engine_for(tiny_engine)
    frames = run(engine, 6, {0: lambda: engine.submit("use_const"), 2: lambda: engine.submit("use_text")})
    assert frames[1] != base[1] and frames[2] != base[2]
    assert frames[3:] == base[3:]
    assert engine.nodes["cond"] is engine.plan.nodes["cond"]


def test_refused_swap_leaves_everything_as_it_was(tiny_engine):
    base = run(engine_for(tiny_engine), 4, {})
    engine = engine_for(tiny_engine)
    errors = []

    def bad():
        before = (dict(engine.slots.versions), engine.nodes["cond"], dict(engine.plan.bindings))
        with pytest.raises(SessionError) as info:
            engine.request_swap("cond", "wide")
        errors.append(str(info.value))
        assert (dict(engine.slots.versions), engine.nodes["cond"], dict(engine.plan.bindings)) == before

    frames = run(engine, 4, {1: bad})
    assert frames == base
    assert "output 'embeds' differs" in errors[0] and "(4 8)" in errors[0] and "(4 16)" in errors[0]


def test_swap_during_a_long_block_waits_for_its_boundary(tiny_engine):
    base = run(engine_for(tiny_engine, seconds=0.2), 3, {})
    engine = engine_for(tiny_engine, seconds=0.2)
    frames = []
    Paint.started.clear()
    done = threading.Event()
    engine.start_session(lambda b: frames.append(b.video()[0, 0, 0]), on_end=lambda r: done.set(), max_blocks=3)
    assert Paint.started.wait(5)  # block 0 is running now
    engine.request_swap("cond", "const")
    assert done.wait(10)
    assert frames[0] == base[0] and frames[1] != base[1]


def test_hot_path_swap_recaptures_and_reports_the_stall(tiny_engine):
    engine = engine_for(tiny_engine, compile="compile", compile_backend="aot_eager")
    replies = []
    frames = run(engine, 4, {1: lambda: engine.submit("flip", reply=replies.append)})
    r = replies[0]
    assert r["ok"] and r["recaptured"] and r["restarted"] and r["stall_ms"] > 0
    assert frames[2] != frames[1]


def test_swap_to_a_node_loaded_on_demand(tiny_engine):
    engine = engine_for(tiny_engine, seconds=0.01)
    replies, got = [], threading.Event()
    spec = {"type": "test_const_cond", "params": {"value": -0.5}, "in": {"text": "$slots.prompt"}}
    frames = []
    engine.start_session(lambda b: frames.append(b.index))
    engine.request_swap("cond", "fresh", spec=spec, reply=lambda r: (replies.append(r), got.set()))
    assert got.wait(10)  # loaded in the background, swapped at a boundary while the session streamed
    n = len(frames)
    time.sleep(0.1)
    assert len(frames) > n  # still streaming after the swap
    assert replies[0]["ok"] and replies[0]["now"] == "fresh" and engine.nodes["cond"].name == "fresh"
    engine.stop(timeout=5)
    assert engine.nodes["cond"] is engine.plan.nodes["cond"]  # the swap ended with the session
    with pytest.raises(SessionError, match="has no input 'nope'"):
        engine.request_swap("cond", "broken", spec={"type": "test_const_cond", "in": {"nope": "$slots.prompt"}})


def test_tiered_hot_path_swap_serves_at_once_and_swapping_back_reuses_the_compiled_tier(tiny_engine):
    """With a tiered start a hot-path swap waits for no compile (the new node serves eagerly while its compiled
    tier builds), and the session's end swaps back to the executor already built for the declared nodes."""
    import torch

    torch._dynamo.reset()  # compiled code of earlier tests' segments must not be found again: compiles are counted
    engine = engine_for(tiny_engine, compile="compile", compile_backend="aot_eager", start="tiered")
    declared = engine.executor
    assert declared.wait(120)
    replies = []
    frames = run(engine, 4, {1: lambda: engine.submit("flip", reply=replies.append)})
    assert replies[0]["ok"] and replies[0]["recaptured"] and frames[2] != frames[1]
    swapped = [t for t in engine._tiers.values() if t is not declared]
    assert len(swapped) == 1 and swapped[0].quick is not None or swapped[0].serving == "compiled"
    assert engine.executor is declared and declared.serving == "compiled"  # back, compiled, nothing rebuilt
    swapped[0].wait(120)
    assert run(engine, 2, {}) and declared.compiled.recompiles == 0
