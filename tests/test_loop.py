"""Sessions: commands at block boundaries, on-change runs, node errors, stop, watchdog, wrap."""
import threading
import time

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from reactor_graph.errors import CommandError, SessionError
from reactor_graph.node import Node, Port, register, should_stop


@register("test_boom")
class Boom(Node):
    """Passes frames through; raises on the block given by `at` (when armed)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        at: int = 2

    inputs = {"frames": Port("tensor", "float", ("T", 3, "H", "W"))}
    outputs = {"frames": Port("tensor", "float", ("T", 3, "H", "W"))}
    every_block = True
    armed = True

    def reset(self):
        self.count = 0

    def load(self, device, dtype):
        super().load(device, dtype)
        self.reset()

    def forward(self, frames):
        self.count += 1
        if Boom.armed and self.count == self.params.at:
            raise RuntimeError("kaboom")
        return {"frames": frames}


@register("test_stubborn")
class Stubborn(Node):
    """Sleeps inside forward; polls should_stop() only when `polite`."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        polite: bool = True
        seconds: float = 0.5

    inputs = {"frames": Port("tensor", "float", ("T", 3, "H", "W"))}
    outputs = {"frames": Port("tensor", "float", ("T", 3, "H", "W"))}
    every_block = True
    started = threading.Event()

    def forward(self, frames):
        Stubborn.started.set()
        end = time.monotonic() + self.params.seconds
        while time.monotonic() < end:
            if self.params.polite and should_stop():
                break
            time.sleep(0.01)
        return {"frames": frames}


def with_filter(tiny_yaml, node_yaml):
    return tiny_yaml.replace("    in: {frames: decode.frames}\n", "    in: {frames: filt.frames}\n") + \
        "  filt:\n" + node_yaml + "    in: {frames: decode.frames}\n"


def collect(engine, **kw):
    blocks = []
    res = engine.run_session(blocks.append, **kw)
    return res, blocks


def test_session_produces_blocks_of_the_declared_size(tiny_engine):
    res, blocks = collect(tiny_engine(), max_blocks=3)
    assert res.ok and res.blocks == 3 and res.reason == "finished"
    assert [b.index for b in blocks] == [0, 1, 2]
    assert blocks[0].video().shape == (2, 48, 32)  # [T, H*3/2, W] yuv420p
    assert blocks[0].rgb().shape == (2, 32, 32, 3)


def test_bad_command_params_rejected_without_touching_any_slot(tiny_engine):
    engine = tiny_engine()
    before = (dict(engine.slots.values), dict(engine.slots.versions))
    with pytest.raises(CommandError) as info:
        engine.submit("set_prompt", {"prompt": ""})
    assert info.value.field == "prompt" and "at least 1 character" in str(info.value)
    with pytest.raises(CommandError) as info:
        engine.submit("set_prompt", {"prompt": "x", "colour": "red"})
    assert info.value.field == "colour" and "unknown parameter" in str(info.value)
    with pytest.raises(CommandError) as info:
        engine.submit("set_promt", {"prompt": "x"})
    assert "did you mean 'set_prompt'" in str(info.value)
    assert engine.commands.drain() == []
    assert (engine.slots.values, engine.slots.versions) == before


def test_prompt_change_reruns_the_encoder_once(tiny_engine):
    engine = tiny_engine()
    calls = []
    cond = engine.nodes["cond"]
    original = cond.forward
    cond.forward = lambda **kw: (calls.append(kw["text"]), original(**kw))[1]
    submitted = threading.Event()

    def on_block(block):
        if block.index == 2:  # from another thread, as a server would
            t = threading.Thread(target=lambda: (engine.submit("set_prompt", {"prompt": "a blue square"}),
                                                 submitted.set()))
            t.start()
            t.join()

    engine.run_session(on_block, max_blocks=6)
    assert submitted.is_set()
    assert calls == ["a red circle", "a blue square"]


def test_slot_change_changes_the_frames_from_the_next_block(tiny_engine):
    def run(change_at):
        engine = tiny_engine()
        frames = []

        def on_block(b):
            frames.append(b.video().copy())
            if b.index == change_at:
                engine.submit("set_prompt", {"prompt": "a green triangle moving up"})

        engine.run_session(on_block, max_blocks=4)
        return frames

    base, changed = run(change_at=99), run(change_at=1)
    assert all((a == b).all() for a, b in zip(base[:2], changed[:2]))
    assert not (base[2] == changed[2]).all()


