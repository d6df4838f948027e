"""Reactor-API models behind ModelHost (the StreamHost protocol): the typical patterns, ported."""
import base64
import threading
import time

import numpy as np
import pytest
import torch

from reactor_graph.compat import ModelHost, VideoModel, get_ctx
from reactor_graph.emit import Block
from reactor_graph.errors import SessionError
from reactor_graph.host import StreamHost

from .conftest import WAIT


def until(pred, timeout=WAIT, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.005)
    raise AssertionError(f"{what} not reached within {timeout}s")


def colour(block: Block):
    return tuple(int(v) for v in block.rgb()[0, 0, 0])


def test_host_meets_the_stream_host_protocol(make_host, collector):
    host = make_host("prompt_model:PromptModel", {"size": 32}, fps=12)
    import inspect

    members = set(StreamHost.__annotations__) | {n for n in vars(StreamHost) if not n.startswith("_")}
    for attr in members:
        assert hasattr(host, attr), attr
    for meth in ("submit", "start_session", "stop"):  # same parameters, same defaults
        want = list(inspect.signature(getattr(StreamHost, meth)).parameters.values())[1:]
        have = list(inspect.signature(getattr(host, meth)).parameters.values())
        assert [(p.name, p.default) for p in have][:len(want)] == [(p.name, p.default) for p in want], meth
        assert all(p.default is not p.empty for p in have[len(want):]), meth  # extras are optional
    assert host.name == "prompt-model" and host.fps == 12 and (host.height, host.width) == (0, 0)
    collector.start(host, max_blocks=3)
    res = collector.wait_end()
    assert res.ok and res.reason == "finished" and res.blocks == 3 and res.node is None
    b = collector.blocks[0]
    assert isinstance(b, Block) and b.format == "yuv420p" and b.video().shape == (2, 48, 32)
    assert (host.height, host.width) == (32, 32)  # fixed by the first block
    assert [x.index for x in collector.blocks] == [0, 1, 2]
    assert host.stats.sessions == 1 and host.stats.blocks == 3 and host.stats.frames == 6
    until(lambda: not host.busy, what="thread end")


def test_prompt_command_changes_what_the_loop_reads(make_host, collector):
    from .models.prompt_model import colour_of

    host = make_host("prompt_model:PromptModel", {"size": 16}, format="rgb24")
    sent = []
    host.on_message = sent.append
    collector.start(host)
    collector.wait_blocks(2)
    assert colour(collector.blocks[0]) == colour_of("a red circle")
    replies = []
    ticket = host.submit("set_prompt", {"prompt": "a blue square"}, reply=replies.append)
    assert ticket.wait(WAIT) == {"ok": True} and replies == [{"ok": True}]
    n = len(collector.blocks)
    collector.wait_blocks(n + 2)
    assert colour(collector.blocks[-1]) == colour_of("a blue square")
    assert "a blue square" in host.model.read_log
    assert sent == [{"type": "prompt", "data": {"prompt": "a blue square"}}]  # get_ctx().send from a command
    host.stop()
    assert collector.wait_end().reason == "stopped"
    assert host.model._prompt == "a red circle"  # the model's own end-of-session cleanup ran


def test_pipeline_setters_called_by_a_mouse_command(make_host, collector):
    host = make_host("pipeline_model:PipelineModel", {"size": [16, 16]}, format="rgb24")
    assert host.fps == 24  # read from the model's _fps
    collector.start(host)
    collector.wait_blocks(1)
    assert host.submit("mouse", {"x": 1.0, "y": 0.0}).wait(WAIT) == {"ok": True}
    n = len(collector.blocks)
    collector.wait_blocks(n + 2)
    r, g, b = colour(collector.blocks[-1])
    assert r == 255 and g == 0 and b == 0
    assert host.submit("pause").wait(WAIT) == {"ok": True}
    time.sleep(0.05)
    n = len(collector.blocks)
    time.sleep(0.1)
    assert len(collector.blocks) == n  # paused: the loop emits nothing
    host.submit("resume").wait(WAIT)
    collector.wait_blocks(n + 1)
    host.stop()  # the pipeline polls get_ctx()._stop_evt
    assert collector.wait_end().reason == "stopped"
    assert host.model._pipeline._mouse == (0.5, 0.5)  # its finally reset the state


def _png_b64(img: np.ndarray) -> str:
    import av

    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = img.shape[1], img.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(img, format="rgb24")) + codec.encode(None)
    return base64.b64encode(b"".join(bytes(p) for p in packets)).decode()


