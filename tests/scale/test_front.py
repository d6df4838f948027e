"""The front (reactor_graph/scale/front.py) before two in-process replicas, with the SDK-protocol client:
no Ray needed (test_ray.py runs the same through Ray Serve)."""
from __future__ import annotations

import asyncio
import importlib.util
import threading
from pathlib import Path

import aiohttp
import pytest

_spec = importlib.util.spec_from_file_location("rg_server_conftest",
                                               Path(__file__).parents[1] / "server" / "conftest.py")
server_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(server_conftest)
SdkClient = server_conftest.SdkClient
run = server_conftest.run
nonblank = server_conftest.nonblank


class FrontThread:
    """A Front on its own event loop in a daemon thread."""

    def __init__(self, front):
        self.front = front
        self.loop = asyncio.new_event_loop()
        self.url = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-front")

    def start(self):
        self._thread.start()
        self.url = self.call(self.front.start("127.0.0.1", 0))
        self.call(self.front.wait_ready(timeout=30), 40)
        return self

    def call(self, coro, timeout=20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.call(self.front.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def local_front(tiny_engine):
    from reactor_graph.scale.front import Front, LocalPool
    from reactor_graph.scale.replica import ReplicaServer

    replicas = [ReplicaServer(tiny_engine(), "secret", index=i, ping_timeout=15, connect_timeout=15).start()
                for i in range(2)]
    front = FrontThread(Front(LocalPool(replicas, "secret"), model="tiny")).start()
    yield front, replicas
    front.stop()
    for r in replicas:
        r.stop()


async def _get(url):
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


def test_two_sessions_on_two_replicas_and_one_line(local_front):
    front, replicas = local_front

    async def scenario():
        async with SdkClient(front.url) as a, SdkClient(front.url) as b, SdkClient(front.url) as c:
            await a.connect()
            await a.wait_message("runtime", "sessionStarted")
            await b.connect()
            await b.wait_message("runtime", "sessionStarted")
            where = {sid: i for sid, (i, _) in front.front.sessions.items()}
            assert where[a.session["session_id"]] != where[b.session["session_id"]], "both on one replica"
            await a.wait_for(lambda: any(nonblank(f) for _, f in a.frames), 20, "a frame for a")
            await b.wait_for(lambda: any(nonblank(f) for _, f in b.frames), 20, "a frame for b")
            await c.connect()
            q = await c.wait_message("runtime", "queue")
            assert q["data"]["position"] == 1 and q["data"]["in_session"] is True
            # the session in c's replica ends: c is promoted there
            mine = front.front.sessions[c.session["session_id"]][0]
            first = a if where[a.session["session_id"]] == mine else b
            other = b if first is a else a
            assert (await first.stop_session())["ok"] is True
            await c.wait_message("runtime", "sessionStarted", timeout=20)
            await c.wait_for(lambda: any(nonblank(f) for _, f in c.frames), 20, "a frame for c")
            n = len(other.frames)
            await other.wait_for(lambda: len(other.frames) > n + 4, 10, "the other session goes on")
            front.call(front.front.refresh())
            status, health = await _get(front.url + "/health")
            assert status == 200 and health["ok"] and health["replicas_ready"] == 2
            assert health["in_session"] == 2 and health["queue"] == 0
            assert [r["in_session"] for r in health["replicas"]] == [True, True]
            status, text = await _get(front.url + "/metrics")
            assert 'reactor_graph_replicas_ready 2' in text
            assert 'replica="0"' in text and 'replica="1"' in text
            assert text.count("# TYPE reactor_graph_blocks_total") <= 1
            # unknown ids: 404 as today
            async with aiohttp.ClientSession() as http:
                async with http.get(front.url + "/sessions/nope/transport/webrtc/sdp_params") as r:
                    assert r.status == 404
                async with http.get(front.url + "/api/commands") as r:
                    assert (await r.json())["model"] == "tiny"
    run(scenario(), 120)


def test_replica_lost_ends_only_its_sessions(local_front):
    """A replica that stops answering gets no new sessions; its sessions end with the reason when it comes back
    as another instance; the other replica's session goes on."""
    front, replicas = local_front

    async def scenario():
        async with SdkClient(front.url) as a, SdkClient(front.url) as b:
            await a.connect()
            await a.wait_message("runtime", "sessionStarted")
            await b.connect()
            await b.wait_message("runtime", "sessionStarted")
            ia = front.front.sessions[a.session["session_id"]][0]
            victim = replicas[ia]
            # the replica crashes: it tells its client why (what a replica whose engine fails does)
            await asyncio.get_running_loop().run_in_executor(None, victim.end_all, "replica crashed: test")
            ended = await a.wait_message("runtime", "sessionEnded", timeout=10)
            assert "replica crashed" in ended["data"]["reason"]
            n = len(b.frames)
            await b.wait_for(lambda: len(b.frames) > n + 4, 10, "the other session goes on")
            assert not b.inner("runtime", "sessionEnded")
    run(scenario(), 90)


def test_no_replica_ready_refuses_cleanly(tiny_engine):
    from reactor_graph.scale.front import Front

    class Dead:
        token = "x"

        def __len__(self):
            return 2

        async def status(self, i):
            raise ConnectionError("gone")

    async def scenario():
        front = Front(Dead(), model="tiny")
        url = await front.start("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "/start_session", json={}) as r:
                    assert r.status == 503 and "no replica is ready" in await r.text()
                async with http.get(url + "/health") as r:
                    assert (await r.json())["ok"] is False
                async with http.post(url + "/start_session", json={}, headers={"Origin": "https://evil.example"}) as r:
                    assert r.status == 403
        finally:
            await front.close()
    run(scenario(), 30)


def test_replicas_without_ray_says_how_to_install(monkeypatch):
    import sys

    from typer.testing import CliRunner

    from reactor_graph.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "reactor_graph.scale.ray_app", raising=False)
    result = CliRunner().invoke(app, ["run", "--replicas", "2"])
    assert result.exit_code != 0
    assert "reactor-graph[scale]" in result.output


CAMERA = """\
reactor-graph: 1
name: camera
size: [32, 32]
fps: 16
device: cpu
slots:
  camera: {type: video, size: [32, 32]}
commands:
  set_image:
    params: {image: {type: image}}
    set: {camera: $image}
nodes:
  out:
    type: emit
    in: {frames: $slots.camera}
"""


def _png(w, h, colour) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _luma(frame) -> float:
    return float(frame.to_ndarray(format="yuv420p")[: frame.height].mean())


@pytest.fixture
def camera_front(tiny_engine):
    from reactor_graph.scale.front import Front, LocalPool
    from reactor_graph.scale.replica import ReplicaServer

    replicas = [ReplicaServer(tiny_engine(CAMERA), "secret", index=i, ping_timeout=15, connect_timeout=15).start()
                for i in range(2)]
    front = FrontThread(Front(LocalPool(replicas, "secret"), model="camera", max_upload_bytes=200_000)).start()
    yield front, replicas
    front.stop()
    for r in replicas:
        r.stop()


def test_uploads_go_through_the_front_to_the_sessions_replica(camera_front):
    """uploadFile as the SDK makes it, against the front: the slot's PUT address is the front's, the PUT reaches the
    replica that serves the session, the FileRef command sets the picture; a refusal keeps its reason; a body over
    the front's bound is refused before it is read; another session's upload id is unknown there."""
    front, replicas = camera_front

    async def upload(http, sid, data, mime="image/png", size=None, put_to=None):
        async with http.post(f"{front.url}/sessions/{sid}/uploads",
                             json={"name": "a.png", "size": len(data) if size is None else size,
                                   "mime_type": mime}) as r:
            if r.status != 200:
                return r.status, r.reason, None
            slot = await r.json()
        assert slot["presigned_url"] == f"{front.url}/sessions/{sid}/uploads/{slot['presigned_id']}"
        url = put_to(slot) if put_to else slot["presigned_url"]
        async with http.put(url, data=data, headers={"Content-Length": str(len(data))}) as r:
            return r.status, r.reason, slot["presigned_id"]

    async def scenario():
        async with SdkClient(front.url) as a, SdkClient(front.url) as b, aiohttp.ClientSession() as http:
            for c in (a, b):
                await c.connect()
                await c.wait_message("runtime", "sessionStarted")
            sa, sb = a.session["session_id"], b.session["session_id"]
            where = {sid: i for sid, (i, _) in front.front.sessions.items()}
            assert where[sa] != where[sb]
            owner, other = replicas[where[sa]], replicas[where[sb]]
            status, _, upload_id = await upload(http, sa, _png(48, 48, (255, 255, 255)))
            assert status == 200
            assert owner.server.manager.uploads.get(sa, upload_id).complete  # it landed on the session's replica
            assert sa not in other.server.manager.uploads.sessions
            a.send("runtime", "fileUploaded", {"upload_id": upload_id, "name": "a.png", "mime_type": "image/png",
                                               "size": 1})
            a.channel.send('{"scope":"application","data":{"type":"set_image","data":{},"uploads":{"image":'
                           f'{{"upload_id":"{upload_id}","name":"a.png","mime_type":"image/png","size":1}}}}}}}}')
            await a.wait_message("application", "commandResult", where=lambda d: d["ok"])
            n = len(a.frames)
            await a.wait_for(lambda: any(_luma(f) > 200 for _, f in a.frames[n:]), 10, "the uploaded image")
            # the replica's refusal, reason phrase and all
            status, reason, _ = await upload(http, sa, b"<svg>" * 10)
            assert status == 415 and "not a PNG" in reason
            assert (await upload(http, sa, b"x", mime="text/html"))[0] == 415
            # larger than the front's bound: refused at the front (the replica would take 10 MB)
            big = _png(8, 8, (1, 2, 3)) + bytes(300_000)
            status, reason, _ = await upload(http, sa, big)
            assert status == 413 and "200000" in reason
            # a's upload id under b's session: not b's
            status, _, slot_id = await upload(http, sb, _png(8, 8, (9, 9, 9)), put_to=lambda s: (
                f"{front.url}/sessions/{sb}/uploads/{upload_id}"))
            assert status == 404 and slot_id is not None
            async with http.put(f"{front.url}/sessions/nope/uploads/{upload_id}", data=b"x") as r:
                assert r.status == 404
    run(scenario(), 120)
