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


CAMERA_GRAPH = """\
reactor-graph: 1
name: camera
size: [32, 32]
fps: 16
device: cpu
slots:
  camera: {type: video, size: [32, 32]}
commands:
  set_image:
    description: Show a picture while no camera is live
    params: {image: {type: image}}
    set: {camera: $image}
nodes:
  out:
    type: emit
    in: {frames: $slots.camera}
"""

# the mean RGB of what the SDK's main_video shows now, read back from a canvas
MEAN_RGB = """(() => {
  const v = document.getElementById('video');
  const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
  if (!c.width) return null;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data; const m = [0, 0, 0];
  for (let i = 0; i < d.length; i += 4) { m[0] += d[i]; m[1] += d[i + 1]; m[2] += d[i + 2]; }
  return m.map(x => x / (d.length / 4));
})()"""

# a canvas track whose colour the test sets (window.__paint), published with the SDK's own publishTrack
CANVAS_TRACK = """(() => {
  const c = document.createElement('canvas'); c.width = 160; c.height = 120;
  const g = c.getContext('2d');
  window.__paint = (colour) => { window.__colour = colour; window.__painted = performance.now(); };
  window.__paint('rgb(255,0,0)');
  const draw = () => { g.fillStyle = window.__colour; g.fillRect(0, 0, 160, 120); requestAnimationFrame(draw); };
  draw(); setInterval(() => { g.fillStyle = window.__colour; g.fillRect(0, 0, 160, 120); }, 20);
  window.__canvasTrack = c.captureStream(30).getVideoTracks()[0];
  return true;
})()"""


def test_reactor_js_sdk_publishes_a_camera_and_uploads_an_image(tiny_engine, serve_engine, chromium, arun):
    """The real SDK 2.9.0: publishTrack('camera', ...) with a canvas track and with Chromium's fake camera
    feeds the graph's video slot (the output follows it, and is black without it); uploadFile + sendCommand
    sets a still; a junk upload is refused."""
    bundle = _bundle()
    served = serve_engine(tiny_engine(CAMERA_GRAPH), ping_timeout=15, connect_timeout=15)
    engine = served.engine

    async def main():
        runner, origin = await _static_site({"index.html": BROWSER_DIR / "sdk_page" / "index.html",
                                             "sdk_page.js": bundle})
        try:
            async with chromium() as b:
                await b.goto(f"{origin}/index.html?api={served.url}")
                await b.wait_js("window.__sdk && window.__sdk.status === 'ready'", 40, "SDK status ready")
                await b.wait_js("window.__sdk.frames > 3", 30, "SDK frames")
                rgb = await b.wait_js(MEAN_RGB, 10, "a picture")
                assert max(rgb) < 10, rgb  # no camera yet: the slot's default (black)
                # a canvas track, through the SDK's publishTrack
                await b.js(CANVAS_TRACK)
                await b.js("reactor.publishTrack('camera', window.__canvasTrack)")
                await b.wait_js(f"(() => {{ const m = {MEAN_RGB}; return m && m[0] > 180 && m[1] < 70; }})()", 20,
                                "the output to turn red with the published canvas")
                # latency: the canvas changes colour -> the first decoded SDK frame showing it (checked on every
                # frame the page's <video> presents, requestVideoFrameCallback)
                await b.js(f"""(() => {{
                    const v = document.getElementById('video');
                    const tick = () => {{
                        if (window.__want) {{ const m = {MEAN_RGB}; if (m && window.__want(m)) {{
                            window.__seen = performance.now() - window.__painted; window.__want = null; }} }}
                        v.requestVideoFrameCallback(tick);
                    }};
                    v.requestVideoFrameCallback(tick); return true; }})()""")
                latencies = []
                for colour, test in (("rgb(0,255,0)", "m[1] > 180 && m[0] < 70"), ("rgb(0,0,255)", "m[2] > 180 && m[1] < 70"),
                                     ("rgb(255,255,255)", "m[0] > 180 && m[2] > 180"), ("rgb(255,0,0)", "m[0] > 180 && m[1] < 70")) * 3:
                    await b.js(f"window.__seen = null; window.__want = (m) => {test}; window.__paint('{colour}')")
                    latencies.append(await b.wait_js("window.__seen", 10, colour))
                    await asyncio.sleep(0.1)
                inputs = served.sync(lambda: served.manager.stats()["inputs"]["camera"])
                assert inputs["state"] == "camera" and inputs["received"] > 10, inputs
                lat = sorted(latencies)
                print(f"\ncanvas colour -> first SDK video frame showing it (Chromium, loopback, 16 fps, {len(lat)} "
                      f"changes): p50 {lat[len(lat) // 2]:.0f} ms, p95 {lat[int(len(lat) * 0.95)]:.0f} ms, max "
                      f"{lat[-1]:.0f} ms; server frame -> block start p50 "
                      f"{inputs['latency_ms_p50']} ms")
                # Chromium's fake camera (getUserMedia), as <WebcamStream> would publish it
                await b.js("navigator.mediaDevices.getUserMedia({video: {width: 640, height: 480}})"
                           ".then(s => reactor.publishTrack('camera', s.getVideoTracks()[0]))")
                before = served.sync(lambda: served.manager.stats()["inputs"]["camera"]["received"])
                await b.wait_js(f"(() => {{ const m = {MEAN_RGB}; return m && !(m[0] > 180 && m[1] < 70) && "
                                f"(m[0] + m[1] + m[2]) > 30; }})()", 20, "the fake camera's picture")
                assert served.sync(lambda: served.manager.stats()["inputs"]["camera"]["received"]) > before
                # unpublish: back to the default after a second
                await b.js("reactor.unpublishTrack('camera')")
                await b.wait_js(f"(() => {{ const m = {MEAN_RGB}; return m && Math.max(...m) < 10; }})()", 20,
                                "black again without a camera")
                # uploadFile (POST uploads, PUT, fileUploaded) -> FileRef -> sendCommand(set_image, {image: ref})
                await b.js("""(async () => {
                    const c = document.createElement('canvas'); c.width = 64; c.height = 48;
                    const g = c.getContext('2d'); g.fillStyle = 'rgb(0,200,255)'; g.fillRect(0, 0, 64, 48);
                    const blob = await new Promise(r => c.toBlob(r, 'image/png'));
                    window.__ref = await reactor.uploadFile(new File([blob], 'cyan.png', {type: 'image/png'}));
                    await reactor.sendCommand('set_image', {image: window.__ref});
                    return true;
                })()""")
                ref = await b.js("({id: window.__ref.uploadId, name: window.__ref.name, type: window.__ref.mimeType})")
                assert ref["name"] == "cyan.png" and ref["type"] == "image/png" and len(ref["id"]) >= 20
                await b.wait_js("window.__sdk.messages.some(m => m.type === 'commandResult' && m.data.ok && "
                                "m.data.command === 'set_image')", 15, "set_image applied")
                await b.wait_js(f"(() => {{ const m = {MEAN_RGB}; return m && m[2] > 200 && m[0] < 60; }})()", 15,
                                "the uploaded picture")
                # a junk file is refused by the server, so uploadFile throws and nothing changes
                err = await b.js("""reactor.uploadFile(new File([new Uint8Array(200).fill(7)], 'x.png',
                                                               {type: 'image/png'})).then(() => null, e => String(e))""")
                assert err and "415" in err and "not a PNG" in err, err
                err = await b.js("""reactor.uploadFile(new File(['<html>'], 'x.html', {type: 'text/html'}))
                                    .then(() => null, e => String(e))""")
                assert err and "415" in err, err
                assert await b.js(f"(() => {{ const m = {MEAN_RGB}; return m[2] > 200 && m[0] < 60; }})()")
                assert engine.busy and await b.js("window.__sdk.status") == "ready"
                await b.js("reactor.disconnect()")
                for _ in range(100):
                    if not served.manager.clients and not engine.busy:
                        break
                    await asyncio.sleep(0.1)
                assert not served.manager.uploads.sessions  # the session's uploads went with it
        finally:
            await runner.cleanup()

    arun(main(), 150)


