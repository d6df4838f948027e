"""The server as an attacker meets it: a web page in the user's browser, or any local process.

Each test is one attack from the security review; each failed against the server before these guards.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time

import aiohttp
import pytest
import torch
from pydantic import BaseModel, ConfigDict

from reactor_graph.node import Node, Port, register, registry

EVIL = "http://evil.example"
DEV = "http://localhost:5173"  # the JS SDK's dev server


def swap_graph():
    return registry()["test_paint"].GRAPH.replace("SECONDS", "0.0")


# -- swaps name declared alternatives only ------------------------------------------------------------------

def test_a_swap_spec_from_the_wire_imports_and_reads_nothing(tiny_engine, serve_engine, sdk_client, arun,
                                                             tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "rg_attacker_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"x" * 64)
    engine = tiny_engine(swap_graph())
    served = serve_engine(engine)

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            replies = []
            for spec in ({"type": "rg_attacker_module:Thing"},
                         {"type": "text_encoder", "params": {"dim": 8, "vocab_size": 5_000_000},
                          "in": {"text": "$slots.prompt"}},
                         {"type": "text_encoder", "params": {"weights": str(secret)}, "in": {"text": "$slots.prompt"}},
                         {"type": "text_encoder", "params": {"weights": str(tmp_path / "missing.safetensors")},
                          "in": {"text": "$slots.prompt"}}):
                mark = len(c.inner("runtime", "swapResult"))
                c.send("runtime", "swapNode", {"node": "cond", "spec": spec})
                replies.append((await c.wait_message("runtime", "swapResult", after=mark))["data"])
            for r in replies:
                assert r["ok"] is False and "the graph declares" in r["error"] and "const" in r["error"], r
            # an existing and a missing weights file get the same answer: no probe of the disk
            assert replies[2]["error"] == replies[3]["error"]
            assert engine.nodes["cond"] is engine.plan.nodes["cond"]

    arun(main(), 60)
    assert not marker.exists() and "rg_attacker_module" not in sys.modules


def test_a_swap_does_not_survive_into_the_next_session(tiny_engine, serve_engine, sdk_client, arun):
    engine = tiny_engine(swap_graph())
    served = serve_engine(engine)

    async def main():
        async with sdk_client(served.url) as a:
            await a.connect()
            await a.wait_ready()
            await a.wait_message("runtime", "sessionStarted")
            a.send("runtime", "swapNode", {"node": "cond", "alternative": "const"})
            r = await a.wait_message("runtime", "swapResult")
            assert r["data"]["ok"] and engine.nodes["cond"].name == "const"
            assert (await a.stop_session())["ok"]
        async with sdk_client(served.url) as b:
            await b.connect()
            await b.wait_ready()
            await b.wait_message("runtime", "sessionStarted")
            assert engine.nodes["cond"] is engine.plan.nodes["cond"]
            assert engine.wiring is engine.plan.wiring or engine.wiring.bindings == engine.plan.bindings

    arun(main(), 60)


# -- origins, hosts, token ------------------------------------------------------------------------------------

def test_a_foreign_origin_and_host_are_refused_while_localhost_works(served, sdk_client, arun):
    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.options(served.url + "/start_session", headers={
                    "Origin": EVIL, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Private-Network": "true"}) as r:
                assert r.status == 403
                assert "Access-Control-Allow-Origin" not in r.headers
                assert "Access-Control-Allow-Private-Network" not in r.headers
            async with http.post(served.url + "/start_session", json={}, headers={"Origin": EVIL}) as r:
                assert r.status == 403 and "--allow-origin http://evil.example" in await r.text()
                assert "Access-Control-Allow-Origin" not in r.headers
            async with http.get(served.url + "/health", headers={"Origin": EVIL}) as r:
                assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers  # unreadable there
            async with http.post(served.url + "/start_session", json={},
                                 headers={"Host": f"evil.example:{served.server.port}"}) as r:
                assert r.status == 403 and "loopback" in await r.text()  # DNS rebinding
            async with http.post(served.url + "/start_session", json={}, headers={"Origin": DEV}) as r:
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == DEV
        async with sdk_client(served.url) as c:  # a client in session, then a foreign page tries to end it
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            async with aiohttp.ClientSession() as http:
                async with http.post(served.url + "/stop_session", headers={"Origin": EVIL}) as r:
                    assert r.status == 403
            await asyncio.sleep(0.3)
            assert served.manager.active is not None and served.manager.active.id == c.session["session_id"]

    arun(main(), 60)


def test_allow_origin_and_token(tiny_engine, serve_engine, arun):
    from reactor_graph.server.access import AccessPolicy

    served = serve_engine(tiny_engine(), access=AccessPolicy(allow_origins=["https://app.example.com"],
                                                             token="s3cret"))
    assert served.server.page_url.endswith("/auth/s3cret/")

    async def main():
        app = {"Origin": "https://app.example.com"}
        async with aiohttp.ClientSession() as http:
            async with http.post(served.url + "/start_session", json={}, headers=app) as r:
                assert r.status == 401 and "token" in await r.text()
            async with http.post(served.url + "/auth/wrong/start_session", json={}, headers=app) as r:
                assert r.status == 401
            async with http.post(served.url + "/start_session", json={},
                                 headers={**app, "Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
            # the SDK's local mode appends its routes to apiUrl, so the token rides in the path
            async with http.post(served.url + "/auth/s3cret/start_session", json={}, headers=app) as r:
                assert r.status == 200
                sid = (await r.json())["session_id"]
            async with http.get(f"{served.url}/auth/s3cret/sessions/{sid}/transport/webrtc/ice_servers",
                                headers={"Authorization": "Bearer local"}) as r:
                assert r.status == 200
            async with http.get(served.url + "/auth/s3cret/", headers=app) as r:
                assert r.status == 200 and "<html" in (await r.text()).lower()
            async with http.post(served.url + "/stop_session", json={"session_id": sid}, headers=app) as r:
                assert r.status == 401

    arun(main(), 30)


def test_access_policy_names():
    from reactor_graph.server.access import AccessPolicy, Refused, is_loopback_host

    assert all(map(is_loopback_host, ["localhost", "127.0.0.1", "127.1.2.3", "[::1]", "::1", "app.localhost"]))
    assert not any(map(is_loopback_host, ["evil.example", "10.0.0.1", "localhost.evil.example", "[::2]"]))
    p = AccessPolicy()
    for origin in ("http://localhost:5173", "http://127.0.0.1:3000", "http://[::1]:8080"):
        assert p.origin_allowed(origin)
    for origin in (EVIL, "null", "file://", "http://localhost.evil.example:5173"):
        assert not p.origin_allowed(origin)
    with pytest.raises(Refused):
        p.check("POST", "127.0.0.1:8080", "null", False, None, None)
    p.check("GET", "127.0.0.1:8080", "null", False, None, None)  # a read without a grant is harmless
    wide = AccessPolicy(bind="0.0.0.0")
    wide.check("POST", "192.168.1.5:8080", "http://192.168.1.5:8080", False, None, None)  # our own page
    with pytest.raises(ValueError, match="--allow-origin"):
        AccessPolicy(allow_origins=["app.example.com"])


# -- fair use ------------------------------------------------------------------------------------------------

def test_a_start_session_flood_does_not_keep_a_real_client_out(served, sdk_client, arun):
    async def main():
        async with aiohttp.ClientSession() as http:
            async def one():
                async with http.post(served.url + "/start_session", json={}) as r:
                    return r.status

            statuses = await asyncio.gather(*(one() for _ in range(200)))
        assert statuses.count(200) >= 1
        pending = [c for c in served.manager.clients.values() if not c.connected]
        assert len(pending) <= served.manager.settings.max_pending_per_address
        t0 = time.monotonic()
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted", timeout=5)
        assert time.monotonic() - t0 < 5

    arun(main(), 60)


def test_max_session_seconds_lets_the_next_in_line_in(tiny_engine, serve_engine, sdk_client, arun):
    served = serve_engine(tiny_engine(), max_session_seconds=1.5)

    async def main():
        async with sdk_client(served.url) as a, sdk_client(served.url) as b:
            await a.connect()
            await a.wait_ready()
            await a.wait_message("runtime", "sessionStarted")
            await b.connect()
            await b.wait_ready()
            ended = await a.wait_message("runtime", "sessionEnded", timeout=10)
            assert "time limit" in ended["data"]["reason"]
            await b.wait_message("runtime", "sessionStarted", timeout=10)

    arun(main(), 60)


def test_a_waiting_client_that_went_silent_is_not_promoted(tiny_engine, serve_engine, sdk_client, arun):
    served = serve_engine(tiny_engine(), ping_timeout=2.0)

    async def main():
        async with sdk_client(served.url) as a, sdk_client(served.url, ping=False) as b:
            await a.connect()
            await a.wait_ready()
            await a.wait_message("runtime", "sessionStarted")
            await b.connect()
            await b.wait_ready()
            await asyncio.sleep(1.8)  # b is still in line, but has not been heard from for a while
            await a.stop_session()
            ended = await b.wait_message("runtime", "sessionEnded", timeout=10)
            assert ended["data"]["reason"] == "no ping"
            assert not b.inner("runtime", "sessionStarted")

    arun(main(), 60)


# -- a stuck block -------------------------------------------------------------------------------------------

@register("test_hang")
class Hang(Node):
    """Passes frames on; from its third block on it blocks until released, never looking at should_stop()."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    every_block = True
    release = threading.Event()
    calls = 0

    def ports(self):
        g = self.graph
        frames = Port("tensor", "float", (2, 3, g.height, g.width))
        return {"frames": frames}, {"frames": frames}

    def forward(self, frames):
        Hang.calls += 1
        if Hang.calls >= 3:
            Hang.release.wait(60)
        return {"frames": frames * 1.0}


