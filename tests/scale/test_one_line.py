"""One line across replicas (reactor_graph/scale/line.py, relay.py): two in-process replicas behind the front,
clients speaking the SDK protocol. A client parked on one replica is served by the other's engine when that one
frees first, through a relay, and every waiting client is told its place in the whole line."""
from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp
import pytest

from .test_front import FrontThread, SdkClient, _luma, _png, run

PICTURE = """\
reactor-graph: 1
name: picture
size: [32, 32]
fps: 16
device: cpu
slots:
  picture: {type: image, size: [32, 32]}
commands:
  set_image:
    params: {image: {type: image}}
    set: {picture: $image}
nodes:
  out:
    type: emit
    in: {frames: $slots.picture}
"""


@pytest.fixture
def picture_front(tiny_engine):
    from reactor_graph.scale.front import Front, LocalPool
    from reactor_graph.scale.replica import ReplicaServer

    replicas = [ReplicaServer(tiny_engine(PICTURE), "secret", index=i, ping_timeout=15, connect_timeout=15).start()
                for i in range(2)]
    front = FrontThread(Front(LocalPool(replicas, "secret"), model="picture")).start()
    yield front, replicas
    front.stop()
    for r in replicas:
        r.stop()


def _host(front, client) -> int:
    return front.front.sessions[client.session["session_id"]][0]


async def _relayed_frames(c):
    """The picture's default is black, so: frames of blocks (not the idle ones) reached c's track."""
    stats = await c.wait_message("runtime", "stats", where=lambda x: x["fresh"] > 4, timeout=20)
    assert stats["data"]["engine_replica"] is not None
    await c.wait_for(lambda: len(c.frames) > 4, 20, "c's frames")


def _engine_client(replica):
    """The client in session on a replica's engine (a relay's stand-in or its own), read on its loop."""
    async def get():
        return replica.server.manager.active
    return replica.call(get())


async def _two_in_session_one_parked(front, a, b, c):
    """a and b in session on the two replicas, c parked (position 1) -> (c's host, the other replica, the client
    in session at c's host, the one at the other)."""
    for x in (a, b):
        await x.connect()
        await x.wait_message("runtime", "sessionStarted", timeout=20)
    assert {_host(front, a), _host(front, b)} == {0, 1}
    await c.connect()
    q = await c.wait_message("runtime", "queue")
    assert q["data"]["position"] == 1 and q["data"]["in_session"] is True
    home = _host(front, c)
    return (home, 1 - home) + ((a, b) if _host(front, a) == home else (b, a))


async def _parked_then_relayed(front, a, b, c):
    """... then the session on the other replica ends: c gets that engine, through a relay."""
    home, other, stay, leave = await _two_in_session_one_parked(front, a, b, c)
    assert (await leave.stop_session())["ok"] is True
    await c.wait_message("runtime", "sessionStarted", timeout=20)
    return home, other, stay


def test_parked_client_is_served_by_the_engine_that_frees_first(picture_front):
    front, replicas = picture_front

    async def scenario():
        async with SdkClient(front.url) as a, SdkClient(front.url) as b, SdkClient(front.url) as c, \
                SdkClient(front.url) as d, aiohttp.ClientSession() as http:
            home, other, stay, leave = await _two_in_session_one_parked(front, a, b, c)
            await d.connect()
            qd = await d.wait_message("runtime", "queue")
            # d is hosted on the other replica, where nobody else waits: its place is in the whole line, behind c
            assert _host(front, d) == other and qd["data"]["position"] == 2 and qd["data"]["waiting"] == 2
            assert (await leave.stop_session())["ok"] is True
            # the other engine frees first: the line's first (c, hosted at home) gets it, not d (hosted there)
            await c.wait_message("runtime", "sessionStarted", timeout=20)
            assert c.inner("runtime", "sessionStarted")[0]["data"]["session_id"] == c.session["session_id"]
            assert _host(front, c) == home
            assert _engine_client(replicas[other]).relayed
            await d.wait_message("runtime", "queue", where=lambda x: x["position"] == 1 and x["waiting"] == 1)
            assert not d.inner("runtime", "sessionStarted")
            await _relayed_frames(c)
            # c's commands reach engine 1 and its frames follow them: an upload (received by its host, replica 0)
            # named by a FileRef, then a base64 picture
            sid = c.session["session_id"]
            white = _png(32, 32, (255, 255, 255))
            async with http.post(f"{front.url}/sessions/{sid}/uploads",
                                 json={"name": "w.png", "size": len(white), "mime_type": "image/png"}) as r:
                slot = await r.json()
            async with http.put(slot["presigned_url"], data=white) as r:
                assert r.status == 200
            ref = {"upload_id": slot["presigned_id"], "name": "w.png", "mime_type": "image/png", "size": 1}
            c.send("runtime", "fileUploaded", ref)
            c.send_raw(json.dumps({"scope": "application",
                                   "data": {"type": "set_image", "data": {}, "uploads": {"image": ref}}}))
            await c.wait_message("application", "commandResult", where=lambda x: x["ok"], timeout=15)
            n = len(c.frames)
            await c.wait_for(lambda: any(_luma(f) > 200 for _, f in c.frames[n:]), 15, "c's white picture")
            dark = "data:image/png;base64," + base64.b64encode(_png(32, 32, (0, 0, 0))).decode()
            c.send("application", "set_image", {"image": dark})
            await c.wait_message("application", "commandResult", after=1, timeout=15)
            n = len(c.frames)
            await c.wait_for(lambda: any(_luma(f) < 40 for _, f in c.frames[n:]), 15, "c's dark picture")
            # a refused command comes back from the engine as a refusal
            c.send("application", "set_image", {"image": "not a picture"})
            await c.wait_message("application", "commandResult", where=lambda x: not x["ok"], timeout=15)
            # the session at c's home saw none of c's pictures; the stats c gets are its stream's, from the other
            assert not any(_luma(f) > 200 for _, f in stay.frames)
            stats = await c.wait_message("runtime", "stats", timeout=15)
            assert stats["data"]["engine_replica"] == other and stats["data"]["fresh"] > 0
            # c leaves: the other engine goes to d, at home
            assert (await c.stop_session())["ok"] is True
            await d.wait_message("runtime", "sessionStarted", timeout=20)
            assert not _engine_client(replicas[other]).relayed
            await d.wait_message("runtime", "stats", where=lambda x: x["fresh"] > 0, timeout=15)
    run(scenario(), 150)


