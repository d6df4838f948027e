"""Real browsers: headless Chromium plays the built-in page, and a page bundling the unmodified Reactor JS
SDK 2.9.0 (tests/browser) connects in local mode from another origin. Both skip cleanly without Chromium;
the SDK test also without node/npm and the bundle (`.ci/run` installs all of them)."""
import asyncio
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

BROWSER_DIR = Path(__file__).resolve().parents[1] / "browser"
BUNDLE = BROWSER_DIR / "dist" / "sdk_page.js"


def test_builtin_page_plays_and_sends_commands(served, chromium, sdk_client, arun):
    engine = served.engine

    async def main():
        async with chromium() as b, sdk_client(served.url) as first:
            # someone else has the model: the page waits in line and shows its position
            await first.connect()
            await first.wait_ready()
            await first.wait_message("runtime", "sessionStarted")
            await b.goto(served.url + "/")
            await b.wait_js("window.__rg && window.__rg.queue === 1", 30, "the page's place in line")
            assert "position 1" in await b.js("document.getElementById('queue').textContent")
            await first.stop_session()
            await b.wait_js("window.__rg.status === 'in session'", 30, "the session to start")
            assert await b.js("document.getElementById('queue').hidden") is True
            # the video plays: decoded frames advance and so does currentTime
            f0 = await b.wait_js("window.__rg.frames > 0 && window.__rg.frames", 30, "a decoded frame")
            t0 = await b.js("document.getElementById('video').currentTime")
            await asyncio.sleep(1.5)
            f1 = await b.js("window.__rg.frames")
            t1 = await b.js("document.getElementById('video').currentTime")
            assert f1 - f0 >= 8, (f0, f1)
            assert t1 > t0
            assert await b.js("document.getElementById('video').videoWidth") == 32
            # a form per command, built from its schema
            assert await b.js("[...document.querySelectorAll('form.command')].map(f => f.dataset.command)") == [
                "set_prompt", "reset"]
            assert await b.js("document.querySelector('form[data-command=set_prompt] input[name=prompt]').maxLength") == 50
            await b.js("""(() => {
                const form = document.querySelector('form[data-command=set_prompt]');
                form.elements.prompt.value = 'a green triangle';
                form.requestSubmit();
            })()""")
            await b.wait_js("document.querySelector('form[data-command=set_prompt] .reply').textContent === 'applied'",
                            15, "the command's reply on the page")
            assert engine.slots.values["prompt"] == "a green triangle"
            # live stats from the server
            await b.wait_js("window.__rg.stats && typeof window.__rg.stats.block_ms === 'number'", 10, "stats")
            assert await b.js("document.getElementById('stat-depth').textContent") != "–"
            # the disconnect button ends the session on the server
            await b.js("document.getElementById('disconnect').click()")
            for _ in range(100):
                if not served.manager.clients and not engine.busy:
                    break
                await asyncio.sleep(0.1)
            assert not served.manager.clients and not engine.busy

    arun(main(), 120)


def _bundle() -> Path:
    if BUNDLE.exists():
        return BUNDLE
    esbuild = BROWSER_DIR / "node_modules" / ".bin" / "esbuild"
    if not (BROWSER_DIR / "node_modules" / "@reactor-team" / "js-sdk").is_dir() or not esbuild.exists() \
            or shutil.which("node") is None:
        pytest.skip("the Reactor JS SDK is not installed in tests/browser (cd tests/browser && npm ci)")
    subprocess.run([str(esbuild), "sdk_page/main.js", "--bundle", "--format=iife", "--platform=browser",
                    "--minify", f"--outfile={BUNDLE.relative_to(BROWSER_DIR)}"],
                   cwd=BROWSER_DIR, check=True, timeout=120, capture_output=True)
    return BUNDLE


async def _static_site(files: dict[str, Path]):
    """Serve the test page from a second origin (another port), so the SDK's calls are cross-origin."""
    app = web.Application()
    def handler(path: Path):
        async def serve_file(request):
            return web.FileResponse(path)
        return serve_file

    for name, path in files.items():
        app.router.add_get("/" + name, handler(path))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def test_reactor_js_sdk_connects_in_local_mode(served, chromium, arun):
    bundle = _bundle()
    engine = served.engine

    async def main():
        runner, origin = await _static_site({"index.html": BROWSER_DIR / "sdk_page" / "index.html",
                                             "sdk_page.js": bundle})
        try:
            async with chromium() as b:
                await b.goto(f"{origin}/index.html?api={served.url}")
                await b.wait_js("window.__sdk && window.__sdk.status === 'ready'", 40, "SDK status ready")
                assert await b.js("window.__sdk.tracks") == ["main_video"]
                assert await b.js("window.__sdk.connectError") is None
                caps = await b.js("window.__sdk.capabilities")
                assert {c["name"] for c in caps["commands"]} == {"set_prompt", "reset"}
                f0 = await b.wait_js("window.__sdk.frames > 0 && window.__sdk.frames", 30, "SDK frames")
                await asyncio.sleep(1.5)
                assert await b.js("window.__sdk.frames") - f0 >= 8
                await b.wait_js("window.__sdk.runtime.some(m => m.type === 'sessionStarted')", 10)
                # commands and capabilities through the SDK's own calls
                await b.js("reactor.sendCommand('set_prompt', {prompt: 'from the sdk'})")
                await b.wait_js("window.__sdk.messages.some(m => m.type === 'commandResult' && m.data.ok)", 15,
                                "the command's reply")
                assert engine.slots.values["prompt"] == "from the sdk"
                await b.js("reactor.sendCommand('set_prompt', {prompt: ''})")
                err = await b.wait_js("window.__sdk.messages.find(m => m.type === 'commandResult' && !m.data.ok)",
                                      15, "the error reply")
                assert err["data"]["error"]["field"] == "prompt"
                await b.js("reactor.sendCommand('requestCapabilities', {}, 'runtime')")
                await b.wait_js("window.__sdk.runtime.some(m => m.type === 'modelCapabilities' && "
                                "m.data.commands.length === 2)", 15, "modelCapabilities")
                assert await b.js("window.__sdk.errors") == []
                # disconnect(): POST /stop_session without an id; the only client is stopped
                await b.js("reactor.disconnect()")
                await b.wait_js("window.__sdk.status === 'disconnected'", 10)
                for _ in range(100):
                    if not served.manager.clients and not engine.busy:
                        break
                    await asyncio.sleep(0.1)
                assert not served.manager.clients and not engine.busy
                reasons = await _ended_reasons(served.url)
                assert reasons.get("stop_session", 0) >= 1, reasons
        finally:
            await runner.cleanup()

    arun(main(), 120)


async def _ended_reasons(url: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as r:
            text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("reactor_graph_sessions_ended_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.split()[-1])
    return out
