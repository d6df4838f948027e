"""Whatever a client sends, the process stays up and the stream goes on."""
import asyncio
import json

import aiohttp


def codes(c):
    return [m["data"]["code"] for m in c.inner("runtime", "error")]


async def frames_flow(c, seconds=1.0):
    n = len(c.frames)
    await asyncio.sleep(seconds)
    return len(c.frames) - n


def test_malformed_unknown_and_oversized_messages(served, sdk_client, arun, is_nonblank):
    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            await c.wait_for(lambda: any(is_nonblank(f) for _, f in c.frames), 30, "a generated frame")
            bad = [
                ("{not json", "bad_json"),
                ("[" * 20000 + "]" * 20000, "bad_json"),  # nested too deep for the parser
                ("[1, 2]", "bad_envelope"),
                ('"text"', "bad_envelope"),
                ("null", "bad_envelope"),
                ('{"scope": "elsewhere", "data": {"type": "x"}}', "bad_envelope"),
                ('{"scope": "application", "data": "set_prompt"}', "bad_envelope"),
                ('{"scope": "application", "data": {"type": 5}}', "bad_envelope"),
                ('{"scope": "application"}', "bad_envelope"),
                (json.dumps({"scope": "application", "data": {"type": "set_prompt",
                                                              "data": {"prompt": "x" * 70000}}}), "too_large"),
                (b"\x00\x01binary", "bad_envelope"),
                ('{"scope": "runtime", "data": {"type": "selfDestruct", "data": {}}}', "unknown_runtime"),
            ]
            for raw, _ in bad:
                c.send_raw(raw)
            await c.wait_for(lambda: len(codes(c)) >= len(bad), 10, "an error per bad message")
            assert codes(c) == [code for _, code in bad]

            # commands that are wrong in content are answered per command, with the field when there is one
            c.send("application", "make_coffee", {"sugar": 2})
            c.send("application", "set_prompt", ["not", "an", "object"])
            c.send("application", "set_prompt", {"prompt": 42})
            c.send("application", "set_prompt", {})
            c.send("application", "reset", {"hard": True})
            await c.wait_for(lambda: len(c.inner("application", "commandResult")) >= 5, 10, "5 replies")
            replies = [m["data"] for m in c.inner("application", "commandResult")]
            assert all(r["ok"] is False for r in replies)
            assert "unknown command" in replies[0]["error"]["message"] and "set_prompt" in replies[0]["error"]["message"]
            assert "object" in replies[1]["error"]["reason"]
            assert replies[2]["error"]["field"] == "prompt"
            assert replies[3]["error"]["field"] == "prompt" and replies[3]["error"]["reason"] == "required parameter is missing"

            assert await frames_flow(c) >= 8  # the stream goes on
            c.send("application", "set_prompt", {"prompt": "still here"})
            r = await c.wait_message("application", "commandResult", where=lambda d: d["ok"])
            assert r["data"]["command"] == "set_prompt"
            assert served.engine.slots.values["prompt"] == "still here"

    arun(main(), 60)


def test_a_flood_is_refused_with_one_error_and_the_stream_goes_on(tiny_engine, serve_engine, sdk_client, arun,
                                                                  is_nonblank):
    served = serve_engine(tiny_engine(), rate=20, burst=40)

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            await c.wait_for(lambda: any(is_nonblank(f) for _, f in c.frames), 30, "a generated frame")
            msg = json.dumps({"scope": "application", "data": {"type": "set_prompt", "data": {"prompt": "flood"}}})
            for _ in range(1000):
                c.send_raw(msg)
            await c.wait_for(lambda: "rate_limited" in codes(c), 10, "the rate-limit error")
            await asyncio.sleep(1.0)
            limited = codes(c).count("rate_limited")
            assert 1 <= limited <= 3, codes(c)
            applied = [m for m in c.inner("application", "commandResult")]
            assert 40 <= len(applied) <= 200  # the burst, plus what the rate refilled; not 1000
            assert await frames_flow(c) >= 8
            async with aiohttp.ClientSession() as http:
                async with http.get(served.url + "/health") as r:
                    assert (await r.json())["in_session"] is True
                async with http.get(served.url + "/metrics") as r:
                    text = await r.text()
            rejected = [line for line in text.splitlines()
                        if line.startswith('reactor_graph_messages_rejected_total{code="rate_limited"}')]
            assert rejected and float(rejected[0].split()[-1]) >= 800
            await asyncio.sleep(2.5)  # the bucket refills; the client is heard again
            n = len(c.inner("application", "commandResult"))
            c.send("application", "set_prompt", {"prompt": "after the flood"})
            r = await c.wait_message("application", "commandResult", after=n, timeout=10)
            assert r["data"]["ok"] is True

    arun(main(), 60)


def test_a_partly_understood_prompt_is_applied_with_a_warning(tiny_engine, serve_engine, sdk_client, arun,
                                                               tiny_yaml):
    graph = tiny_yaml.replace("params: {dim: 16, max_tokens: 8, heads: 2}",
                              "params: {dim: 16, max_tokens: 8, heads: 2, vocabulary: [red, blue, circle], "
                              "filler: [a]}")
    served = serve_engine(tiny_engine(graph))

    async def main():
        async with sdk_client(served.url) as c:
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            c.send("application", "set_prompt", {"prompt": "a blue dog"})
            r = await c.wait_message("application", "commandResult", where=lambda d: d["ok"])
            assert r["data"]["warning"] == "not understood (ignored): dog"
            assert served.engine.slots.values["prompt"] == "a blue dog"
            c.send("application", "set_prompt", {"prompt": "a wet dog"})
            r = await c.wait_message("application", "commandResult", where=lambda d: not d["ok"])
            assert "not understood" in r["data"]["error"]["message"]

    arun(main(), 60)
