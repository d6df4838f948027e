"""A VideoModel class as one graph node (`type: reactor_model`), run by the engine's own loop."""
import pytest

from reactor_graph.errors import GraphError
from reactor_graph.loop import Engine
from reactor_graph.plan import load_plan

from .conftest import MODELS
from .models.prompt_model import colour_of

GRAPH = """\
reactor-graph: 1
name: wrapped
fps: 16
size: [{size}, {size}]
device: cpu
slots:
  prompt: {{type: str, default: "a red circle"}}
commands:
  set_prompt:
    params: {{prompt: {{type: str, min_length: 1}}}}
    set: {{prompt: $prompt}}
nodes:
  model:
    type: reactor_model
    params: {params}
{inputs}  out:
    type: emit
    params: {{format: {fmt}}}
    in: {{frames: model.frames}}
"""


def graph(write_graph, params, size=16, fmt="rgb24", inputs=""):
    params = {"path": str(MODELS), **params}
    flow = "{" + ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in params.items()) + "}"
    text = GRAPH.format(size=size, params=flow.replace("'", '"'), fmt=fmt, inputs=inputs)
    return write_graph(text)


def engine(path):
    return Engine(load_plan(path)).load()


PROMPT = {"class": "prompt_model:PromptModel", "args": {"size": 16, "frames_per_block": 3}, "frames": 2,
          "commands": {"prompt": "set_prompt"}}
BIND = "    in: {prompt: $slots.prompt}\n"


def test_model_node_streams_through_the_engine(write_graph):
    eng = engine(graph(write_graph, PROMPT, inputs=BIND))
    node = eng.nodes["model"]
    assert node.ports()[1]["frames"].shape == (2, 3, 16, 16)
    assert "model" in eng.plan.hot  # every block
    assert [c["name"] for c in node.commands()] == ["set_prompt"]
    blocks = []
    res = eng.run_session(blocks.append, max_blocks=4)
    assert res.ok and res.blocks == 4
    assert blocks[0].video().shape == (2, 16, 16, 3)  # the model's 3-frame blocks regrouped into 2
    assert tuple(blocks[-1].rgb()[0, 0, 0]) == colour_of("a red circle")
    assert not node._runner.busy and node._ctx is None and node.model.sessions == 1  # the engine's reset ended the model's session


def test_slot_bound_input_calls_the_model_command(write_graph):
    eng = engine(graph(write_graph, PROMPT, inputs=BIND))
    blocks = []

    def before(i):
        if i == 2:
            eng.submit("set_prompt", {"prompt": "a blue square"})

    res = eng.run_session(blocks.append, max_blocks=10, before_block=before)
    assert res.ok
    assert tuple(blocks[0].rgb()[0, 0, 0]) == colour_of("a red circle")
    assert tuple(blocks[-1].rgb()[-1, 0, 0]) == colour_of("a blue square")  # after the buffered frames
    assert "a blue square" in eng.nodes["model"].model.read_log


def test_engine_reset_command_restarts_the_model_session(write_graph):
    eng = engine(graph(write_graph, PROMPT, inputs=BIND))
    res = eng.run_session(lambda b: None, max_blocks=4, before_block=lambda i: i == 2 and eng.submit("reset"))
    assert res.ok and eng.nodes["model"].model.sessions == 2


def test_direct_command_call_validates(write_graph):
    eng = engine(graph(write_graph, PROMPT, inputs=BIND))
    node = eng.nodes["model"]
    assert node.call_command("set_prompt", {"prompt": ""})["ok"] is False
    assert node.call_command("nope")["error"].startswith("unknown command 'nope'")


def test_a_finite_model_wraps_in_the_graph(write_graph):
    eng = engine(graph(write_graph, {"class": "finite_model:OneShotClip", "args": {"length": 3}, "frames": 2}))
    blocks = []
    assert eng.run_session(blocks.append, max_blocks=3).ok
    values = [int(v) for b in blocks for v in b.rgb()[:, 0, 0, 0]]
    assert values == [10, 20, 30, 10, 20, 30]


def test_model_error_ends_the_graph_session_naming_the_node(write_graph):
    eng = engine(graph(write_graph, {"class": "faulty_model:FaultyModel", "args": {"fail_at": 4}, "frames": 2}))
    res = eng.run_session(lambda b: None, max_blocks=10)
    assert res.reason == "error" and res.node == "model"
    assert "FaultyModel.start_session() raised RuntimeError: CUDA out of memory (pretend)" in res.error
    assert eng.run_session(lambda b: None, max_blocks=3).ok  # it raises once; the next session works


def test_model_frames_of_another_size_are_refused(write_graph):
    eng = engine(graph(write_graph, {"class": "finite_model:LoopingClip", "args": {"size": 16}, "frames": 1},
                       size=32))
    res = eng.run_session(lambda b: None, max_blocks=2)
    assert res.reason == "error" and "16x16 (HxW) frames, but the graph's size is 32x32" in res.error


def test_float_output_into_yuv_emit(write_graph):
    eng = engine(graph(write_graph, {"class": "pipeline_model:PipelineModel", "args": {"size": [16, 16]},
                                     "frames": 2, "output": "float"}, fmt="yuv420p"))
    blocks = []
    assert eng.run_session(blocks.append, max_blocks=2).ok
    assert blocks[0].video().shape == (2, 24, 16)


@pytest.mark.parametrize("params, match", [
    ({"class": "prompt_model:Nope", "frames": 2}, r"nodes\.model\.params: reactor_model: module 'prompt_model' "
                                                  r"has no 'Nope'"),
    ({"class": "prompt_model:PromptModel", "frames": 2, "commands": {"p": "set_promt"}},
     r"commands\.p: PromptModel has no command 'set_promt'; its commands: set_prompt"),
    ({"class": "faulty_model:FaultyModel", "frames": 2, "args": {"fail_att": 1}},
     r"takes no argument 'fail_att'"),
])
def test_bad_node_params_are_graph_errors(write_graph, params, match):
    with pytest.raises(GraphError, match=match):
        load_plan(graph(write_graph, params))


def test_unbound_command_port_is_reported(write_graph):
    with pytest.raises(GraphError, match="input 'prompt' of node 'model' .* is not bound"):
        load_plan(graph(write_graph, PROMPT))