HANG_GRAPH = """\
reactor-graph: 1
name: hangs
size: [16, 16]
device: cpu
slots:
  prompt: {type: str, default: "a red circle"}
nodes:
  cond: {type: test_const_cond, in: {text: $slots.prompt}}
  paint: {type: test_paint, in: {embeds: cond.embeds}}
  stuck: {type: test_hang, in: {frames: paint.frames}}
  out: {type: emit, in: {frames: stuck.frames}}
"""


def test_a_hung_node_ends_the_session_with_its_name(tiny_engine, serve_engine, sdk_client, arun):
    Hang.calls, fatal = 0, []
    Hang.release.clear()
    served = serve_engine(tiny_engine(HANG_GRAPH), block_timeout=1.0, stop_timeout=0.5, stuck_exit_seconds=1.5)
    served.sync(lambda: setattr(served.manager, "on_fatal", fatal.append))

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            t0 = time.monotonic()
            ended = await c.wait_message("runtime", "sessionEnded", timeout=10)
            assert time.monotonic() - t0 < 5
            assert "block timeout" in ended["data"]["reason"] and "'stuck'" in ended["data"]["reason"]
            err = [e["data"] for e in c.inner("runtime", "error") if e["data"]["code"] == "block_timeout"]
            assert err and err[0]["node"] == "stuck"
        async with aiohttp.ClientSession() as http:
            async with http.get(served.url + "/health") as r:
                health = await r.json()
                assert health["ok"] is False and "stuck" in health["reason"]
            async with http.post(served.url + "/start_session", json={}) as r:
                assert r.status == 503 and "stuck" in await r.text()
            end = time.monotonic() + 10
            while not fatal and time.monotonic() < end:
                await asyncio.sleep(0.1)
            assert fatal and "stuck" in fatal[0]  # the process would exit now for its supervisor
            Hang.release.set()  # the node comes back after all: the model takes sessions again
            end = time.monotonic() + 10
            while True:
                async with http.post(served.url + "/start_session", json={}) as r:
                    if r.status == 200:
                        break
                assert time.monotonic() < end, "the server did not take sessions again"
                await asyncio.sleep(0.2)

    try:
        arun(main(), 60)
    finally:
        Hang.release.set()