def test_node_that_raises_ends_session_and_next_session_runs(tiny_engine, tiny_yaml):
    engine = tiny_engine(with_filter(tiny_yaml, "    type: test_boom\n    params: {at: 2}\n"))
    Boom.armed = True
    res, blocks = collect(engine, max_blocks=5)
    assert res.reason == "error" and res.node == "filt" and len(blocks) == 1
    assert "node 'filt' (test_boom) failed in forward: RuntimeError: kaboom" in res.error
    assert engine.nodes["denoise"].cache_k.abs().sum() == 0  # every node was reset
    Boom.armed = False
    res2, blocks2 = collect(engine, max_blocks=3)
    assert res2.ok and len(blocks2) == 3


def test_stop_is_honoured_within_one_block(tiny_engine, tiny_yaml):
    engine = tiny_engine(with_filter(tiny_yaml, "    type: test_stubborn\n    params: {seconds: 0.2, polite: false}\n"))
    done = threading.Event()
    result = {}
    Stubborn.started.clear()
    blocks = []
    engine.start_session(blocks.append, on_end=lambda r: (result.update(r=r), done.set()))
    assert Stubborn.started.wait(5)
    t0 = time.monotonic()
    engine.stop(timeout=5)
    assert time.monotonic() - t0 < 0.5  # at most the rest of one 0.2 s block
    assert done.wait(1) and result["r"].reason == "stopped"
    n = len(blocks)
    time.sleep(0.3)
    assert len(blocks) == n  # nothing after the stop


def test_long_node_sees_should_stop(tiny_engine, tiny_yaml):
    engine = tiny_engine(with_filter(tiny_yaml, "    type: test_stubborn\n    params: {seconds: 30, polite: true}\n"))
    Stubborn.started.clear()
    engine.start_session(lambda b: None)
    assert Stubborn.started.wait(5)
    t0 = time.monotonic()
    engine.stop(timeout=5)
    assert time.monotonic() - t0 < 1.0


def test_watchdog_names_a_node_that_does_not_stop(tiny_engine, tiny_yaml):
    engine = tiny_engine(with_filter(tiny_yaml, "    type: test_stubborn\n    params: {seconds: 1.5, polite: false}\n"))
    Stubborn.started.clear()
    engine.start_session(lambda b: None)
    assert Stubborn.started.wait(5)
    with pytest.raises(SessionError, match="watchdog.*node 'filt'"):
        engine.stop(timeout=0.1)
    with pytest.raises(SessionError, match="still running"):
        engine.start_session(lambda b: None)
    engine.stop(timeout=5)  # it does end eventually, and then the engine is free again
    res, blocks = collect(engine, max_blocks=1)
    assert res.ok


def test_finite_graph_wraps(tiny_engine, tiny_yaml):
    engine = tiny_engine(tiny_yaml.replace("fps: 16", "fps: 16\nwrap_blocks: 2"))
    res, blocks = collect(engine, max_blocks=4)
    assert res.ok and len(blocks) == 4
    assert (blocks[0].video() == blocks[2].video()).all() and (blocks[1].video() == blocks[3].video()).all()
    assert not (blocks[0].video() == blocks[1].video()).all()


def test_builtin_reset_restarts_sequence_and_slots(tiny_engine):
    engine = tiny_engine()
    frames = []

    def on_block(b):
        frames.append(b.video().copy())
        if b.index == 0:
            engine.submit("set_prompt", {"prompt": "a blue square"})
        if b.index == 2:
            engine.submit("reset")

    engine.run_session(on_block, max_blocks=4)
    assert engine.slots.values["prompt"] == "a red circle"
    assert (frames[3] == frames[0]).all()


def test_consumer_failure_ends_session_not_engine(tiny_engine):
    engine = tiny_engine()

    def on_block(b):
        raise ConnectionResetError("client went away")

    res = engine.run_session(on_block, max_blocks=3)
    assert res.reason == "sink" and "client went away" in res.error
    assert collect(engine, max_blocks=1)[0].ok


def test_kv_cache_phases_are_bounded(tiny_engine):
    engine = tiny_engine()
    assert [engine.phases(b)["denoise"] for b in range(5)] == [0, 1, 2, 2, 2]
    assert engine.nodes["denoise"].num_phases() == 3
    ptr = engine.nodes["denoise"].cache_k.data_ptr()
    collect(engine, max_blocks=4)
    assert engine.nodes["denoise"].cache_k.data_ptr() == ptr
