"""The input side over the wire (Python aiortc client speaking the SDK's local protocol): a published track
feeds the graph's video slot; uploads as the SDK 2.9.0 makes them; junk and bombs refused; uploads deleted
with the session."""
import asyncio
import base64
import io
import os
import time

import aiohttp
import numpy as np
import pytest

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


def png(w, h, colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def luma(frame) -> float:
    return float(frame.to_ndarray(format="yuv420p")[: frame.height].mean())


class Colour:
    """A published video track of solid frames whose grey level the test sets (aiortc MediaStreamTrack)."""

    def __new__(cls, *a, **k):
        from aiortc import VideoStreamTrack

        class _Track(VideoStreamTrack):
            def __init__(self):
                super().__init__()
                self.level, self.changed = 16, None

            async def recv(self):
                import av

                pts, base = await self.next_timestamp()
                img = np.full((48, 64, 3), self.level, np.uint8)  # 4:3, the server crops to the slot's 1:1
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = pts, base
                return frame

        return _Track()


@pytest.fixture
def camera_server(tiny_engine, serve_engine):
    return serve_engine(tiny_engine(CAMERA), ping_timeout=15, connect_timeout=15)


def test_published_track_feeds_the_video_slot(camera_server, sdk_client, arun):
    served = camera_server

    async def main():
        async with sdk_client(served.url) as c:
            s = await c.start_session()
            assert s["capabilities"]["tracks"] == [
                {"name": "main_video", "kind": "video", "direction": "recvonly"},
                {"name": "camera", "kind": "video", "direction": "sendonly"}]
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            await c.wait_for(lambda: len(c.frames) > 5, 15, "frames")
            assert luma(c.frames[-1][1]) < 20  # no camera yet: the default (black)
            sender = next(t for t in c.pc.getTransceivers() if t.direction == "sendonly").sender
            track = Colour()
            sender.replaceTrack(track)  # what publishTrack("camera", track) does
            latencies = []
            before = 16.0
            for level in (200, 60, 160, 100, 220, 40):
                track.level = level
                t0 = time.monotonic()
                n = len(c.frames)
                y = 16 + level * 219 / 255
                # the first output frame nearer the new level than the old one used a new camera frame
                got = await c.wait_for(lambda: next((t for t, f in c.frames[n:]
                                                     if abs(luma(f) - y) < abs(luma(f) - before)), None),
                                       10, f"an output frame at level {level}")
                latencies.append(got - t0)
                await c.wait_for(lambda: any(abs(luma(f) - y) < 6 for _, f in c.frames[n:]), 10, f"level {level}")
                before = y
            stats = await c.wait_message("runtime", "stats", where=lambda d: d.get("inputs", {}).get("camera", {})
                                         .get("state") == "camera")
            assert stats["data"]["inputs"]["camera"]["received"] > 0
            async with aiohttp.ClientSession() as http:
                async with http.get(served.url + "/metrics") as r:
                    text = await r.text()
            assert 'reactor_graph_input_frames_total{result="used",track="camera"}' in text
            # the client stops publishing: back to the default after a second
            sender.replaceTrack(None)
            n = len(c.frames)
            await c.wait_for(lambda: any(luma(f) < 20 for _, f in c.frames[n:]), 10, "the default again")
            lat = sorted(latencies)
            server = stats["data"]["inputs"]["camera"]["latency_ms_p50"]
            print(f"camera level change -> first output frame showing it (aiortc both ends, loopback, 16 fps): "
                  f"p50 {lat[len(lat) // 2] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms; server: frame decoded -> "
                  f"block start p50 {server} ms")

    arun(main(), 90)


async def _upload(http, url, sid, data: bytes, mime="image/png", size=None):
    async with http.post(f"{url}/sessions/{sid}/uploads",
                         json={"name": "a.png", "size": len(data) if size is None else size,
                               "mime_type": mime}) as r:
        if r.status != 200:
            return r.status, await r.text()
        slot = await r.json()
    assert set(slot) == {"presigned_id", "presigned_url", "path"}
    assert slot["presigned_url"].startswith(url + f"/sessions/{sid}/uploads/")
    async with http.put(slot["presigned_url"], data=data, headers={"Content-Length": str(len(data))}) as r:
        return r.status, slot["presigned_id"] if r.status == 200 else await r.text()


def test_uploads_as_the_sdk_makes_them(camera_server, sdk_client, arun):
    served = camera_server

    async def main():
        async with sdk_client(served.url) as c, aiohttp.ClientSession() as http:
            s = await c.start_session()
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            sid = s["session_id"]
            # refused: not an image type, too big, junk bytes, a bomb, a body that is not the declared size
            assert (await _upload(http, served.url, sid, b"x", mime="text/html"))[0] == 415
            assert (await _upload(http, served.url, sid, b"x", size=50 * 1024 * 1024))[0] == 413
            status, text = await _upload(http, served.url, sid, b"GIF89a but not really" * 10)
            assert status == 415 and "not a readable image" in text
            status, text = await _upload(http, served.url, sid, b"<svg>" * 10)
            assert status == 415 and "not a PNG" in text
            import struct
            import zlib

            chunk = lambda k, b: struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b))
            bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))
            status, text = await _upload(http, served.url, sid, bomb)
            assert status == 413 and "pixels" in text
            # a large one (past the app's 256 KB JSON body limit: the PUT is streamed)
            from PIL import Image

            noise = io.BytesIO()
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), np.uint8)).save(noise, "PNG")
            assert len(noise.getvalue()) > 1_000_000
            assert (await _upload(http, served.url, sid, noise.getvalue()))[0] == 200
            # another session cannot use (or even see) this session's uploads
            status, upload_id = await _upload(http, served.url, sid, png(64, 48, (255, 255, 255)))
            assert status == 200
            async with http.put(f"{served.url}/sessions/{sid}/uploads/{upload_id}", data=b"x") as r:
                assert r.status in (400, 409)
            c.send("runtime", "fileUploaded", {"upload_id": upload_id, "name": "a.png", "mime_type": "image/png",
                                               "size": 1})
            # sendCommand(set_image, {image: fileRef}): the SDK puts the FileRef in `uploads`
            c.channel.send('{"scope":"application","data":{"type":"set_image","data":{},"uploads":{"image":'
                           f'{{"upload_id":"{upload_id}","name":"a.png","mime_type":"image/png","size":1}}}}}}}}')
            await c.wait_message("application", "commandResult", where=lambda d: d["ok"])
            n = len(c.frames)
            await c.wait_for(lambda: any(luma(f) > 200 for _, f in c.frames[n:]), 10, "the uploaded image")
            c.channel.send('{"scope":"application","data":{"type":"set_image","data":{},"uploads":{"image":'
                           '{"upload_id":"guessed","name":"a.png","mime_type":"image/png","size":1}}}}')
            bad = await c.wait_message("application", "commandResult", where=lambda d: not d["ok"])
            assert "not one of this session's" in bad["data"]["error"]["message"]
            assert bad["data"]["error"]["field"] == "image"
            seen = len(c.inner("application", "commandResult"))
            c.send("application", "set_image", {"image": base64.b64encode(b"junk" * 20).decode()})
            bad = await c.wait_message("application", "commandResult", after=seen, where=lambda d: not d["ok"])
            assert "not a PNG" in bad["data"]["error"]["message"]
            assert any(luma(f) > 200 for _, f in c.frames[-3:])  # nothing changed, the stream goes on
            store = served.manager.uploads
            folder = store.sessions[sid].dir
            assert os.path.isdir(folder) and oct(os.stat(folder).st_mode & 0o777) == "0o700"
            await c.stop_session()
            for _ in range(50):
                if not os.path.exists(folder):
                    break
                await asyncio.sleep(0.1)
            assert not os.path.exists(folder) and sid not in store.sessions  # deleted with the session

    arun(main(), 90)


