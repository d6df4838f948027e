"""Every load-time rule of the graph file rejects a bad file with the right place and wording."""
import pytest

from reactor_graph.errors import GraphError
from reactor_graph.plan import build_plan, load_plan
from reactor_graph.spec import load_spec


def errors(text: str) -> GraphError:
    with pytest.raises(GraphError) as info:
        build_plan(load_spec("g.yaml", text=text))
    return info.value


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def only(err: GraphError):
    assert len(err.issues) == 1, err
    return err.issues[0]


def test_demo_and_tiny_graphs_plan(tiny_yaml):
    plan = build_plan(load_spec("g.yaml", text=tiny_yaml))
    assert list(plan.on_change) == ["cond"]
    assert list(plan.hot) == ["noise", "denoise", "decode", "out"]
    assert plan.output == "out"
    from reactor_graph.cli import demo_path

    assert load_plan(demo_path()).name == "shapes"


def test_unknown_key_names_line_and_near_name(tiny_yaml):
    text = tiny_yaml.replace("fps: 16", "fsp: 16")
    issue = errors(text).issues[0]
    assert issue.line == line_of(text, "fsp")
    assert "unknown key 'fsp'" in issue.message and "did you mean 'fps'" in issue.message


def test_unknown_key_inside_a_node(tiny_yaml):
    text = tiny_yaml.replace("    type: noise", "    type: noise\n    prams: {}")
    issue = only(errors(text))
    assert issue.key == "nodes.noise.prams" and issue.line == line_of(text, "prams")
    assert "did you mean 'params'" in issue.message


def test_unknown_node_type_lists_near_names(tiny_yaml):
    text = tiny_yaml.replace("type: text_encoder", "type: text_encodr")
    issue = only(errors(text))
    assert issue.key == "nodes.cond.type" and issue.line == line_of(text, "text_encodr")
    assert "unknown node type 'text_encodr'" in issue.message and "did you mean 'text_encoder'" in issue.message


def test_port_that_does_not_exist(tiny_yaml):
    text = tiny_yaml.replace("in: {cond: cond.embeds, noise: noise.noise}", "in: {cond: cond.embed, noise: noise.noise}")
    issue = only(errors(text))
    assert issue.key == "nodes.denoise.in.cond"
    assert "no output 'embed'" in issue.message and "did you mean 'embeds'" in issue.message


def test_unknown_input_port(tiny_yaml):
    text = tiny_yaml.replace("in: {frames: decode.frames}", "in: {frames: decode.frames, extra: decode.frames}")
    issue = only(errors(text))
    assert issue.key == "nodes.out.in.extra" and "has no input 'extra'" in issue.message


def test_unbound_input(tiny_yaml):
    text = tiny_yaml.replace("in: {cond: cond.embeds, noise: noise.noise}", "in: {cond: cond.embeds}")
    issue = only(errors(text))
    assert "input 'noise' of node 'denoise' (causal_denoiser) is not bound" in issue.message
    assert issue.line == line_of(text, "in: {cond: cond.embeds}")


def test_shape_mismatch_between_output_and_input(tiny_yaml):
    text = tiny_yaml.replace("shape: [4, 2, 4, 4]", "shape: [4, 2, 8, 8]")
    issue = only(errors(text))
    assert issue.key == "nodes.denoise.in.noise" and "shape mismatch" in issue.message
    assert "4 2 8 8" in issue.message and "4 2 4 4" in issue.message


def test_kind_mismatch_slot_to_port(tiny_yaml):
    text = tiny_yaml.replace("in: {text: $slots.prompt}", "in: {text: $slots.seed}")
    issue = only(errors(text))
    assert issue.key == "nodes.cond.in.text" and "kind mismatch" in issue.message


def test_cycle_names_its_nodes(write_graph):
    text = """\
reactor-graph: 1
name: cyc
size: [32, 32]
nodes:
  a: {type: latent_decoder, params: {upsample: 8}, in: {latents: b.frames}}
  b: {type: latent_decoder, params: {upsample: 8}, in: {latents: a.frames}}
  out: {type: emit, in: {frames: a.frames}}
"""
    msgs = " ".join(i.message for i in errors(text).issues)
    assert "cycle:" in msgs and ("a -> b -> a" in msgs or "b -> a -> b" in msgs)


def test_command_writing_missing_slot_and_wrong_type(tiny_yaml):
    text = tiny_yaml.replace("set: {prompt: $prompt}", "set: {promt: $prompt, seed: $prompt}")
    err = errors(text)
    msgs = {i.key: i.message for i in err.issues}
    assert "writes slot 'promt' which does not exist" in msgs["commands.set_prompt.set.promt"]
    assert "did you mean 'prompt'" in msgs["commands.set_prompt.set.promt"]
    assert "holds int but parameter 'prompt' is str" in msgs["commands.set_prompt.set.seed"]
    assert len(err.issues) == 2  # several errors in one file are reported together


def test_node_params_failing_pydantic_shown_at_yaml_location(tiny_yaml):
    text = tiny_yaml.replace("steps: 2", "steps: -1")
    issue = only(errors(text))
    assert issue.key == "nodes.denoise.params.steps" and issue.line == line_of(text, "steps: -1")
    assert "greater than or equal to 1" in issue.message


def test_swap_whose_replacement_differs_is_refused(tiny_yaml):
    text = tiny_yaml + """\
alternatives:
  wide_cond:
    type: text_encoder
    params: {dim: 32, max_tokens: 8, heads: 2}
    in: {text: $slots.prompt}
""".replace("alternatives", "alternatives") 
    text = text.replace("    set: {prompt: $prompt}", "    set: {prompt: $prompt}\n  use_wide:\n    swap: {cond: wide_cond}")
    issue = only(errors(text))
    assert issue.key == "commands.use_wide.swap.cond"
    assert "output 'embeds' differs" in issue.message and "(8 16)" in issue.message and "(8 32)" in issue.message


def test_yaml_syntax_error_has_line():
    err = errors("reactor-graph: 1\nname: x\nnodes: {a: [}\n")
    assert err.issues[0].line == 3 and "not valid YAML" in err.issues[0].message


def test_missing_required_keys_and_version():
    err = errors("name: x\n")
    assert "reactor-graph: 1" in err.issues[0].message
    err = errors("reactor-graph: 1\nname: x\n")
    keys = {i.key for i in err.issues}
    assert {"size", "nodes"} <= keys


def test_exactly_one_output(tiny_yaml):
    text = tiny_yaml.replace("    type: emit\n    in: {frames: decode.frames}\n", "    type: latent_decoder\n    in: {latents: denoise.latents}\n")
    assert "exactly one output node" in only(errors(text)).message


def test_slot_default_of_wrong_type(tiny_yaml):
    text = tiny_yaml.replace("seed: {type: int, default: 0}", "seed: {type: int, default: zero}")
    issue = only(errors(text))
    assert issue.key == "slots.seed.default" and "expected int" in issue.message