# -- ICE candidates ------------------------------------------------------------------------------------------

def test_ice_candidates_follow_the_bind_address(served, sdk_client, arun):
    from reactor_graph.server.rtc_guards import advertise, candidate_addresses

    assert candidate_addresses("127.0.0.1", ["10.0.0.5"], ipv6=False) == ["127.0.0.1"]
    assert candidate_addresses("10.0.0.5", ["10.0.0.5", "172.17.0.1"], ipv6=False) == ["10.0.0.5"]
    assert candidate_addresses("0.0.0.0", ["10.0.0.5", "172.17.0.1"], ipv6=False) == ["10.0.0.5", "172.17.0.1"]
    sdp = "v=0\r\nc=IN IP4 10.0.0.5\r\na=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\n"
    assert advertise(sdp, "203.0.113.7") == ("v=0\r\nc=IN IP4 203.0.113.7\r\n"
                                             "a=candidate:1 1 udp 2130706431 203.0.113.7 40000 typ host\r\n")

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            answer = served.manager.clients[c.session["session_id"]].answer
            hosts = {line.split()[4] for line in answer.splitlines() if line.startswith("a=candidate:")}
            assert hosts == {"127.0.0.1"}, hosts

    arun(main(), 60)


# -- bad bytes and bad params ----------------------------------------------------------------------------------