def test_a_reactor_model_gets_on_frame(serve_engine, sdk_client, arun):
    """A compat VideoModel that overrides on_frame: the server offers it a 'webcam' track and calls
    on_frame(frame) ([H, W, 3] uint8 RGB at the model's size) with what the client publishes."""
    from reactor_graph.compat import ModelHost, VideoModel, get_ctx

    class Mirror(VideoModel):
        name = "mirror"

        def __init__(self):
            self.level, self.frames = 0, []

        def on_frame(self, frame):
            self.frames.append((frame.shape, frame.dtype))
            self.level = int(frame.mean())

        def start_session(self):
            while not get_ctx().should_stop():
                get_ctx().emit_block(np.full((2, 32, 32, 3), self.level, np.uint8))
                time.sleep(0.05)

    model = Mirror()
    served = serve_engine(ModelHost(model, fps=16, size=(32, 32)), ping_timeout=15, connect_timeout=15)

    async def main():
        async with sdk_client(served.url) as c:
            s = await c.start_session()
            assert {"name": "webcam", "kind": "video", "direction": "sendonly"} in s["capabilities"]["tracks"]
            await c.connect()
            await c.wait_ready()
            await c.wait_message("runtime", "sessionStarted")
            sender = next(t for t in c.pc.getTransceivers() if t.direction == "sendonly").sender
            track = Colour()
            track.level = 180
            sender.replaceTrack(track)
            await c.wait_for(lambda: model.level > 170, 15, "on_frame to see the published picture")
            y = 16 + 180 * 219 / 255
            n = len(c.frames)
            await c.wait_for(lambda: any(abs(luma(f) - y) < 8 for _, f in c.frames[n:]), 15, "the model's output")
            assert model.frames[-1] == ((32, 32, 3), np.dtype(np.uint8))

    arun(main(), 60)
