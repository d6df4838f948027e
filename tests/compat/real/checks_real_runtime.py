"""Run with the REAL reactor_runtime importable (tests/compat/test_real_runtime.py starts this file in a pytest
subprocess, PYTHONPATH = an install of reactor-runtime==$REACTOR_RUNTIME_UNDER_TEST): models built on the real
package's VideoModel run under `reactor-graph render|bench manifest.json`, a server session, and ModelHost, with the
documentation's manifest (a bare "reactor-runtime" version). Not collected on its own (the file name)."""
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

VERSION = os.environ.get("REACTOR_RUNTIME_UNDER_TEST")
if not VERSION:
    pytest.skip("runs in a subprocess with the real reactor_runtime (tests/compat/test_real_runtime.py)",
                allow_module_level=True)

import reactor_runtime  # noqa: E402  the real one, or this run is wrong

from reactor_graph.compat import open_manifest  # noqa: E402
from reactor_graph.compat.shim import MARK  # noqa: E402

HERE = Path(__file__).parent
LINE0 = VERSION.startswith("0.")
MODELS = "rr0_models" if LINE0 else "rr1_models"
WAIT = 10.0


def test_the_real_package_is_the_one_imported():
    assert not getattr(reactor_runtime, MARK, False)
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] in reactor_runtime.__file__
    from importlib.metadata import version

    assert version("reactor-runtime") == VERSION


def manifest(tmp_path, cls, args=None, **extra):
    """The documentation's manifest: a bare runtime version, model name and version, args, weights names."""
    (tmp_path / f"{MODELS}.py").write_text((HERE / f"{MODELS}.py").read_text())
    data = {"class": cls if ":" in cls else f"{MODELS}:{cls}", "model_name": "my-model", "model_version": "0.0.1",
            "reactor-runtime": "0.0.0" if LINE0 else "1.0.0", "args": args or {}, "weights": [], **extra}
    (tmp_path / "manifest.json").write_text(json.dumps(data, indent=2))
    return tmp_path / "manifest.json"


class Blocks:
    def __init__(self):
        self.blocks, self.cond = [], threading.Condition()

    def __call__(self, block):
        with self.cond:
            self.blocks.append(block)
            self.cond.notify_all()

    def wait(self, n):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.blocks) >= n, WAIT), f"{len(self.blocks)} of {n} blocks"
        return self.blocks


@pytest.fixture
def hosts():
    made = []
    yield made
    for h in made:
        try:
            h.stop(timeout=WAIT)
        except Exception:  # noqa: BLE001
            pass


def host_of(hosts, path, **kw):
    h = open_manifest(path, format="rgb24", **kw)
    hosts.append(h)
    return h


def rgb(block):
    return block.video()  # rgb24: [N, H, W, 3] uint8