def test_engine_replica_lost_ends_only_the_relayed_session(picture_front):
    front, replicas = picture_front

    async def scenario():
        async with SdkClient(front.url) as a, SdkClient(front.url) as b, SdkClient(front.url) as c:
            home, other, stay = await _parked_then_relayed(front, a, b, c)
            await _relayed_frames(c)
            await asyncio.get_running_loop().run_in_executor(None, replicas[other].kill)
            err = await c.wait_message("runtime", "error", where=lambda x: x["code"] == "replica_lost", timeout=15)
            ended = await c.wait_message("runtime", "sessionEnded", timeout=15)
            assert f"engine replica {other} lost" in ended["data"]["reason"] and ended["data"]["error"]
            assert f"engine replica {other}" in err["data"]["message"]
            n = len(stay.frames)
            await stay.wait_for(lambda: len(stay.frames) > n + 8, 10, "the session at c's home goes on")
            assert not stay.inner("runtime", "sessionEnded")
    run(scenario(), 120)


def test_host_replica_lost_frees_the_engine(picture_front):
    front, replicas = picture_front

    async def scenario():
        async with SdkClient(front.url) as a, SdkClient(front.url) as b, SdkClient(front.url) as c:
            home, other, _ = await _parked_then_relayed(front, a, b, c)
            assert _engine_client(replicas[other]).relayed
            await asyncio.get_running_loop().run_in_executor(None, replicas[home].kill)
            end = time.monotonic() + 15
            while _engine_client(replicas[other]) is not None:
                assert time.monotonic() < end, "engine 1 still runs the session of a client whose host died"
                await asyncio.sleep(0.1)
            async with SdkClient(front.url) as e:  # the line goes on, on the replica left
                await e.connect()
                await e.wait_message("runtime", "sessionStarted", timeout=20)
                assert _host(front, e) == other
    run(scenario(), 120)


def test_relay_refuses_without_the_internal_token(picture_front):
    front, replicas = picture_front

    async def scenario():
        url = replicas[1].url
        async with aiohttp.ClientSession() as http:
            for method, path in (("GET", "/internal/relay"), ("POST", "/internal/assign"), ("POST", "/internal/line")):
                for auth in ({}, {"Authorization": "Bearer wrong"}):
                    async with http.request(method, url + path, json={}, headers=auth) as r:
                        assert r.status == 403, (path, auth, r.status)
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await http.ws_connect(url + "/internal/relay", headers={"Authorization": "Bearer nope"})
    run(scenario(), 30)


def test_engine_ending_a_relayed_session_tells_its_client(picture_front):
    """The engine replica ends the session by itself (here its time limit): the reason reaches the client once,
    as a local session's would, and that engine goes to the next in line."""
    front, replicas = picture_front

    async def scenario():
        async with SdkClient(front.url) as a, SdkClient(front.url) as b, SdkClient(front.url) as c:
            home, other, _ = await _parked_then_relayed(front, a, b, c)
            await _relayed_frames(c)

            async def limit():
                replicas[other].server.manager.settings.max_session_seconds = 0.5
            replicas[other].call(limit())
            ended = await c.wait_message("runtime", "sessionEnded", timeout=15)
            assert "session time limit" in ended["data"]["reason"]
            await asyncio.sleep(0.5)
            assert len(c.inner("runtime", "sessionEnded")) == 1
            end = time.monotonic() + 10
            while _engine_client(replicas[other]) is not None:
                assert time.monotonic() < end, "the engine still runs the ended session"
                await asyncio.sleep(0.1)
    run(scenario(), 120)
