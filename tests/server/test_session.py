"""A whole session against the real server: the SDK's local-mode protocol, driven by an aiortc client."""
import asyncio
import time

import aiohttp

FPS = 16  # the tiny graph's fps


def test_whole_session(served, sdk_client, arun, is_nonblank):
    engine = served.engine

    async def main():
        async with sdk_client(served.url) as c:
            s = await c.start_session()
            assert s["selected_transport"] == {"protocol": "webrtc", "version": "1.0"}
            assert s["capabilities"]["tracks"] == [{"name": "main_video", "kind": "video", "direction": "recvonly"}]
            assert {c["name"] for c in s["capabilities"]["commands"]} == {"set_prompt", "reset"}
            assert s["model"]["name"] == "tiny" and s["cluster"] and s["server_info"]["server_version"]
            await c.connect()
            await c.wait_ready()
            started = await c.wait_message("runtime", "sessionStarted")
            assert started["data"]["session_id"] == s["session_id"] and started["data"]["fps"] == FPS

            # frames at about the graph's fps (generated ones, not the idle blanks)
            await c.wait_for(lambda: any(is_nonblank(f) for _, f in c.frames), 30, "a generated frame")
            n0, t0 = len(c.frames), time.monotonic()
            await asyncio.sleep(2.0)
            rate = (len(c.frames) - n0) / (time.monotonic() - t0)
            assert FPS * 0.5 <= rate <= FPS * 1.5, rate
            pts = [f.pts for _, f in c.frames[n0:]]
            step = 90000 // FPS
            assert all((b - a) % step == 0 and b > a for a, b in zip(pts, pts[1:])), pts[:20]
            assert (c.frames[-1][1].width, c.frames[-1][1].height) == (32, 32)

            # a command changes the slot once applied
            mark = len(c.inner("application", "commandResult"))
            c.send("application", "set_prompt", {"prompt": "a blue square"})
            r = await c.wait_message("application", "commandResult", after=mark)
            assert r["data"] == {"command": "set_prompt", "ok": True}
            assert engine.slots.values["prompt"] == "a blue square"

            # a bad one is answered with the field and the reason; nothing changes
            mark = len(c.inner("application", "commandResult"))
            c.send("application", "set_prompt", {"prompt": ""})
            r = await c.wait_message("application", "commandResult", after=mark)
            assert r["data"]["ok"] is False
            assert r["data"]["error"]["field"] == "prompt"
            assert "at least 1" in r["data"]["error"]["reason"]
            mark = len(c.inner("application", "commandResult"))
            c.send("application", "set_prompt", {"prompt": "x", "colour": 3})
            r = await c.wait_message("application", "commandResult", after=mark)
            assert r["data"]["error"]["field"] == "colour" and "unknown parameter" in r["data"]["error"]["reason"]
            assert engine.slots.values["prompt"] == "a blue square"

            # capabilities, in the flat shape ReactorController reads
            c.send("runtime", "requestCapabilities", {})
            caps = await c.wait_message("runtime", "modelCapabilities")
            cmds = {x["name"]: x for x in caps["data"]["commands"]}
            assert set(cmds) == {"set_prompt", "reset"}
            assert cmds["set_prompt"]["description"] == "Change the prompt"
            assert cmds["set_prompt"]["schema"] == {"prompt": {"type": "string", "minLength": 1, "maxLength": 50,
                                                               "required": True}}
            assert cmds["reset"]["schema"] == {}

            # stats arrive once a second
            stats = await c.wait_message("runtime", "stats", timeout=5)
            assert stats["data"]["target_fps"] == FPS and "queue_depth" in stats["data"]

            # stop_session ends it: told why, engine free again
            res = await c.stop_session()
            assert res == {"ok": True, "stopped": s["session_id"]}
            ended = await c.wait_message("runtime", "sessionEnded", timeout=5)
            assert ended["data"]["reason"] == "stop_session"
        async with aiohttp.ClientSession() as http:
            async with http.get(served.url + "/health") as r:
                h = await r.json()
        assert h["busy"] is False and h["queue"] == 0 and h["in_session"] is False and h["model"] == "tiny"

    arun(main(), 90)
    assert not engine.busy