# ---------------------------------------------------------------------------------------------- the shipped template
@pytest.mark.skipif(not LINE0, reason="template/model_template.py ships with the 0.0.x wheels")
def test_the_wheels_own_template_model_renders_benches_and_takes_commands(tmp_path):
    """0.0.4's template/model_template.py, unmodified, imported from the installed wheel (not copied)."""
    from typer.testing import CliRunner

    from reactor_graph.cli import app

    import template.model_template as tm

    assert Path(tm.__file__).resolve().is_relative_to(Path(reactor_runtime.__file__).resolve().parents[1])
    (tmp_path / "manifest.json").write_text(json.dumps({
        "class": "template.model_template:TemplateVideoModel", "model_name": "template-video", "model_version": "0.0.1",
        "reactor-runtime": "0.0.0", "args": {"fps": 30, "size": [48, 64]}, "weights": []}))
    (tmp_path / "script.yaml").write_text("- {block: 3, command: set_brightness, params: {brightness: 0.0}}\n")
    runner = CliRunner()
    out = tmp_path / "t.mp4"
    r = runner.invoke(app, ["render", str(tmp_path / "manifest.json"), "-o", str(out), "--blocks", "6",
                            "--commands", str(tmp_path / "script.yaml")])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "6 frames of 64x48" in r.output
    import av

    with av.open(str(out)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 6
    assert frames[1].mean() > 20 and frames[5].mean() < frames[1].mean() / 4  # brightness 0 from block 3: dark
    r = runner.invoke(app, ["bench", str(tmp_path / "manifest.json"), "--blocks", "5", "--warmup", "1"])
    assert r.exit_code == 0, r.output
    assert "template-video: block p50" in r.output
    r = runner.invoke(app, ["show", str(tmp_path / "manifest.json")])
    assert r.exit_code == 0 and f"written for 0.0.0; driven by reactor_runtime {VERSION}" in r.output, r.output


# ---------------------------------------------------------------------------------------------- documentation patterns
def test_prompt_switching_commands_send_and_the_real_registry(tmp_path, hosts):
    h = host_of(hosts, manifest(tmp_path, "PromptModel", {"size": 16}))
    assert h.driver is not None and h.driver.version == VERSION
    assert h.runtime["driven_by"]["version"] == VERSION and h.runtime["written_for"] in ("0.0.0", "1.0.0")
    from reactor_runtime.model_api import command_registry

    schemas = {s["name"]: s for s in h.command_schemas()}
    assert set(schemas) == {"set_prompt", "reset"}  # only this class's commands from the real registry
    assert command_registry["set_prompt"]["model"] is h.commands["set_prompt"].params_model
    from reactor_graph.errors import CommandError

    with pytest.raises(CommandError, match="prompt"):
        h.submit("set_prompt", {"prompt": ""})  # the real registry's Field(min_length=1)
    sink = Blocks()
    h.start_session(sink, None)
    sink.wait(2)
    assert h.submit("set_prompt", {"prompt": "a blue square"}).wait(WAIT) == {"ok": True}
    n = len(sink.blocks)
    blocks = sink.wait(n + 3)
    colour_of = sys.modules[type(h.model).__module__].colour_of
    assert tuple(rgb(blocks[0])[0, 0, 0].tolist()) == colour_of("a red circle")
    assert tuple(rgb(blocks[-1])[0, 0, 0].tolist()) == colour_of("a blue square")
    assert {"type": "prompt", "data": {"prompt": "a blue square"}} in list(h.messages)  # get_ctx().send
    h.stop()
    assert h.model._prompt == "a red circle"  # the model's own end-of-session cleanup ran


def test_pipeline_setters_finite_wrap_and_cooperative_stop(tmp_path, hosts):
    h = host_of(hosts, manifest(tmp_path, "PipelineModel", {"size": 16}))
    sink = Blocks()
    h.start_session(sink, None)
    sink.wait(1)
    assert h.submit("set_colour", {"r": 200, "g": 10}).wait(WAIT) == {"ok": True}
    assert h.submit("set_speed", {"speed": 3}).wait(WAIT) == {"ok": True}
    assert h.model.pipeline.speed == 3
    n = len(sink.blocks)
    last = sink.wait(n + 3)[-1]
    assert tuple(rgb(last)[0, 0, 0].tolist()) == (200, 10, 0)
    t = time.monotonic()
    h.stop()  # cooperative: the loop checks the stop flag between frames
    assert time.monotonic() - t < 2 and not h.busy

    (tmp_path / "c").mkdir()
    clip = host_of(hosts, manifest(tmp_path / "c", "LoopingClip", {"length": 3, "size": 16}))
    got = Blocks()
    res = clip.run_session(got, max_blocks=7)
    assert res.ok and res.blocks == 7
    assert [int(rgb(b)[0, 0, 0, 0]) for b in got.blocks] == [10, 20, 30, 10, 20, 30, 10]  # wraps around


def test_an_error_ends_the_session_with_its_place_and_the_next_session_is_clean(tmp_path, hosts):
    h = host_of(hosts, manifest(tmp_path, "FaultyModel", {"fail_at": 2}))
    r = h.submit("explode", {"how": "loudly"}).wait(WAIT)
    assert r["ok"] is False and "exploded loudly" in r["error"]
    res = h.run_session(Blocks(), timeout=WAIT)
    assert res.reason == "error" and "CUDA out of memory (pretend)" in res.error and f"{MODELS}.py" in res.error
    assert h.model.resets == 1
    res = h.run_session(Blocks(), max_blocks=4)
    assert res.ok and res.blocks == 4 and h.model.resets == 2


def test_render_and_bench_of_a_pattern_model(tmp_path, hosts):
    from reactor_graph.bench import bench_host
    from reactor_graph.render import TimedCommand, render

    h = host_of(hosts, manifest(tmp_path, "PromptModel", {"size": 16, "frames_per_block": 1}))
    out = tmp_path / "p.mp4"
    script = [TimedCommand(block=2, command="set_prompt", params={"prompt": "green"})]
    res, frames = render(h, out, 5, script)
    assert res.ok and frames == 5 and out.stat().st_size > 0
    rep = bench_host(h, blocks=5, warmup=1)
    assert rep["modes"]["model"]["fps"] > 0


# ---------------------------------------------------------------------------------------------- weights
def test_weights_resolve_to_a_local_folder_never_a_download(tmp_path, hosts, monkeypatch):
    wdir = tmp_path / "wdir"
    (wdir / "TinyWeights").mkdir(parents=True)
    (wdir / "TinyWeights" / "level.txt").write_text("77")
    (tmp_path / "m").mkdir()
    m = manifest(tmp_path / "m", "WeightsModel")
    data = json.loads(m.read_text())
    data["weights"] = ["TinyWeights"]
    m.write_text(json.dumps(data))
    from reactor_graph.errors import GraphError

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache/reactor_registry to fall back on
    with pytest.raises(GraphError) as info:
        open_manifest(m)
    assert "weights 'TinyWeights' not found; searched" in str(info.value) and str(m.parent / "TinyWeights") in \
        str(info.value)
    h = host_of(hosts, m, weights_dir=[wdir])
    assert h.model.folder == wdir / "TinyWeights" and h.model.level == 77
    res = h.run_session(Blocks(), max_blocks=2)
    assert res.ok
    # the manifest's own mapping
    data["weights"] = {"TinyWeights": str(wdir / "TinyWeights")}
    m.write_text(json.dumps(data))
    h = host_of(hosts, m)
    assert h.model.level == 77


# ---------------------------------------------------------------------------------------------- versions differ
def test_a_model_for_another_version_is_refused_naming_the_method_and_version(tmp_path, hosts):
    cls, method = ("NewerApiModel", "should_stop") if LINE0 else ("OlderApiModel", "emit_block")
    h = host_of(hosts, manifest(tmp_path, cls))
    res = h.run_session(Blocks(), timeout=WAIT)
    assert res.reason == "error"
    assert f"get_ctx().{method}() is not part of reactor_runtime {VERSION}'s context" in res.error, res.error


# ---------------------------------------------------------------------------------------------- client video
def test_client_frames_reach_the_model_as_this_version_delivers_them(tmp_path, hosts):
    h = host_of(hosts, manifest(tmp_path, "PromptModel", {"size": 16}))
    sink = Blocks()
    h.start_session(sink, None)
    sink.wait(1)
    frame = np.full((8, 8, 3), 123, dtype=np.uint8)
    h.push_frame(frame)
    assert len(h.model.frames_in) == 1 and h.model.frames_in[0] is frame
    if not LINE0:  # 1.6+: through _dispatch_media into the VideoIn track
        assert h.driver.video_inputs(h.model) == ["webcam"]
        assert h.model.latest_seen[0] is frame


# ---------------------------------------------------------------------------------------------- a server session
def test_a_server_session_streams_commands_and_health(tmp_path, hosts):
    import asyncio
    import importlib.util

    import aiohttp

    spec = importlib.util.spec_from_file_location("server_conftest", HERE.parent.parent / "server" / "conftest.py")
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    h = open_manifest(manifest(tmp_path, "PromptModel", {"size": 32}, size=[32, 32]))  # vp8 wants >16 px
    server = sc.ServerThread(h, ping_timeout=15, connect_timeout=15).start()
    try:
        async def go():
            async with aiohttp.ClientSession() as http:
                async with http.get(server.url + "/health") as r:
                    health = await r.json()
            async with sc.SdkClient(server.url) as c:
                await c.connect()
                await c.wait_ready()
                await c.wait_for(lambda: len(c.frames) >= 2, 20, "frames")
                c.send("application", "set_prompt", {"prompt": "a blue square"})
                msg = await c.wait_message("application", "prompt", 20)
                return health, msg, len(c.frames)

        health, msg, nframes = sc.run(go(), 60)
        assert health["runtime"]["driven_by"]["version"] == VERSION
        assert health["runtime"]["written_for"] in ("0.0.0", "1.0.0")
        assert msg["data"] == {"prompt": "a blue square"} and nframes >= 2
    finally:
        server.stop()
