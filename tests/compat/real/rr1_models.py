"""Models written as the reactor-runtime 1.x documentation writes them (1.6+: tracks), against the REAL package:
`@model(name=..., weights=[...])`, `__init__(self, config)` (an OmegaConf DictConfig), `get_ctx().should_stop()`,
`get_ctx().get_track().emit(frame)`, `VideoOut`/`VideoIn` tracks, `on_media`, `VideoModel.weights(name)`. Command
names are distinct across the classes: the real package keeps one process-wide command registry."""
import time

import numpy as np
from pydantic import Field

from reactor_runtime import VideoIn, VideoModel, VideoOut, command, get_ctx, model


def colour_of(prompt):
    h = sum(ord(c) * (i + 1) for i, c in enumerate(prompt))
    return (40 + h % 180, 40 + (h // 7) % 180, 40 + (h // 49) % 180)


@model(name="rr1-prompt")
class PromptModel(VideoModel):
    """Prompt switching; a webcam input track whose latest frame is kept (on_media, VideoIn.latest())."""

    main_video = VideoOut(default=True)
    webcam = VideoIn()

    def __init__(self, config):
        self.size = int(config.get("size", 32))
        self.n = int(config.get("frames_per_block", 2))
        self.default = config.get("default_prompt", "a red circle")
        self._prompt = self.default
        self.frames_in = []
        self.latest_seen = []

    @command("set_prompt", description="Change the prompt")
    def set_prompt(self, prompt: str = Field(..., min_length=1, max_length=200, description="what to show")):
        self._prompt = prompt
        get_ctx().send({"type": "prompt", "data": {"prompt": prompt}})

    def on_media(self, bundle):
        video = bundle.get_track("webcam")
        if video is not None:
            self.frames_in.append(video.data)
            self.latest_seen.append(get_ctx().get_track("webcam").latest())

    def start_session(self):
        ctx = get_ctx()
        try:
            while not ctx.should_stop():
                block = np.empty((self.n, self.size, self.size, 3), dtype=np.uint8)
                block[:] = colour_of(self._prompt)
                ctx.get_track("main_video").emit(block)
                time.sleep(0.002)
        finally:
            self._prompt = self.default


class Pipeline:
    def __init__(self, size):
        self.size, self.speed, self.colour, self.t = size, 1, (0, 0, 0), 0

    def set_speed(self, speed):
        self.speed = speed

    def set_colour(self, colour):
        self.colour = colour

    def step(self):
        self.t += self.speed
        f = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        f[:] = self.colour
        return f


class PipelineModel(VideoModel):
    """No @model: reactor-graph registers it through the package's own @model (main_video injected)."""

    def __init__(self, config):
        self.pipeline = Pipeline(int(config.get("size", 16)))

    @command("set_speed", description="Frames advanced per step")
    def set_speed(self, speed: int = Field(1, ge=1, le=10)):
        self.pipeline.set_speed(speed)

    @command("set_colour", description="The colour painted")
    def set_colour(self, r: int = Field(..., ge=0, le=255), g: int = 0, b: int = 0):
        self.pipeline.set_colour((r, g, b))

    def start_session(self):
        while not get_ctx().should_stop():
            get_ctx().get_track().emit(self.pipeline.step())
            time.sleep(0.002)


@model(name="rr1-clip")
class LoopingClip(VideoModel):
    def __init__(self, config):
        size = int(config.get("size", 16))
        self.frames = [np.full((size, size, 3), 10 * (i + 1), dtype=np.uint8) for i in range(int(config.get("length", 4)))]

    def start_session(self):
        i = 0
        while not get_ctx().should_stop():
            get_ctx().get_track().emit(self.frames[i])
            i = (i + 1) % len(self.frames)
            time.sleep(0.001)


@model(name="rr1-faulty")
class FaultyModel(VideoModel):
    def __init__(self, config):
        self.fail_at, self.size = int(config.get("fail_at", 3)), int(config.get("size", 16))
        self.failed, self.resets = False, 0

    @command("explode", description="A command that raises")
    def explode(self, how: str = "badly"):
        raise ValueError(f"exploded {how}")

    def start_session(self):
        n = 0
        try:
            while not get_ctx().should_stop():
                if not self.failed and n == self.fail_at:
                    self.failed = True
                    raise RuntimeError("CUDA out of memory (pretend)")
                get_ctx().get_track().emit(np.full((1, self.size, self.size, 3), n, dtype=np.uint8))
                n += 1
                time.sleep(0.002)
        finally:
            self.resets += 1


@model(name="rr1-weights", weights=["TinyWeights"])
class WeightsModel(VideoModel):
    def __init__(self, config):
        self.folder = VideoModel.weights("TinyWeights")
        self.level = int((self.folder / "level.txt").read_text())
        self.size = int(config.get("size", 16))

    def start_session(self):
        while not get_ctx().should_stop():
            get_ctx().get_track().emit(np.full((self.size, self.size, 3), self.level, dtype=np.uint8))
            time.sleep(0.002)


@model(name="rr1-older")
class OlderApiModel(VideoModel):
    """Written for 0.0.x-1.4 (emit_block), run on 1.6+: refused naming the method and the version."""

    def __init__(self, config):
        pass

    def start_session(self):
        while not get_ctx().should_stop():
            get_ctx().emit_block(np.zeros((16, 16, 3), dtype=np.uint8))
