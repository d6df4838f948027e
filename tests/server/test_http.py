"""The HTTP side: CORS on every route (preflights included), the SDK's status codes, health, metrics, page."""
import asyncio
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
import pytest

ALLOWED = {"content-type", "authorization", "reactor-api-version", "reactor-api-accept-version",
           "reactor-webrtc-version"}


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        import json

        return json.loads(r.read())


@pytest.mark.parametrize("path,method,headers", [
    ("/start_session", "POST", "content-type, reactor-api-version, reactor-api-accept-version"),
    ("/stop_session", "POST", "reactor-api-version, reactor-api-accept-version"),
    ("/sessions/abc/transport/webrtc/ice_servers", "GET", "authorization, reactor-webrtc-version"),
    ("/sessions/abc/transport/webrtc/sdp_params", "POST", "authorization, reactor-webrtc-version, content-type"),
    ("/sessions/abc/transport/webrtc/sdp_params", "PUT", "authorization, reactor-webrtc-version, content-type"),
    ("/sessions/abc/transport/webrtc/sdp_params", "GET", "authorization, reactor-webrtc-version"),
])
def test_cors_preflight(served, arun, path, method, headers):
    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.options(served.url + path, headers={
                    "Origin": "http://localhost:5173", "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": headers}) as r:
                assert 200 <= r.status < 300
                h = r.headers
                assert h["Access-Control-Allow-Origin"] == "http://localhost:5173"
                assert h["Access-Control-Allow-Private-Network"] == "true"
                assert method in {m.strip() for m in h["Access-Control-Allow-Methods"].split(",")}
                allowed = {x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")}
                assert ALLOWED <= allowed

    arun(main(), 20)


def test_routes_and_status_codes(served, arun):
    async def main():
        async with aiohttp.ClientSession(headers={"Origin": "http://localhost:5173"}) as http:
            async with http.post(served.url + "/start_session", json={}) as r:
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
                s = await r.json()
            base = f"{served.url}/sessions/{s['session_id']}/transport/webrtc"
            async with http.get(base + "/ice_servers") as r:
                assert r.status == 200 and await r.json() == {"ice_servers": []}
            async with http.get(base + "/sdp_params") as r:
                assert r.status == 202  # no offer yet: pending
            async with http.post(base + "/sdp_params", data="not json") as r:
                assert r.status == 400 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
            async with http.post(base + "/sdp_params", json={"sdp_offer": "v=0\r\ngarbage", "track_mapping": []}) as r:
                assert r.status == 400
                assert "offer" in await r.text()
            async with http.post(base + "/sdp_params", json={"sdp_offer": 3}) as r:
                assert r.status == 400 and "sdp_offer" in await r.text()
            async with http.get(f"{served.url}/sessions/nope/transport/webrtc/sdp_params") as r:
                assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
            async with http.post(f"{served.url}/sessions/{s['session_id']}/uploads",
                                 json={"name": "a", "size": 1, "mime_type": "x"}) as r:
                assert r.status == 415 and "image uploads only" in await r.text()  # tests/server/test_inputs.py
            async with http.post(served.url + "/stop_session", json={"session_id": s["session_id"]}) as r:
                assert (await r.json())["stopped"] == s["session_id"]
            async with http.get(base + "/ice_servers") as r:
                assert r.status == 404
            async with http.post(served.url + "/stop_session") as r:  # the SDK's: no body, nothing to stop
                assert r.status == 200 and (await r.json())["stopped"] is None
            async with http.get(served.url + "/health") as r:
                h = await r.json()
                assert h["ok"] is True and h["model"] == "tiny" and h["busy"] is False and h["queue"] == 0
            async with http.get(served.url + "/metrics") as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
            for name in ("reactor_graph_blocks_total", "reactor_graph_frames_generated_total",
                         "reactor_graph_frames_sent_total", "reactor_graph_frames_dropped_total",
                         "reactor_graph_block_seconds_bucket", "reactor_graph_frame_queue_depth",
                         "reactor_graph_sessions_total", "reactor_graph_errors_total", "reactor_graph_clients_waiting"):
                assert f"\n{name}" in text, name
            assert 'reactor_graph_info{model="tiny",version="0.1.0"} 1' in text
            async with http.get(served.url + "/") as r:
                assert r.status == 200 and "<video" in await r.text()
            for asset in ("app.js", "style.css"):
                async with http.get(f"{served.url}/static/{asset}") as r:
                    assert r.status == 200
            async with http.get(served.url + "/api/commands") as r:
                cmds = await r.json()
                by_name = {c["name"]: c for c in cmds["commands"]}
                assert by_name["set_prompt"]["schema"]["properties"]["prompt"]["maxLength"] == 50
                assert by_name["set_prompt"]["flat"]["prompt"]["type"] == "string"

    arun(main(), 30)


def test_client_limit_and_offer_expiry(tiny_engine, serve_engine, arun):
    served = serve_engine(tiny_engine(), max_clients=2, offer_timeout=0.5)

    async def main():
        async with aiohttp.ClientSession() as http:
            ids = []
            for _ in range(2):
                async with http.post(served.url + "/start_session", json={}) as r:
                    ids.append((await r.json())["session_id"])
            async with http.post(served.url + "/start_session", json={}) as r:
                assert r.status == 503 and "too many clients" in await r.text()
            await asyncio.sleep(1.5)  # no offer came: both expire
            async with http.get(f"{served.url}/sessions/{ids[0]}/transport/webrtc/ice_servers") as r:
                assert r.status == 404
            async with http.post(served.url + "/start_session", json={}) as r:
                assert r.status == 200

    arun(main(), 20)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_for_max_seconds_then_shuts_down(tiny_engine):
    from reactor_graph.server.app import serve

    engine = tiny_engine()
    port = free_port()
    urls = []
    th = threading.Thread(target=serve, args=(engine,), kwargs=dict(port=port, max_seconds=1.5,
                                                                    announce=urls.append), daemon=True)
    t0 = time.monotonic()
    th.start()
    deadline = time.monotonic() + 10
    while not urls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert urls == [f"http://127.0.0.1:{port}/"]
    assert get_json(urls[0] + "health")["model"] == "tiny"
    th.join(15)
    assert not th.is_alive()
    assert 1.4 <= time.monotonic() - t0 < 12


def test_cli_run(write_graph, tiny_yaml, tmp_path):
    """`reactor-graph run GRAPH --max-seconds` serves, answers, and exits 0 by itself."""
    graph = write_graph(tiny_yaml)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reactor_graph.cli", "run", str(graph), "--port", str(port),
                             "--max-seconds", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        health = None
        deadline = time.monotonic() + 60
        while health is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                health = get_json(f"http://127.0.0.1:{port}/health")
            except OSError:
                time.sleep(0.1)
        assert health is not None and health["model"] == "tiny", proc.stderr.read() if proc.poll() else ""
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert f"127.0.0.1:{port}" in out


def test_cli_run_with_a_token_prints_the_address_to_open(write_graph, tiny_yaml):
    """`--token` (or REACTOR_GRAPH_TOKEN): the printed address carries it; a request without it is refused."""
    import os
    import urllib.error

    graph = write_graph(tiny_yaml)
    port = free_port()
    env = {**os.environ, "REACTOR_GRAPH_TOKEN": "t0ken", "COLUMNS": "300"}
    proc = subprocess.Popen([sys.executable, "-m", "reactor_graph.cli", "run", str(graph), "--port", str(port),
                             "--max-seconds", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 60
        status = None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/start_session", data=b"{}", method="POST")
                urllib.request.urlopen(req, timeout=5)
                status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                time.sleep(0.1)
        assert status == 401
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/auth/t0ken/" in out
