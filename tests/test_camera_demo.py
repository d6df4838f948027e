"""graphs/camera.yaml (the demo model steered by a camera, on the CPU) and `render --input` (a video file
feeding a video slot in video time)."""
from pathlib import Path

import av
import numpy as np
import torch

from reactor_graph.inputs import to_yuv420p

ROOT = Path(__file__).resolve().parents[1]


def spot(cy, cx, h=480, w=640):
    img = np.full((h, w, 3), 30, np.uint8)
    y, x = int(cy * h), int(cx * w)
    img[max(0, y - 50):y + 50, max(0, x - 50):x + 50] = 255
    return img


def subject_at(video) -> tuple[float, float]:
    """Where the last frame's subject is, (y, x) in 0..1."""
    from reactor_graph.kernels import colour

    rgb = colour.yuv420p_to_rgb(video[-1:].contiguous(), out_dtype=torch.float32)[0]
    border = torch.cat([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], dim=1).median(dim=1).values
    d = (rgb - border[:, None, None]).abs().sum(0)
    d = (d / d.max() - 0.5).clamp_min(0)
    h, w = d.shape
    ys, xs = torch.arange(h).view(-1, 1).float(), torch.arange(w).view(1, -1).float()
    return float((d * ys).sum() / d.sum()) / h, float((d * xs).sum() / d.sum()) / w


def test_camera_demo_puts_the_prompts_shape_where_the_bright_spot_is():
    from reactor_graph.loop import open_engine

    e = open_engine(str(ROOT / "graphs" / "camera.yaml"), device="cpu")
    assert e.inputs.tracks() == ["camera"]
    e.run_block(0)
    free = subject_at(e.run_block(1)["video"])  # no camera: the demo as it is
    # the camera is 4:3, the slot 1:1 (centre crop): x 0.25 / 0.75 of the camera is 1/6 / 5/6 of the slot
    for block, (cy, cx), want in ((2, (0.2, 0.25), (0.2, 1 / 6)), (3, (0.8, 0.75), (0.8, 5 / 6))):
        e.inputs.feed("camera", to_yuv420p(av.VideoFrame.from_ndarray(spot(cy, cx), format="rgb24"), 64, 64))
        y, x = subject_at(e.run_block(block)["video"])
        assert abs(y - want[0]) < 0.1 and abs(x - want[1]) < 0.1, ((y, x), want, free)


def _clip(path, levels, fps=8, size=(48, 64)):
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = size[1], size[0], "yuv420p"
        for level in levels:
            f = av.VideoFrame.from_ndarray(np.full((*size, 3), level, np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


MIRROR = """\
reactor-graph: 1
name: mirror
size: [16, 16]
fps: 16
device: cpu
slots:
  camera: {type: video, size: [16, 16]}
nodes:
  out:
    type: emit
    in: {frames: $slots.camera}
"""


def test_render_input_feeds_a_video_slot_in_video_time(tmp_path, write_graph):
    from typer.testing import CliRunner

    from reactor_graph.cli import app

    levels = [40, 200, 90, 160]
    _clip(tmp_path / "clip.mp4", levels)  # 8 fps: each clip frame lasts two 16 fps output frames
    out = tmp_path / "out.mp4"
    graph = str(write_graph(MIRROR))
    res = CliRunner().invoke(app, ["render", graph, "-o", str(out), "--blocks", "12",
                                   "--input", f"camera={tmp_path / 'clip.mp4'}"])
    assert res.exit_code == 0, res.output
    with av.open(str(out)) as c:
        got = [float(f.to_ndarray(format="rgb24").mean()) for f in c.decode(video=0)]
    want = [levels[(k // 2) % len(levels)] for k in range(12)]  # the clip loops
    assert len(got) == 12 and all(abs(g - w) < 12 for g, w in zip(got, want)), str(list(zip(got, want)))
    bad = CliRunner().invoke(app, ["render", graph, "-o", str(out), "--input", "webcam=x.mp4"])
    assert bad.exit_code != 0 and "no video slot 'webcam'" in bad.output and "camera" in bad.output
    bad = CliRunner().invoke(app, ["render", graph, "-o", str(out), "--input", f"camera={tmp_path / 'nope.mp4'}"])
    assert bad.exit_code != 0 and "not a readable video file" in bad.output