def test_builtin_page_uses_the_camera_and_uploads_an_image(tiny_engine, serve_engine, chromium, arun):
    """The built-in page offers 'use my camera' per video slot (Chromium's fake camera here) and a file input
    for image params (uploaded the SDK's way)."""
    served = serve_engine(tiny_engine(CAMERA_GRAPH), ping_timeout=15, connect_timeout=15)

    async def main():
        async with chromium() as b:
            await b.goto(served.url + "/")
            await b.wait_js("window.__rg && window.__rg.status === 'in session'", 30, "the session")
            await b.wait_js("window.__rg.frames > 3", 30, "frames")
            assert await b.js("document.getElementById('inputs-title').hidden") is False
            await b.js("document.querySelector('#inputs button[data-track=camera]').click()")
            await b.wait_js("document.querySelector('#inputs button').textContent.startsWith('Stop')", 15, "camera on")
            await b.wait_js(f"(() => {{ const m = {MEAN_RGB}; return m && (m[0] + m[1] + m[2]) > 30; }})()", 20,
                            "the fake camera's picture")
            await b.wait_js("(document.getElementById('stat-inputs').textContent || '').includes('camera: camera')",
                            10, "the page's stats to say the camera is live")
            await b.js("document.querySelector('#inputs button').click()")  # stop: the default again
            await b.wait_js(f"(() => {{ const m = {MEAN_RGB}; return m && Math.max(...m) < 10; }})()", 20, "black")
            await b.js("""(async () => {
                const c = document.createElement('canvas'); c.width = 40; c.height = 40;
                const g = c.getContext('2d'); g.fillStyle = 'rgb(255,200,0)'; g.fillRect(0, 0, 40, 40);
                const blob = await new Promise(r => c.toBlob(r, 'image/png'));
                const dt = new DataTransfer(); dt.items.add(new File([blob], 'y.png', {type: 'image/png'}));
                const form = document.querySelector('form[data-command=set_image]');
                form.elements.image.files = dt.files;
                form.requestSubmit();
                return true;
            })()""")
            await b.wait_js("document.querySelector('form[data-command=set_image] .reply').textContent === 'applied'",
                            15, "set_image applied")
            await b.wait_js(f"(() => {{ const m = {MEAN_RGB}; return m && m[0] > 200 && m[1] > 150 && m[2] < 60; }})()",
                            15, "the uploaded picture")

    arun(main(), 120)
