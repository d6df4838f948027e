"""Tiered start: serving begins on the quick tier, the compiled tier takes over at a block boundary with the
same frames, and nothing compiles after the switch."""
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from reactor_graph.tiers import TieredHotPath, warm_up_copies

WAN_TINY = (Path(__file__).resolve().parents[1] / "graphs" / "wan_tiny.yaml").read_text()


def run(engine, blocks, on_index=None):
    out = []

    def on_block(b):
        out.append(b.video().astype(np.int16))
        if on_index:
            on_index(b.index)

    res = engine.run_session(on_block, max_blocks=blocks)
    assert res.ok, res.error
    return out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo keeps compiled code per code object for the whole process: an earlier test's compile of the same
    segment would be found again, and these tests count what the compiled tier itself compiles."""
    import sys

    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    yield


@pytest.fixture
def gated_backend(monkeypatch):
    """The background compile waits on `release` (so a test sees serving start before it is ready)."""
    import reactor_graph.compile as compile_mod

    release, real = threading.Event(), compile_mod.compile_function

    def gated(fn, backend, counted=None):
        def counted_after_release():
            release.wait(60)
            if counted:
                counted()
        return real(fn, backend, counted_after_release)

    monkeypatch.setattr(compile_mod, "compile_function", gated)
    return release


def test_serving_starts_before_the_compiled_tier_and_switches_at_a_block_boundary(tiny_engine, gated_backend):
    eager = run(tiny_engine(), 8, None)
    engine = tiny_engine(compile="compile", compile_backend="eager", start="tiered")
    tier = engine.executor
    assert isinstance(tier, TieredHotPath)
    assert engine.serving()["serving"] == "eager"  # load returned while nothing was compiled yet
    assert engine.compiling  # `run` leaves without waiting for it at shutdown
    served_before = []

    def at(index):
        if index == 2:  # three blocks streamed before the compiled tier exists; now let it finish
            served_before.append(engine.serving()["serving"])
            gated_backend.set()
            assert tier.wait(120)

    tiered = run(engine, 8, at)
    assert served_before == ["eager"] and not engine.compiling
    assert engine.serving()["serving"] == "compiled" and engine.serving()["error"] is None
    assert tier.switched_block == 3  # the first block after it was ready: the switch is at a boundary
    compiled = tier.compiled
    at_switch = dict(compiled.compiles)
    assert compiled.recompiles == 0 and at_switch
    # the frames of the whole session, across the switch, are those of eager
    for a, b in zip(eager, tiered):
        assert np.abs(a - b).max() <= 1
    # a second session runs on the compiled tier from its first block, and compiles nothing
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(eager, run(engine, 8)))
    assert compiled.recompiles == 0 and compiled.compiles == at_switch


def test_the_background_build_leaves_the_live_state_alone(tiny_engine):
    """The compile's warm-up runs on copies: the live nodes' tensors are not written by it."""
    engine = tiny_engine(compile="compile", compile_backend="eager", start="tiered")
    live = engine.nodes["denoise"]
    before = {k: v.clone() for k, v in vars(live).items() if isinstance(v, torch.Tensor)}
    assert before  # the KV cache
    assert engine.executor.wait(120)
    for k, v in before.items():
        assert torch.equal(getattr(live, k), v), k


def test_warm_up_copies_share_weights_and_copy_state(tiny_engine):
    engine = tiny_engine()
    shadow = warm_up_copies(engine.hot)
    live, copy = engine.nodes["denoise"], shadow.nodes["denoise"]
    assert copy is not live
    assert all(a is b for a, b in zip(live.model.parameters(), copy.model.parameters()))
    assert copy.model is not live.model
    state = [k for k, v in vars(live).items() if isinstance(v, torch.Tensor)]
    assert state and all(getattr(copy, k).data_ptr() != getattr(live, k).data_ptr() for k in state)
    assert set(shadow.order) == set(engine.hot.order) and shadow.bindings == engine.hot.bindings


def test_a_failed_build_keeps_serving_the_quick_tier(tiny_engine, monkeypatch, caplog):
    import reactor_graph.tiers as tiers

    def broken(hot):
        raise RuntimeError("cannot copy this node")

    monkeypatch.setattr(tiers, "warm_up_copies", broken)
    engine = tiny_engine(compile="compile", compile_backend="eager", start="tiered")
    assert not engine.executor.wait(60)
    state = engine.serving()
    assert state["serving"] == "eager" and "cannot copy this node" in state["error"]
    assert "could not be built" in caplog.text
    assert len(run(engine, 3)) == 3  # the stream goes on


def test_a_probe_or_full_start_builds_no_tier(tiny_engine):
    engine = tiny_engine(compile="compile", compile_backend="eager")
    assert not isinstance(engine.executor, TieredHotPath)
    assert engine.serving() == {"mode": "compile", "serving": "compiled", "progress": None, "error": None}


def _gpu_session_across_the_switch(engine, blocks=8, wait_at=2):
    """A session on a tiered GPU engine that waits at `wait_at` for the compiled tier: every block arrives, in
    order, and the switch is the block after."""
    tier, got = engine.executor, []

    def on_block(b):
        got.append((b.index, b.video().astype(np.int16)))
        if b.index == wait_at:
            assert tier.wait(300), tier.error

    res = engine.run_session(on_block, max_blocks=blocks)
    assert res.ok, res.error
    assert [i for i, _ in got] == list(range(blocks))  # no block dropped or repeated across the switch
    assert tier.serving == "compiled" and tier.switched_block == wait_at + 1
    assert tier.compiled.recompiles == 0
    return [f for _, f in got]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_tier_replaces_the_captured_eager_tier_on_gpu(tiny_engine):
    eager = run(tiny_engine(device="cuda", dtype="float32", compile="eager"), 8)
    engine = tiny_engine(device="cuda", dtype="float32", compile="cudagraph", start="tiered")
    assert engine.serving()["serving"] == "eager-captured"
    tiered = _gpu_session_across_the_switch(engine)
    for a, b in zip(eager, tiered, strict=True):  # inductor's fused arithmetic: a few levels at most
        assert np.abs(a - b).max() <= 4 and np.abs(a - b).mean() < 0.5
    assert engine.executor.switch_ms is not None
    graphs = dict(engine.executor.compiled.graphs)
    again = run(engine, 8)  # the next session replays the compiled graphs only
    assert {k: id(g) for k, g in engine.executor.compiled.graphs.items()} == {k: id(g) for k, g in graphs.items()}
    assert all(np.abs(a - b).max() <= 4 for a, b in zip(eager, again))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiered_wan_dit_switches_with_its_regions_compiled_once_on_gpu(write_graph):
    from reactor_graph.loop import Engine
    from reactor_graph.plan import load_plan
    path = write_graph(WAN_TINY)
    eager = run(Engine(load_plan(path), device="cuda", dtype="float32", compile="eager").load(), 6)
    engine = Engine(load_plan(path), device="cuda", dtype="float32", compile="cudagraph", start="tiered").load()
    tiered = _gpu_session_across_the_switch(engine, blocks=6)
    assert engine.nodes["dit"].region_compiles == 2  # qkv and finish, shared by the live node and its copy
    for a, b in zip(eager, tiered, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 4 and np.abs(a - b).mean() < 0.5


@pytest.mark.slow  # compiles the tiny DiT's regions and whole hot path
def test_tiered_wan_dit_compile_mode_equals_eager(write_graph):
    from reactor_graph.loop import Engine
    from reactor_graph.plan import load_plan
    path = write_graph(WAN_TINY)
    eager = run(Engine(load_plan(path), device="cpu").load(), 4)
    engine = Engine(load_plan(path), device="cpu", compile="compile", compile_backend="aot_eager",
                    start="tiered").load()
    assert engine.executor.wait(600), engine.executor.error
    assert engine.nodes["dit"].region_compiles == 2
    tiered = run(engine, 4)
    assert engine.executor.switched_block == 0 and engine.executor.recompiles == 0
    for a, b in zip(eager, tiered, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_compile_cache_of_another_build_is_ignored_with_the_reason(tiny_engine, tiny_yaml, tmp_path, caplog,
                                                                  monkeypatch):
    import json
    import logging

    from reactor_graph.compile_cache import CompileCache

    monkeypatch.setenv("REACTOR_GRAPH_CACHE_DIR", str(tmp_path))
    engine = tiny_engine()
    cache = CompileCache(engine.plan, engine.device, "compile")
    other = {**cache.meta, "torch": "0.0.1"}
    (tmp_path / f"{cache.path.stem.rsplit('-', 1)[0]}-0123456789abcdef.json").write_text(json.dumps(other))
    (tmp_path / f"{cache.path.stem.rsplit('-', 1)[0]}-0123456789abcdef.bin").write_bytes(b"not for this torch")
    with caplog.at_level(logging.INFO, logger="reactor_graph"):
        assert cache.load() is False
    assert "ignored: made for torch '0.0.1'" in caplog.text and torch.__version__ in caplog.text
    # another graph (params changed) gets another file
    changed = tiny_engine(tiny_yaml.replace("steps: 2,", "steps: 3,"))
    assert CompileCache(changed.plan, changed.device, "compile").path != cache.path


def test_compile_cache_round_trip(tiny_engine, tmp_path, monkeypatch, caplog):
    """What save wrote, load reads back for the same graph and build (a damaged file is ignored, not fatal)."""
    import logging

    import reactor_graph.compile_cache as cc

    monkeypatch.setenv("REACTOR_GRAPH_CACHE_DIR", str(tmp_path))
    seen = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: seen.append(data))
    engine = tiny_engine()
    assert cc.CompileCache(engine.plan, engine.device, "compile").save() is not None
    assert cc.CompileCache(engine.plan, engine.device, "compile").load() and seen == [b"artifacts"]

    def broken(data):
        raise ValueError("truncated")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", broken)
    with caplog.at_level(logging.INFO, logger="reactor_graph"):
        assert not cc.CompileCache(engine.plan, engine.device, "compile").load()
    assert "could not be read (truncated)" in caplog.text


def test_an_eager_start_of_every_shipped_graph_never_imports_dynamo(tmp_path):
    """Importing Dynamo costs seconds before the first frame; an eager start (and a tiered start's first tier)
    never traces, so loading every built-in node type, running the demo and building a quick tier's executor
    must not import it (a node method marked with torch.compiler.disable at class creation would, and so did
    setting Dynamo's config when any executor was built)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from reactor_graph.node import registry\n"
        "from reactor_graph.loop import Engine\n"
        "from reactor_graph.plan import load_plan\n"
        "types = registry()\n"
        "e = Engine(load_plan('graphs/demo.yaml'), compile='eager').load()\n"
        "e.run_block(0)\n"
        "from reactor_graph.compile import build_executor\n"
        "build_executor(e.hot, 'compile', e.device, 'none')  # as a quick tier's executor is built\n"
        "print(len(types), 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    n, imported = out.stdout.split()
    assert int(n) > 10 and imported == "False", out.stdout


def test_the_background_build_waits_for_the_first_block_or_an_idle_while(monkeypatch):
    """The build shares the GIL with the stream's thread: it starts once the first block has been served, or
    after START_AFTER_S with no block at all (a server waiting for its first client)."""
    from reactor_graph.tiers import TieredHotPath

    started = threading.Event()

    def build(tier):
        started.set()
        raise RuntimeError("no compiled tier in this test")

    tier = TieredHotPath(lambda external, phases, versions=None: {"x": 1}, "eager", build).start()
    assert tier.building and not started.wait(0.3)  # loaded, nothing served yet
    assert tier({}, {}) == {"x": 1}
    assert not started.wait(0.3)  # the first block is being delivered
    tier({}, {})
    assert started.wait(5) and tier.wait(5) is False and "no compiled tier" in tier.error
    assert tier({}, {}) == {"x": 1} and tier.serving == "eager"  # the quick tier goes on

    monkeypatch.setattr(TieredHotPath, "START_AFTER_S", 0.2)
    started.clear()
    idle = TieredHotPath(lambda external, phases, versions=None: {}, "eager", build).start()
    assert started.wait(5)  # no block came: it started anyway
    idle.wait(5)