def test_game_controls_starting_image_and_own_reset(make_host, collector):
    host = make_host("game_model:GameModel", {"size": 16, "block": 2}, format="rgb24")  # __init__(self, config)
    schema = {s["name"]: s for s in host.command_schemas()}
    assert schema["control"]["schema"]["properties"]["movement"]["enum"][0] == "forward"
    assert schema["reset"]["description"] == "Back to the start of the level"  # the model's own reset
    collector.start(host)
    collector.wait_blocks(1)
    assert host.submit("control", {"movement": "right", "camera": "up"}).wait(WAIT) == {"ok": True}
    until(lambda: host.model.pos[0] == 14, what="the player reaching the right edge")
    assert host.model.controls == [("right", "up")]

    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :, 2] = 200  # a blue world
    assert host.submit("set_starting_image", {"image_b64": _png_b64(img)}).wait(WAIT) == {"ok": True}
    n = len(collector.blocks)
    collector.wait_blocks(n + 2)
    assert collector.blocks[-1].rgb()[-1, 0, 0].tolist() == [0, 0, 200]

    bad = host.submit("set_starting_image", {"image_b64": _png_b64(np.zeros((8, 8, 3), np.uint8))}).wait(WAIT)
    assert not bad["ok"] and "the image is 8x8" in bad["error"]
    assert host.busy  # a failing command does not end the session

    assert host.submit("reset").wait(WAIT) == {"ok": True}
    assert host.model.pos == [8, 8] and host.model.move == "still"
    host.stop()
    assert collector.wait_end().ok


def test_builtin_reset_restarts_start_session_and_the_stream_goes_on(make_host, collector):
    host = make_host("prompt_model:PromptModel", {"size": 16}, format="rgb24")
    collector.start(host)
    collector.wait_blocks(1)
    host.submit("set_prompt", {"prompt": "changed"}).wait(WAIT)
    assert host.submit("reset").wait(WAIT) == {"ok": True}
    until(lambda: host.model.sessions == 2, what="the model's second start_session()")
    n = len(collector.blocks)
    collector.wait_blocks(n + 2)
    assert host.model.read_log[-1] == "a red circle"  # the model's cleanup restored its default
    indices = [b.index for b in collector.blocks]
    assert indices == list(range(len(indices)))  # one stream: indices continue over the reset
    assert not collector.ended.is_set()
    host.stop()
    assert collector.wait_end().reason == "stopped"


def test_looping_clip_wraps_around(make_host, collector):
    host = make_host("finite_model:LoopingClip", {"length": 5, "size": 16}, format="rgb24")
    collector.start(host, max_blocks=12)
    res = collector.wait_end()
    assert res.reason == "finished" and res.blocks == 12
    values = [int(b.rgb()[0, 0, 0, 0]) for b in collector.blocks]
    assert values == [10, 20, 30, 40, 50] * 2 + [10, 20]


def test_a_session_that_returns_on_its_own_finishes(make_host, collector):
    host = make_host("finite_model:OneShotClip", {"length": 3}, format="rgb24")
    collector.start(host)
    res = collector.wait_end()
    assert res.ok and res.reason == "finished" and res.blocks == 3
    c2 = type(collector)()
    c2.start(host)  # and the next session starts on a fresh call
    assert c2.wait_end().blocks == 3


def test_model_that_waits_for_its_first_prompt(make_host, collector):
    host = make_host("waiting_model:WaitingModel", {"size": 16}, format="rgb24")
    assert host.command_schemas()[0]["description"] == "Change the prompt"  # from the docstring
    collector.start(host)
    time.sleep(0.1)
    assert collector.blocks == [] and host.busy
    host.submit("set_prompt", {"prompt": "hello"}).wait(WAIT)
    collector.wait_blocks(1)
    assert int(collector.blocks[0].rgb()[0, 0, 0, 0]) == len("hello")
    host.stop()
    collector.wait_end()


def test_error_mid_session_ends_it_and_the_next_session_works(make_host, collector):
    host = make_host("faulty_model:FaultyModel", {"fail_at": 3}, format="rgb24")
    collector.start(host)
    res = collector.wait_end()
    assert not res.ok and res.reason == "error" and res.blocks == 3
    assert "FaultyModel.start_session(): RuntimeError: CUDA out of memory (pretend)" in res.error
    assert "faulty_model.py" in res.error and "_step" in res.error  # where it was raised
    assert host.stats.errors == 1
    until(lambda: not host.busy, what="thread end")
    c2 = type(collector)()
    c2.start(host, max_blocks=5)
    res2 = c2.wait_end()
    assert res2.ok and res2.blocks == 5


def test_a_failing_command_is_reported_and_the_session_goes_on(make_host, collector):
    host = make_host("faulty_model:FaultyModel", {"fail_at": -1}, format="rgb24")
    collector.start(host)
    collector.wait_blocks(1)
    got = host.submit("explode", {"how": "loudly"}).wait(WAIT)
    assert got["ok"] is False and "ValueError: exploded loudly" in got["error"]
    n = len(collector.blocks)
    collector.wait_blocks(n + 2)
    assert host.busy and not collector.ended.is_set()
    host.stop()
    assert collector.wait_end().ok


