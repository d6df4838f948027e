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
