"""Headless render: frames, size, and timed commands from a script."""
import av
import numpy as np
import pytest

from reactor_graph.errors import GraphError
from reactor_graph.render import load_script, render


def decode(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_render_writes_expected_frames_at_declared_size(tiny_engine, tmp_path):
    out = tmp_path / "out.mp4"
    result, written = render(tiny_engine(), out, blocks=5)
    frames = decode(out)
    assert result.ok and written == 10 and len(frames) == 10
    assert frames[0].shape == (32, 32, 3)
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 16


def test_script_commands_apply_at_their_block(tiny_engine, tmp_path):
    script = tmp_path / "script.yaml"
    script.write_text("- {block: 2, command: set_prompt, params: {prompt: a green square}}\n"
                      "- {time: 0.25, command: set_prompt, params: {prompt: a blue circle}}\n")
    engine = tiny_engine()
    seen = []
    original = engine.nodes["cond"].forward
    engine.nodes["cond"].forward = lambda **kw: (seen.append(kw["text"]), original(**kw))[1]
    items = load_script(script, engine)
    render(engine, tmp_path / "o.mp4", blocks=4, script=items)
    # block 2 starts at frame 4 = 0.25 s at 16 fps: both apply at that boundary in script order, and the
    # encoder runs once, on the final value
    assert seen == ["a red circle", "a blue circle"]


def test_bad_script_reports_each_entry(tiny_engine, tmp_path):
    script = tmp_path / "bad.yaml"
    script.write_text("- {block: 1, command: set_prompt, params: {prompt: ''}}\n"
                      "- {command: set_prompt, params: {prompt: ok}}\n"
                      "- {block: 3, command: nope}\n")
    with pytest.raises(GraphError) as info:
        load_script(script, tiny_engine())
    issues = info.value.issues
    assert [i.line for i in issues] == [1, 2, 3]
    assert "prompt" in issues[0].message and "exactly one of 'block' or 'time'" in issues[1].message
    assert "unknown command" in issues[2].message
