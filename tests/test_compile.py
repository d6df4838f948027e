"""Compiled modes: same frames as eager, no recompiles on slot changes, one graph per phase."""
import numpy as np
import pytest
import torch

from reactor_graph.compile import CompiledHotPath


def frames(engine, blocks=5, change_at=None):
    out = []

    def on_block(b):
        out.append(b.video().astype(np.int16))
        if b.index == change_at:
            engine.submit("set_prompt", {"prompt": "a blue square moving right"})

    res = engine.run_session(on_block, max_blocks=blocks)
    assert res.ok, res.error
    return out


def test_compile_mode_matches_eager_without_recompiles(tiny_engine):
    eager = frames(tiny_engine(), change_at=1)
    engine = tiny_engine(compile="compile", compile_backend="aot_eager")
    ex = engine.executor
    assert isinstance(ex, CompiledHotPath) and ex.prologue == []  # noise takes its seed in prepare()
    assert ex.captured == ["noise", "denoise", "decode", "out"]
    n_keys = len(engine.phase_keys())
    assert n_keys == 3 and len(ex.compiles) == 3  # phases 0, 1, 2 of the KV cache: compiled once each
    at_startup = dict(ex.compiles)
    compiled = frames(engine, change_at=1)  # a prompt change mid-session ...
    assert ex.recompiles == 0 and ex.compiles == at_startup  # ... is a copy, not a recompile
    for a, b in zip(eager, compiled):
        assert np.abs(a - b).max() <= 1


def test_cudagraph_on_cpu_says_it_needs_a_gpu_and_falls_back(tiny_engine, caplog):
    engine = tiny_engine(compile="cudagraph")
    assert engine.mode == "eager" and "needs a CUDA GPU" in engine.mode_note
    assert "fell back to eager" in engine.mode_note
    assert frames(engine, blocks=1)


def test_recompile_is_counted_and_reported(tiny_engine, caplog):
    engine = tiny_engine(compile="compile", compile_backend="aot_eager")
    ex = engine.executor
    # Feed the compiled segment an input of another shape: Dynamo must recompile, and we must say so.
    key, phases = ex.key_of(engine.phases(0)), engine.phases(0)
    engine.run_on_change()
    values = ex.run_prologue(engine.external(), phases)
    inputs = ex.segment_inputs(values)
    cond = next(s for s in inputs if s.node == "cond")
    inputs[cond] = torch.zeros(4, 16)
    with torch.inference_mode():
        ex.captures[key].run(inputs)
    assert ex.recompiles == 1 and "recompile" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudagraph_matches_eager_on_gpu(tiny_engine, tiny_yaml):
    eager = frames(tiny_engine(device="cuda", dtype="float32", compile="eager"), change_at=1)
    engine = tiny_engine(device="cuda", dtype="float32", compile="cudagraph")
    ex = engine.executor
    assert len(ex.graphs) == 3
    graphed = frames(engine, change_at=1)
    assert ex.recompiles == 0 and len(ex.graphs) == 3 and ex.replays == 5
    for a, b in zip(eager, graphed):
        assert np.abs(a - b).max() <= 2


def test_replay_check_names_both_sides(tiny_engine):
    from reactor_graph.errors import CaptureError

    engine = tiny_engine(compile="compile", compile_backend="aot_eager")
    ex = engine.executor
    phases = engine.phases(0)
    key = ex.key_of(phases)
    engine.run_on_change()
    inputs = ex.segment_inputs(ex.run_prologue(engine.external(), phases))
    record = ex.captures[key]
    record.static_in = {s: v.clone() for s, v in inputs.items()}  # as capture records them
    cond = next(s for s in inputs if s.node == "cond")
    ex.check(record, inputs)  # same shapes and dtypes: fine
    inputs[cond] = inputs[cond].to(torch.float64)
    with pytest.raises(CaptureError) as info:
        ex.check(record, inputs)
    msg = str(info.value)
    assert "input 'cond.embeds' was captured as float32[8, 16] on cpu but is now float64[8, 16] on cpu" in msg
