"""The server's log: each client and session with its address, the reason a session ended, refused
commands, and shutdown."""
import logging


def test_session_start_and_end_are_logged_with_client_and_reason(served, sdk_client, arun, caplog):
    caplog.set_level(logging.INFO, logger="reactor_graph.server")

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            c.send("application", "set_prompt", {"prompt": ""})  # too short: refused
            await c.wait_message("application", "commandResult")
            await c.stop_session()
            await c.wait_message("runtime", "sessionEnded", timeout=5)
            return c.session["session_id"][:8]

    sid = arun(main(), 60)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "reactor_graph.server")
    assert f"client {sid} from 127.0.0.1: waiting for the model" in text
    assert f"session {sid} started for 127.0.0.1" in text
    assert f"command set_prompt from {sid} refused" in text
    ended = next(line for line in text.splitlines() if line.startswith(f"session {sid} from 127.0.0.1 ended after"))
    assert ended.endswith(": stop_session"), ended


def test_shutdown_is_logged_with_its_cause(tiny_engine, caplog):
    from reactor_graph.server.app import serve

    caplog.set_level(logging.INFO, logger="reactor_graph.server")
    assert serve(tiny_engine(), port=0, max_seconds=0.2, announce=lambda url: None) == 0
    text = [r.getMessage() for r in caplog.records if r.name == "reactor_graph.server"]
    assert "shutting down on --max-seconds 0.2" in text and text[-1] == "stopped"


def test_a_served_stream_is_traced_from_command_to_frame(tiny_engine, serve_engine, sdk_client, arun, tmp_path):
    """`run --trace`: node spans of the blocks served, each frame from its block to the encoder, and a
    command from its arrival to the block that shows it."""
    import json
    from collections import deque

    from reactor_graph import trace
    from reactor_graph.hot_path import Probe
    from reactor_graph.server import tracks

    engine = tiny_engine()
    probe = Probe(engine.device, keep=50)
    engine.use_probe(probe)
    tracks.TRACE = deque(maxlen=5000)
    tracks.trace_encoders()
    served = serve_engine(engine, ping_timeout=15, connect_timeout=15)
    try:
        async def main():
            async with sdk_client(served.url) as c:
                await c.connect()
                await c.wait_ready()
                await c.wait_message("runtime", "sessionStarted")
                c.send("application", "set_prompt", {"prompt": "a blue square"})
                await c.wait_message("application", "commandResult")
                await c.wait_for(lambda: sum(f.get("track") == "encoder" for f in tracks.TRACE) >= 8, 30,
                                 "frames encoded")
                await c.stop_session()

        arun(main(), 60)
        frames = list(tracks.TRACE)
    finally:
        tracks.TRACE = None
    path = tmp_path / "run.json"
    trace.write(path, {"run": probe}, {"run": frames})
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    cats = {e["cat"] for e in events}
    assert {"block", "hot_path", "node", "on_change", "copy", "command", "stream"} <= cats
    cmd = next(e for e in events if e["cat"] == "command")
    assert cmd["name"] == "set_prompt" and cmd["args"]["to_frame_ms"] >= cmd["args"]["wait_ms"] >= 0
    assert all(e["dur"] >= 0 for e in events if e["cat"] == "stream")
    # each frame's encode, on its own thread, tied to the block the frame came from
    enc = [e for e in events if e["cat"] == "encoder"]
    assert enc and all(e["dur"] >= 0 and e["args"]["packets"] >= 1 and e["args"]["bytes"] > 0 for e in enc)
    blocks = {e["args"]["block"] for e in events if e["cat"] == "stream"}
    assert {e["args"]["block"] for e in enc if e["args"]["block"] is not None} & blocks


def test_run_trace_cli_writes_a_trace_at_shutdown(write_graph, tiny_yaml, tmp_path):
    import json

    from typer.testing import CliRunner

    from reactor_graph.cli import app

    path = tmp_path / "run.json"
    res = CliRunner().invoke(app, ["run", str(write_graph(tiny_yaml)), "--port", "0", "--max-seconds", "0.3",
                                   "--trace", str(path)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and json.loads(path.read_text())["traceEvents"]