def test_invalid_utf8_gets_an_error_and_the_session_goes_on(served, sdk_client, arun):
    from aiortc import rtcsctptransport as sctp

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            transport = c.pc.sctp
            transport._data_channel_queue.append((c.channel, sctp.WEBRTC_STRING, b'{"scope": "\xff\xfe"}'))
            await transport._data_channel_flush()
            err = await c.wait_message("runtime", "error", where=lambda d: d["code"] == "bad_utf8")
            assert "UTF-8" in err["data"]["message"]
            c.send("application", "set_prompt", {"prompt": "still here"})
            r = await c.wait_message("application", "commandResult", where=lambda d: d["ok"])
            assert r["data"]["command"] == "set_prompt" and c.pc.connectionState == "connected"

    arun(main(), 60)


def test_command_params_are_not_coerced():
    from reactor_graph.errors import CommandError
    from reactor_graph.slots import Command
    from reactor_graph.spec import CommandSpec

    cmd = Command.build("set_seed", CommandSpec.model_validate(
        {"params": {"seed": {"type": "int", "ge": 0}, "gain": {"type": "float", "default": 1.0}},
         "set": {"seed": "$seed"}}))
    assert cmd.validate({"seed": 17}).seed == 17
    assert cmd.validate({"seed": 1, "gain": 2}).gain == 2.0  # a JSON integer is a number
    for bad in ({"seed": True}, {"seed": "17"}, {"seed": 18.0}, {"seed": 1, "gain": "2"}):
        with pytest.raises(CommandError) as err:
            cmd.validate(bad)
        assert err.value.field in ("seed", "gain")


def test_a_bad_offer_gets_a_reply_in_user_terms(served, arun):
    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.post(served.url + "/start_session", json={}) as r:
                sid = (await r.json())["session_id"]
            base = f"{served.url}/sessions/{sid}/transport/webrtc/sdp_params"
            async with http.post(base, json={"sdp_offer": "v=0\r\nm=video nonsense\r\n", "track_mapping": []}) as r:
                text = await r.text()
                assert r.status == 400 and "could not answer the SDP offer" in text
                assert "Error" not in text and "Traceback" not in text and "line" not in text

    arun(main(), 30)


def test_an_alias_bomb_is_refused_quickly_with_its_line():
    from reactor_graph.errors import GraphError
    from reactor_graph.spec import parse_yaml

    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    text = "reactor-graph: 1\n" + "\n".join(levels) + "\n"
    assert len(text) < 400
    from reactor_graph import spec

    taken = []
    original = spec._Budget.take
    spec._Budget.take = lambda self, node: (taken.append(1), original(self, node))[1]
    try:
        t0 = time.perf_counter()
        with pytest.raises(GraphError) as err:
            parse_yaml(text, "bomb.yaml")
        elapsed = time.perf_counter() - t0
    finally:
        spec._Budget.take = original
    # bounded work, not a timing: the walk stops at the budget (9**8 values otherwise); well under a second
    # on an idle machine, and the loose bound below holds even on a loaded one
    assert len(taken) <= spec.MAX_YAML_VALUES + 1 and elapsed < 5.0
    issue = err.value.issues[0]
    assert "aliases" in issue.message and issue.line is not None
    data, _ = parse_yaml("a: &x [1, 2]\nb: *x\n")  # a modest alias is still fine
    assert data == {"a": [1, 2], "b": [1, 2]}
