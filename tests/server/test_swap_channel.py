"""Hot-swapping over the data channel: capabilities list the alternatives; swapNode lands and reports its stall."""
from reactor_graph.node import registry


def test_swap_over_the_data_channel(tiny_engine, serve_engine, sdk_client, arun):
    engine = tiny_engine(registry()["test_paint"].GRAPH.replace("SECONDS", "0.0"))
    served = serve_engine(engine)

    async def main():
        async with sdk_client(served.url) as c:
            await c.start_session()
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            c.send("runtime", "requestCapabilities", {})
            caps = await c.wait_message("runtime", "modelCapabilities")
            alts = {a["name"]: a["targets"] for a in caps["data"]["alternatives"]}
            assert alts == {"const": ["cond"], "wide": [], "paint_neg": ["paint"]}

            c.send("runtime", "swapNode", {"node": "cond", "alternative": "const"})
            r = await c.wait_message("runtime", "swapResult")
            assert r["data"]["ok"] and r["data"]["now"] == "const" and r["data"]["stall_ms"] >= 0
            assert engine.nodes["cond"].name == "const"

            mark = len(c.inner("runtime", "swapResult"))
            c.send("runtime", "swapNode", {"node": "cond", "alternative": "wide"})
            r = await c.wait_message("runtime", "swapResult", after=mark)
            assert not r["data"]["ok"] and "output 'embeds' differs" in r["data"]["error"]
            assert engine.nodes["cond"].name == "const"  # refused: nothing changed

            mark = len(c.inner("runtime", "swapResult"))
            c.send("runtime", "swapNode", {"node": "cond", "alternative": "cond"})
            r = await c.wait_message("runtime", "swapResult", after=mark)
            assert r["data"]["ok"] and engine.nodes["cond"] is engine.plan.nodes["cond"]

    arun(main())
