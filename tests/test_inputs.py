"""Video and image slots (reactor_graph/inputs.py): the latest-frame buffer, defaults and stills, the copy at
the block boundary (no recompile), and the bounded image decoder."""
import base64
import io

import numpy as np
import pytest
import torch

from reactor_graph.errors import CommandError, GraphError
from reactor_graph.inputs import ImageError, LatestFrames, decode_base64_image, decode_image

CAMERA = """\
reactor-graph: 1
name: camera
size: [16, 24]
device: cpu
slots:
  camera: {type: video, size: [16, 24], fps: 30}
  still: {type: image, size: [16, 24], default: grey}
commands:
  set_image:
    params: {image: {type: image}}
    set: {camera: $image}
  set_still:
    params: {image: {type: image}}
    set: {still: $image}
nodes:
  out:
    type: emit
    params: {format: rgb24}
    in: {frames: $slots.camera}
"""


def yuv(h, w, y, u=128, v=128):
    out = np.empty((h * 3 // 2, w), np.uint8)
    out[:h] = y
    flat = out[h:].reshape(-1)
    q = (h // 2) * (w // 2)
    flat[:q], flat[q:] = u, v
    return out


def png(w, h, colour=(255, 0, 0)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_video_slot_follows_the_newest_frame_then_falls_back(tiny_engine):
    e = tiny_engine(CAMERA)
    assert e.inputs.tracks() == ["camera"]
    black = e.run_block(0)["video"]
    assert black.shape == (1, 16, 24, 3) and int(black.max()) == 0
    v0 = e.slots.versions["camera"]
    e.run_block(1)
    assert e.slots.versions["camera"] == v0  # nothing new: no new version, nothing copied
    e.inputs.feed("camera", yuv(16, 24, 200))
    e.inputs.feed("camera", yuv(16, 24, 120))  # a slow model reads only the newest
    out = e.run_block(2)["video"].float()
    assert abs(out.mean().item() - (120 - 16) * 255 / 219) < 2
    v1 = e.slots.versions["camera"]
    assert v1 == v0 + 1
    e.run_block(3)  # a fast model repeats the last frame, without a new version
    assert e.slots.versions["camera"] == v1
    assert e.inputs.stats()["camera"]["state"] == "camera"
    e.inputs.stale_seconds = 0.0  # the client stopped publishing: the default again
    assert int(e.run_block(4)["video"].max()) == 0
    assert e.inputs.stats()["camera"]["state"] == "default"
    with pytest.raises(ValueError, match="yuv420p"):
        e.inputs.feed("camera", np.zeros((10, 10), np.uint8))


def test_a_still_image_while_no_camera_and_image_slots(tiny_engine):
    e = tiny_engine(CAMERA)
    with pytest.raises(CommandError, match="not a PNG"):
        e.submit("set_image", {"image": base64.b64encode(b"junk" * 10).decode()})
    with pytest.raises(CommandError, match="base64"):
        e.submit("set_image", {"image": "not base64 !!"})
    with pytest.raises(CommandError):
        e.submit("set_image", {"image": 3})
    e.submit("set_image", {"image": "data:image/png;base64," + base64.b64encode(png(48, 32, (0, 255, 0))).decode()})
    e.submit("set_still", {"image": base64.b64encode(png(8, 8, (0, 0, 255))).decode()})
    e._apply(e.commands.drain())
    out = e.run_block(0)["video"].float()
    assert out[..., 1].mean() > 250 and out[..., 0].mean() < 5  # green, the still, while no camera
    still = e.slots.values["still"]
    assert still.shape == (1, 3, 16, 24) and still[0, 2].mean() > 0.99
    e.inputs.feed("camera", yuv(16, 24, 235))
    assert e.run_block(1)["video"].float().mean() > 250  # a live camera wins over the still
    e.inputs.stale_seconds = 0.0
    assert e.run_block(2)["video"].float()[..., 1].mean() > 250  # and the still is back when it stops


def test_compiled_hot_path_reads_new_frames_without_recompiling(tiny_engine):
    text = CAMERA.replace("device: cpu", "device: cpu\ncompile: compile")
    e = tiny_engine(text, compile="compile", compile_backend="aot_eager")
    ex = e.executor
    assert type(ex).__name__ == "CompiledHotPath"
    means = []
    for i in range(6):
        e.inputs.feed("camera", yuv(16, 24, 16 + 30 * i))
        means.append(e.run_block(i)["video"].float().mean().item())
    assert means == sorted(means) and means[-1] - means[0] > 150
    assert ex.recompiles == 0


def test_graph_errors_for_media_slots(write_graph):
    from reactor_graph.plan import load_plan

    bad = CAMERA.replace("camera: {type: video, size: [16, 24], fps: 30}", "camera: {type: video}")
    with pytest.raises(GraphError, match="needs 'size"):
        load_plan(write_graph(bad))
    odd = CAMERA.replace("size: [16, 24], fps: 30", "size: [15, 24]")
    with pytest.raises(GraphError, match="even"):
        load_plan(write_graph(odd))
    wrong = CAMERA.replace("set: {still: $image}", "set: {still: 3}")
    with pytest.raises(GraphError):
        load_plan(write_graph(wrong))


def test_image_decoder_limits():
    pic = decode_image(png(40, 30))
    assert pic.rgb.shape == (30, 40, 3) and pic.rgb[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(ImageError, match="at most"):
        decode_image(png(40, 30), max_bytes=10)
    with pytest.raises(ImageError, match="not a PNG"):
        decode_image(b"\x00" * 100)
    with pytest.raises(ImageError, match="pixels"):
        decode_image(png(100, 100), max_pixels=50 * 50)
    # a bomb: a tiny file whose header claims 30000 x 30000 pixels is refused before it is decoded
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(ImageError, match="pixels"):
        decode_image(bomb)
    with pytest.raises(ImageError, match="could not be decoded|not a PNG"):
        decode_image(png(40, 30)[:60])  # truncated
    assert decode_base64_image(base64.b64encode(png(4, 4)).decode()).rgb.shape == (4, 4, 3)


def test_a_many_frame_slot_reads_that_many_distinct_frames(tiny_engine):
    """A video slot of `frames: T` (StreamDiffusionV2's 12) gets the T newest camera frames, oldest first: the
    buffer keeps at least T (it used to keep 4 and pad the rest with copies of the oldest)."""
    e = tiny_engine(CAMERA.replace("fps: 30}", "fps: 30, frames: 12}"))
    for i in range(14):
        e.inputs.feed("camera", yuv(16, 24, 16 + 10 * i))
    video = e.run_block(0)["video"]  # rgb24 [12, 16, 24, 3]
    assert video.shape[0] == 12
    levels = video.float().mean(dim=(1, 2, 3))
    assert all(b > a + 5 for a, b in zip(levels, levels[1:])), levels  # frames 2..13 in order, none repeated


def test_latest_frames_is_bounded():
    buf = LatestFrames(capacity=3)
    for i in range(10):
        buf.put(np.full((3, 2), i, np.uint8))
    assert [int(f.yuv[0, 0]) for f in buf.newest(5)] == [7, 8, 9]
    assert buf.received == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_hot_path_sees_each_new_frame_with_no_recapture(tiny_engine):
    """cudagraph: the camera slot's tensor stays put; each new frame is a copy into the captured graph's static
    input, so every replay shows the newest frame, with no recompile and no new capture."""
    text = CAMERA.replace("device: cpu", "device: cuda\ncompile: cudagraph").replace(
        "    in: {frames: $slots.camera}", "    in: {frames: pre.rgb}").replace(
        "nodes:\n", "nodes:\n  pre:\n    type: video_in\n    in: {frames: $slots.camera}\n")
    e = tiny_engine(text, device="cuda", dtype="float32", compile="cudagraph")
    ex = e.executor
    graphs = dict(ex.graphs)
    assert graphs and e.slots.values["camera"].is_cuda
    address = e.slots.values["camera"].data_ptr()
    means = []
    for i in range(8):
        e.inputs.feed("camera", yuv(16, 24, 16 + 25 * i))
        means.append(e.run_block(i)["video"].float().mean().item())
    assert all(b > a + 10 for a, b in zip(means, means[1:])), means  # a new frame in every block
    assert ex.recompiles == 0 and dict(ex.graphs) == graphs and ex.replays == 8
    assert e.slots.values["camera"].data_ptr() == address


def test_inbound_frames_are_cropped_to_the_slot_and_absurd_ones_refused():
    import av

    from reactor_graph.inputs import to_yuv420p

    img = np.zeros((480, 640, 3), np.uint8)
    img[:, :60] = 255  # a white band on the left that a 1:1 centre crop of 4:3 cuts away
    img[:, 60:200] = 128
    out = to_yuv420p(av.VideoFrame.from_ndarray(img, format="rgb24"), 32, 32)
    assert out.shape == (48, 32) and out.dtype == np.uint8
    y = out[:32].astype(int)
    assert abs(y[:, 0].mean() - (16 + 128 * 219 / 255)) < 12 and y[:, -1].mean() < 20  # grey edge, no white

    class Huge:
        width, height = 10000, 10000

    with pytest.raises(ValueError, match="at most"):
        to_yuv420p(Huge(), 32, 32)
