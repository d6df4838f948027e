"""The CLI: clear errors with exit codes, no tracebacks; show/validate/nodes/render."""
import av
from typer.testing import CliRunner

from reactor_graph.cli import app

runner = CliRunner()


def test_validate_bad_file_exits_2_without_traceback(write_graph, tiny_yaml):
    bad = write_graph(tiny_yaml.replace("type: noise", "type: nosie"), "bad.yaml")
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    text = res.output
    assert "bad.yaml:21: nodes.noise.type: unknown node type 'nosie'" in text.replace("\n", "")
    assert "Traceback" not in text


def test_validate_good_file(write_graph, tiny_yaml):
    res = runner.invoke(app, ["validate", str(write_graph(tiny_yaml))])
    assert res.exit_code == 0 and "ok" in res.output and "1 on change" in res.output


def test_show_prints_partition_and_dot(write_graph, tiny_yaml, tmp_path):
    dot = tmp_path / "g.dot"
    res = runner.invoke(app, ["show", str(write_graph(tiny_yaml)), "--dot", str(dot)])
    assert res.exit_code == 0, res.output
    assert "on change" in res.output and "hot path" in res.output and "tensor[float](8 16)" in res.output
    assert '"cond" -> "denoise"' in dot.read_text()


def test_nodes_lists_types_ports_and_params():
    res = runner.invoke(app, ["nodes"])
    assert res.exit_code == 0
    for name in ("text_encoder", "noise", "causal_denoiser", "latent_decoder", "emit", "cache_blocks"):
        assert name in res.output


def test_nodes_lists_every_input_and_output_port():
    res = runner.invoke(app, ["nodes"])
    assert res.exit_code == 0
    text = res.output
    # outputs that nodes shape from their params (not declared on the class): the old listing had none
    for row in ("out   │ embeds", "out   │ latents", "out   │ video", "out   │ noise", "in    │ cond",
                "in    │ noise", "in    │ latents", "int (optional)", "tensor[uint8](T 720 832)"):
        assert row in text, row


def test_render_cli(write_graph, tiny_yaml, tmp_path):
    out = tmp_path / "x.mp4"
    res = runner.invoke(app, ["render", str(write_graph(tiny_yaml)), "-o", str(out), "--blocks", "3"])
    assert res.exit_code == 0, res.output
    assert "6 frames of 32x32" in res.output
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6


def test_render_missing_graph_is_clear(tmp_path):
    res = runner.invoke(app, ["render", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "file not found" in res.output and "Traceback" not in res.output


def test_manifest_render_and_bench(tmp_path):
    """A Reactor runtime model (manifest.json) renders and benches through the same CLI as a graph."""
    from pathlib import Path

    manifest = Path(__file__).parent / "compat" / "models" / "manifest.json"
    out = tmp_path / "m.mp4"
    res = runner.invoke(app, ["render", str(manifest), "-o", str(out), "--blocks", "3"])
    assert res.exit_code == 0, res.output
    assert "6 frames of 32x32 at 12 fps" in res.output
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6
    res = runner.invoke(app, ["bench", str(manifest), "--blocks", "4", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    assert "prompt-model: block p50" in res.output and "frames/s" in res.output


# -- plain user mistakes: one clear line each, exit code 2, no traceback ----------------------------------
def _clear(res, *needles):
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())  # rich wraps long lines: compare with runs of whitespace as one space
    assert "Traceback" not in text
    for n in needles:
        assert n in text, (n, text)


def test_validate_folder_and_binary_file_and_keeps_checking(tmp_path, write_graph, tiny_yaml):
    folder, binary = tmp_path / "adir", tmp_path / "bin.yaml"
    folder.mkdir()
    binary.write_bytes(b"\x00\x01\x02\xff")
    res = runner.invoke(app, ["validate", str(folder), str(binary), str(write_graph(tiny_yaml))])
    _clear(res, "is a folder, not a graph file", "is not a text file", "ok ")


def test_validate_reports_a_missing_weights_file_at_its_line(write_graph, tiny_yaml):
    g = write_graph(tiny_yaml.replace("params: {latent_channels: 4, width: 16, upsample: 8}",
                                      "params: {latent_channels: 4, width: 16, upsample: 8, weights: nope.safetensors}"))
    _clear(runner.invoke(app, ["validate", str(g)]), "graph.yaml:31: nodes.decode.params.weights: weights file",
           "nope.safetensors does not exist")


def test_bad_indentation_says_so(write_graph):
    g = write_graph("reactor-graph: 1\nname: x\n  nodes:\n bad: 1\n")
    _clear(runner.invoke(app, ["validate", str(g)]), "graph.yaml:3: not valid YAML", "check the indentation")


def test_misspelt_key_gets_a_did_you_mean(write_graph, tiny_yaml):
    g = write_graph(tiny_yaml.replace("params: {shape: [4, 2, 4, 4]}", "parms: {shape: [4, 2, 4, 4]}"))
    _clear(runner.invoke(app, ["validate", str(g)]), "unknown key 'parms' (did you mean 'params'?)")


def test_script_with_misspelt_param_names_the_unknown_key(write_graph, tiny_yaml, tmp_path):
    script = tmp_path / "s.yaml"
    script.write_text("- {block: 1, command: set_prompt, params: {promt: a fox}}\n")
    res = runner.invoke(app, ["render", str(write_graph(tiny_yaml)), "-o", str(tmp_path / "x.mp4"), "--blocks", "2",
                              "--commands", str(script)])
    _clear(res, "unknown parameter 'promt' (did you mean 'prompt'?)")


def test_script_command_past_the_last_block_is_refused(write_graph, tiny_yaml, tmp_path):
    script = tmp_path / "s.yaml"
    script.write_text("- {block: 5, command: set_prompt, params: {prompt: a fox}}\n")
    res = runner.invoke(app, ["render", str(write_graph(tiny_yaml)), "-o", str(tmp_path / "x.mp4"), "--blocks", "3",
                              "--commands", str(script)])
    _clear(res, "[0].block: block 5 is past the last block rendered (2)")


def test_output_into_a_missing_folder_names_it(write_graph, tiny_yaml, tmp_path):
    res = runner.invoke(app, ["render", str(write_graph(tiny_yaml)), "-o", str(tmp_path / "no" / "x.mp4")])
    _clear(res, f"folder {tmp_path / 'no'} does not exist")


def test_port_in_use_is_refused_before_loading(write_graph, tiny_yaml):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = runner.invoke(app, ["run", str(write_graph(tiny_yaml)), "--port", str(port), "--max-seconds", "1"])
    _clear(res, f"port {port} on 127.0.0.1 is already in use")
    assert "loading" not in res.output


def test_a_long_step_without_a_terminal_says_it_is_still_running(monkeypatch, capsys):
    import time

    from reactor_graph import cli

    monkeypatch.setattr(cli, "HEARTBEAT_S", 0.05)
    with cli._progress("loading") as say:
        say("compiling phase 1 of the hot path (1/4)")
        time.sleep(0.3)  # one step that takes long: a compile
        say("compiling phase 2 of the hot path (2/4)")
    text = capsys.readouterr()
    text = text.out + text.err
    assert "compiling phase 1 of the hot path (1/4)" in text
    assert "still compiling phase 1 of the hot path (1/4)" in text  # said again while it ran
    assert text.count("still compiling phase 2") <= 1  # and the heartbeat stops with the step