def test_watchdog_names_where_the_model_is_stuck(make_host, collector):
    host = make_host("faulty_model:StubbornModel", {"seconds": 0.6})
    collector.start(host)
    collector.wait_blocks(1)
    with pytest.raises(SessionError, match=r"StubbornModel.start_session\(\) did not return.*faulty_model.py:\d+ "
                                           r"in _long_denoise"):
        host.stop(timeout=0.1)
    with pytest.raises(SessionError, match="still running"):
        host.start_session(lambda b: None)
    collector.wait_end()  # it does end, later
    until(lambda: not host.busy, what="thread end")
    host.stop()


def test_a_block_of_another_size_ends_the_session_clearly(make_host, collector):
    host = make_host("faulty_model:SizeChanger")
    collector.start(host)
    res = collector.wait_end()
    assert res.reason == "error" and res.blocks == 1
    assert "32x32 (HxW) frames, but this stream is 16x16" in res.error


def test_declared_size_is_enforced_from_the_first_block(make_host, collector):
    host = make_host("finite_model:OneShotClip", {"size": 16}, size=(32, 32))
    assert (host.height, host.width) == (32, 32)
    collector.start(host)
    assert "this stream is 32x32" in collector.wait_end().error


def test_consumer_failure_ends_the_session_with_reason_sink(make_host):
    host = make_host("prompt_model:PromptModel", {"size": 16})
    done = threading.Event()
    results = []

    def on_block(block):
        raise ConnectionError("peer gone")

    host.start_session(on_block, lambda r: (results.append(r), done.set()))
    assert done.wait(WAIT)
    assert results[0].reason == "sink" and "peer gone" in results[0].error


def test_float_torch_blocks_convert_like_the_emit_node():
    class Grey(VideoModel):
        def start_session(self):
            get_ctx().emit_block(torch.zeros(2, 3, 8, 8))  # float 0.0 is mid grey

    host = ModelHost(Grey(), format="rgb24")
    blocks = []
    res = host.run_session(blocks.append, timeout=WAIT)
    assert res.ok and blocks[0].rgb().shape == (2, 8, 8, 3) and int(blocks[0].rgb()[0, 0, 0, 0]) == 128


def test_session_busy_and_stop_without_a_session(make_host, collector):
    host = make_host("prompt_model:PromptModel", {"size": 16})
    host.stop()  # nothing running: a no-op
    collector.start(host)
    with pytest.raises(SessionError, match="still running"):
        host.start_session(lambda b: None)
    host.stop()
    assert collector.wait_end().reason == "stopped"


def test_scripted_commands_apply_exactly_before_their_block(make_host):
    """run_session(before_block=...) as render uses it: a command for block n shows from block n on."""
    from .models.prompt_model import colour_of

    host = make_host("prompt_model:PromptModel", {"size": 16}, format="rgb24")
    script = {0: "first", 3: "second", 4: "third"}
    blocks = []

    def before(n):
        if n in script:
            host.submit("set_prompt", {"prompt": script[n]})

    res = host.run_session(blocks.append, max_blocks=6, before_block=before, timeout=WAIT)
    assert res.ok and res.blocks == 6
    got = [colour(b) for b in blocks]
    want = [colour_of(p) for p in ["first"] * 3 + ["second", "third", "third"]]
    assert got == want


def test_late_blocks_after_the_session_are_dropped(make_host, collector):
    """A helper thread that outlives start_session() cannot push blocks into a finished session."""
    import numpy as np

    leaked = []

    class Leaky(VideoModel):
        def start_session(self):
            ctx = get_ctx()
            ctx.emit_block(np.zeros((8, 8, 3), np.uint8))
            leaked.append(ctx)

    host = ModelHost(Leaky(), format="rgb24")
    res = host.run_session(collector.on_block, timeout=WAIT)
    assert res.blocks == 1 and leaked[0].should_stop()
    leaked[0].emit_block(np.zeros((8, 8, 3), np.uint8))
    assert len(collector.blocks) == 1


def test_scripted_reset_and_script_validation(make_host, tmp_path):
    """A reset in a command script restarts the model's session without deadlocking the script's wait; the
    script checker render uses (host.commands.validate) works on a ModelHost."""
    from reactor_graph.errors import GraphError
    from reactor_graph.render import load_script

    host = make_host("prompt_model:PromptModel", {"size": 16}, format="rgb24")
    script = tmp_path / "script.yaml"
    script.write_text("- {block: 1, command: set_prompt, params: {prompt: x}}\n- {block: 2, command: reset}\n")
    items = load_script(script, host)
    assert [i.command for i in items] == ["set_prompt", "reset"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {block: 1, command: set_prompt, params: {prompt: ''}}\n")
    with pytest.raises(GraphError, match="set_prompt.prompt"):
        load_script(bad, host)

    t0 = time.monotonic()
    res = host.run_session(lambda b: None, max_blocks=5,
                           before_block=lambda n: [host.submit(i.command, i.params) for i in items if i.block == n],
                           timeout=WAIT)
    assert res.ok and res.blocks == 5 and host.model.sessions == 2
    assert time.monotonic() - t0 < 2.0  # no wait on itself
