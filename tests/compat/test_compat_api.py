"""The model API itself: @command schemas and validation, get_ctx(), emit_block's accepted forms and refusals,
and the `reactor_runtime` import shim."""
import sys
import textwrap
import threading
from typing import Literal

import numpy as np
import pytest
import torch
from pydantic import Field

from reactor_graph.compat import (FrameError, ModelHost, SessionContext, VideoModel, command, get_ctx,
                                  install_shim, uninstall_shim)
from reactor_graph.compat.api import bound, commands_of
from reactor_graph.compat.frames import as_frames
from reactor_graph.errors import CommandError


class Commands(VideoModel):
    @command("set_prompt", description="Change the prompt")
    def set_prompt(self, prompt: str = Field(..., min_length=1, max_length=5, description="what to show")):
        self.prompt = prompt

    @command("control")
    def control(self, movement: Literal["forward", "back"], camera: Literal["up", "down"] = "up", speed: int = 2):
        """Move and look

        More text that is not the description."""
        self.controls = (movement, camera, speed)

    @command
    def ping(self):
        self.pinged = True

    def start_session(self):
        pass


def test_command_parameters_become_a_validated_schema():
    cmds = commands_of(Commands)
    assert set(cmds) == {"set_prompt", "control", "ping"}
    schemas = {s["name"]: s for s in ModelHost(Commands()).command_schemas()}
    assert set(schemas) == {"set_prompt", "control", "ping", "reset"}  # reset is built in
    sp = schemas["set_prompt"]
    assert sp["description"] == "Change the prompt"
    prop = sp["schema"]["properties"]["prompt"]
    assert prop["type"] == "string" and prop["maxLength"] == 5 and prop["description"] == "what to show"
    assert sp["schema"]["required"] == ["prompt"]
    ctl = schemas["control"]
    assert ctl["description"] == "Move and look"
    props = ctl["schema"]["properties"]
    assert props["movement"]["enum"] == ["forward", "back"]
    assert props["camera"]["enum"] == ["up", "down"] and props["camera"]["default"] == "up"
    assert props["speed"]["default"] == 2
    assert ctl["schema"]["required"] == ["movement"]


def test_bad_params_are_refused_naming_the_field_before_anything_runs():
    model = Commands()
    host = ModelHost(model)
    with pytest.raises(CommandError, match=r"set_prompt\.prompt"):
        host.submit("set_prompt", {"prompt": "much too long"})
    with pytest.raises(CommandError, match=r"control\.movement"):
        host.submit("control", {"movement": "sideways"})
    with pytest.raises(CommandError, match="unknown parameter"):
        host.submit("control", {"movement": "forward", "jump": True})
    with pytest.raises(CommandError, match="required parameter is missing"):
        host.submit("control", {})
    with pytest.raises(CommandError, match=r"unknown command.*did you mean 'set_prompt'"):
        host.submit("set_promt", {"prompt": "x"})
    assert not hasattr(model, "prompt") and not hasattr(model, "controls")
    assert host.submit("control", {"movement": "back", "speed": 3}).wait(5) == {"ok": True}
    assert model.controls == ("back", "up", 3)
    assert host.submit("ping").wait(5) == {"ok": True} and model.pinged


def test_an_override_without_the_decorator_keeps_the_command():
    class Sub(Commands):
        def ping(self):
            self.pinged = "sub"

    model = Sub()
    assert ModelHost(model).submit("ping").wait(5) == {"ok": True} and model.pinged == "sub"


def test_get_ctx_outside_a_session_raises_clearly():
    with pytest.raises(RuntimeError, match="outside a session"):
        get_ctx()


def test_get_ctx_is_the_session_in_any_thread_of_it():
    ctx = SessionContext(sink=lambda f: None)
    seen = []
    with bound(ctx, register=True):
        assert get_ctx() is ctx
        t = threading.Thread(target=lambda: seen.append(get_ctx()))  # a helper thread the model started
        t.start()
        t.join(5)
    assert seen == [ctx]
    with pytest.raises(RuntimeError):
        get_ctx()


def test_stop_flag_and_private_stop_event_are_one():
    ctx = SessionContext(sink=lambda f: None)
    assert not ctx.should_stop() and not ctx._stop_evt.is_set()
    ctx._stop_evt.set()
    assert ctx.should_stop()


# -- emit_block ------------------------------------------------------------------------------------------------
H, W = 4, 6


@pytest.mark.parametrize("make, n, dtype", [
    (lambda: np.zeros((2, H, W, 3), np.uint8), 2, torch.uint8),                     # numpy [N, H, W, 3]
    (lambda: np.zeros((H, W, 3), np.uint8), 1, torch.uint8),                        # numpy [H, W, 3]
    (lambda: torch.zeros(3, H, W, 3, dtype=torch.uint8), 3, torch.uint8),           # torch [N, H, W, 3] uint8
    (lambda: torch.zeros(3, 3, H, W, dtype=torch.uint8), 3, torch.uint8),           # torch [N, 3, H, W] uint8
    (lambda: torch.zeros(2, H, W, 3), 2, torch.float32),                            # torch [N, H, W, 3] float
    (lambda: torch.zeros(2, 3, H, W, dtype=torch.bfloat16), 2, torch.bfloat16),     # torch [N, 3, H, W] float
    (lambda: torch.zeros(3, H, W, dtype=torch.float16), 1, torch.float16),          # torch one [3, H, W] frame
    (lambda: None, 1, torch.uint8),                                                  # None: a black frame
])
def test_emit_block_accepts(make, n, dtype):
    got = []
    ctx = SessionContext(sink=got.append, size=lambda: (H, W))
    ctx.emit_block(make())
    assert got[0].shape == (n, 3, H, W) and got[0].dtype == dtype
    assert ctx.blocks_emitted == 1 and ctx.frames_emitted == n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_emit_block_keeps_cuda_tensors_on_the_device():
    got = as_frames(torch.zeros(2, 3, H, W, device="cuda"))
    assert got.is_cuda