def test_second_client_waits_in_line_then_gets_the_next_session(served, sdk_client, arun, is_nonblank):
    async def main():
        async with sdk_client(served.url) as a, sdk_client(served.url) as b:
            await a.connect()
            await a.wait_ready()
            await a.wait_message("runtime", "sessionStarted")
            await b.connect()
            await b.wait_ready()
            q = await b.wait_message("runtime", "queue")
            assert q["data"]["position"] == 1 and q["data"]["waiting"] == 1
            assert not b.inner("runtime", "sessionStarted")
            # waiting clients get no say over the running session
            b.send("application", "set_prompt", {"prompt": "mine now"})
            r = await b.wait_message("application", "commandResult")
            assert r["data"]["ok"] is False and r["data"]["error"]["reason"] == "not_in_session"
            assert "position 1" in r["data"]["error"]["message"]
            assert served.engine.slots.values["prompt"] != "mine now"
            # the first leaves; the second is promoted and receives generated frames
            await a.stop_session()
            await a.wait_message("runtime", "sessionEnded", timeout=5)
            started = await b.wait_message("runtime", "sessionStarted", timeout=10)
            assert started["data"]["session_id"] == b.session["session_id"]
            n = len(b.frames)
            await b.wait_for(lambda: any(is_nonblank(f) for _, f in b.frames[n:]), 30, "generated frames for b")
            b.send("application", "set_prompt", {"prompt": "mine now"})
            r = await b.wait_message("application", "commandResult", after=1)
            assert r["data"]["ok"] is True
            assert served.engine.slots.values["prompt"] == "mine now"

    arun(main(), 90)


def test_a_client_that_vanishes_is_noticed(served, sdk_client, arun):
    """Closing the peer connection without stop_session ends the session; the next in line gets it."""
    async def main():
        async with sdk_client(served.url) as a, sdk_client(served.url) as b:
            await a.connect()
            await a.wait_ready()
            await a.wait_message("runtime", "sessionStarted")
            await b.connect()
            await b.wait_ready()
            await b.wait_message("runtime", "queue")
            await a.close(stop=False)  # no stop_session: just gone
            await b.wait_message("runtime", "sessionStarted", timeout=15)
        assert served.sync(lambda: a.session["session_id"] not in served.manager.clients)

    arun(main(), 60)


def test_silence_ends_the_session(tiny_engine, serve_engine, sdk_client, arun):
    served = serve_engine(tiny_engine(), ping_timeout=1.5)

    async def main():
        async with sdk_client(served.url, ping=False) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            ended = await c.wait_message("runtime", "sessionEnded", timeout=10)
            assert ended["data"]["reason"] == "no ping"
            await c.wait_for(lambda: not served.engine.busy, 10, "the engine to stop")
        assert served.sync(lambda: served.manager.active is None and not served.manager.clients)

    arun(main(), 60)


def test_stop_session_without_an_id_stops_the_only_client(served, sdk_client, arun):
    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            res = await c.stop_session(with_id=False)
            assert res["stopped"] == c.session["session_id"]
            await c.wait_message("runtime", "sessionEnded", timeout=5)

    arun(main(), 60)


def test_shutdown_stops_the_session_and_closes_peers(tiny_engine, serve_engine, sdk_client, arun):
    served = serve_engine(tiny_engine())

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            pcs = served.sync(lambda: [x.pc for x in served.manager.clients.values()])
            await asyncio.get_running_loop().run_in_executor(None, served.server_close)
            ended = await c.wait_message("runtime", "sessionEnded", timeout=10)
            assert ended["data"]["reason"] == "shutdown"
            assert all(pc.connectionState == "closed" for pc in pcs)

    served.server_close = lambda: served.call(served.server.close(), 30)
    arun(main(), 60)
    assert not served.engine.busy


def test_put_sdp_params_replaces_the_connection_and_keeps_the_session(served, sdk_client, arun, is_nonblank):
    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            old_track = served.sync(lambda: served.manager.active.track)
            await c.reconnect()
            await c.wait_ready()
            assert served.sync(lambda: served.manager.active is not None and
                               served.manager.active.id == c.session["session_id"])
            n = len(c.frames)
            await c.wait_for(lambda: sum(is_nonblank(f) for _, f in c.frames[n:]) >= 5, 20, "frames on the new pc")
            assert served.sync(lambda: served.manager.active.track) is old_track  # same clock, same queue
            c.send("application", "set_prompt", {"prompt": "after reconnect"})
            r = await c.wait_message("application", "commandResult")
            assert r["data"]["ok"] and served.engine.slots.values["prompt"] == "after reconnect"

    arun(main(), 60)