def test_emit_block_values_are_read_as_documented():
    rgb = np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)
    f = as_frames(rgb)
    assert torch.equal(f[0].permute(1, 2, 0), torch.from_numpy(rgb))  # channels moved, nothing else
    t = torch.rand(2, 3, H, W) * 2 - 1
    assert torch.equal(as_frames(t), t)
    assert as_frames(torch.full((1, 3, H, W), 1.5)).shape == (1, 3, H, W)  # small overshoot: clamped later


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, H, W, 3), np.float32), r"numpy float32 array of shape \[2, 4, 6, 3\].*must be uint8"),
    (np.zeros((2, H, W, 4), np.uint8), r"4 channels.*drop alpha"),
    (np.zeros((H, W), np.uint8), r"shape \[4, 6\] is not \[N, H, W, 3\]"),
    (np.zeros((1, 2, H, W, 3), np.uint8), r"5-D block.*batch"),
    (torch.zeros(2, 5, H, W), r"shape \[2, 5, 4, 6\] is not \[N, H, W, 3\] or \[N, 3, H, W\]"),
    (torch.zeros(2, 3, H, W, dtype=torch.int32), r"torch int32 tensor.*must be uint8"),
    (torch.full((1, 3, H, W), 255.0), r"values reach 255.*uint8"),
    (torch.full((1, 3, H, W), float("nan")), r"values reach nan"),
    (torch.zeros(0, 3, H, W), r"empty"),
    ([np.zeros((H, W, 3), np.uint8)], r"Python list.*np\.stack"),
    ("frame.png", r"got a str: not an array"),
])
def test_emit_block_refuses_clearly(bad, match):
    ctx = SessionContext(sink=lambda f: pytest.fail("nothing may be emitted"))
    with pytest.raises(FrameError, match=match) as info:
        ctx.emit_block(bad)
    assert "It takes numpy uint8 [N, H, W, 3]" in str(info.value)


def test_black_frame_needs_a_known_size():
    with pytest.raises(FrameError, match="size, which is not known yet"):
        SessionContext(sink=lambda f: None).emit_block(None)


def test_send_needs_json():
    got = []
    ctx = SessionContext(sink=lambda f: None, messages=got.append)
    ctx.send({"type": "progress", "data": {"frame": 1}})
    assert got == [{"type": "progress", "data": {"frame": 1}}]
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ctx.send({"frame": np.zeros(2)})


# -- the import shim -------------------------------------------------------------------------------------------
def test_reactor_runtime_imports_resolve_to_this_api():
    import reactor_runtime
    from reactor_runtime import VideoModel as VM, command as cmd, get_ctx as gc
    from reactor_runtime.context import get_ctx as gc2
    from reactor_runtime.model_api import model

    assert VM is VideoModel and cmd is command and gc is get_ctx and gc2 is get_ctx
    assert getattr(reactor_runtime, "__reactor_graph_shim__", False)

    @model(name="m", config="config.yml")
    class M(VM):
        pass

    assert M._reactor_model["name"] == "m"
    with pytest.raises(ImportError, match="provides reactor_runtime, reactor_runtime.context"):
        import reactor_runtime.interface  # noqa: F401 - the newer API is not provided


def test_shim_does_not_shadow_an_installed_runtime(tmp_path, monkeypatch):
    pkg = tmp_path / "reactor_runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("REAL = True\n")
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "reactor_runtime"}
    uninstall_shim()
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert install_shim() is False  # the real one is importable: the stand-in steps aside
        import reactor_runtime

        assert getattr(reactor_runtime, "REAL", False)
        with pytest.raises(ImportError, match="already imported"):
            install_shim(force=True)
    finally:
        uninstall_shim()
        sys.modules.pop("reactor_runtime", None)
        sys.modules.update(saved)
        install_shim()


def test_force_shadows_on_request(tmp_path, monkeypatch):
    pkg = tmp_path / "reactor_runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("REAL = True\n")
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "reactor_runtime"}
    uninstall_shim()
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert install_shim(force=True) is True
        import reactor_runtime

        assert reactor_runtime.VideoModel is VideoModel and not hasattr(reactor_runtime, "REAL")
    finally:
        uninstall_shim()
        sys.modules.update(saved)
        install_shim()


@pytest.mark.slow  # ~3 s: a fresh interpreter imports torch
def test_model_code_imports_the_shim_in_a_fresh_interpreter(tmp_path):
    import subprocess

    (tmp_path / "m.py").write_text(textwrap.dedent("""
        from reactor_runtime import VideoModel, command, get_ctx
        class M(VideoModel):
            def start_session(self):
                get_ctx().emit_block(None)
    """))
    code = ("from reactor_graph.compat import load_class; "
            f"print(load_class('m:M', {str(tmp_path)!r}).__mro__[1].__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reactor_graph.compat.api"
