"""Models written as the reactor-runtime 0.0.x documentation and template write them, against the REAL package:
`get_ctx()._stop_evt` (0.0.x has no should_stop()), `get_ctx().emit_block(np.ndarray)`, `@command(name, description)`
with pydantic `Field`, `on_frame`, `VideoModel.weights(name)`. Command names are distinct across the classes: the
real package keeps one process-wide command registry."""
import time

import numpy as np
from pydantic import Field

from reactor_runtime import VideoModel, command, get_ctx


def colour_of(prompt):
    h = sum(ord(c) * (i + 1) for i, c in enumerate(prompt))
    return (40 + h % 180, 40 + (h // 7) % 180, 40 + (h // 49) % 180)


class PromptModel(VideoModel):
    """Prompt switching: the loop reads the prompt every block; a client frame is kept (on_frame)."""

    name = "rr-prompt"

    def __init__(self, size=32, frames_per_block=2, default_prompt="a red circle", **kwargs):
        self.size, self.n, self.default = size, frames_per_block, default_prompt
        self._prompt = default_prompt
        self.frames_in = []

    @command("set_prompt", description="Change the prompt")
    def set_prompt(self, prompt: str = Field(..., min_length=1, max_length=200, description="what to show")):
        self._prompt = prompt
        get_ctx().send({"type": "prompt", "data": {"prompt": prompt}})

    def on_frame(self, frame: np.ndarray):
        self.frames_in.append(frame)

    def start_session(self):
        ctx = get_ctx()
        try:
            while not ctx._stop_evt.is_set():
                block = np.empty((self.n, self.size, self.size, 3), dtype=np.uint8)
                block[:] = colour_of(self._prompt)
                ctx.emit_block(block)
                time.sleep(0.002)
        finally:
            self._prompt = self.default  # clean for the next user


class Pipeline:
    """An existing generator with setters, wrapped by the model (the template's ExampleModelPipeline shape)."""

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
    def __init__(self, size=16, **kwargs):
        self.pipeline = Pipeline(size)

    @command("set_speed", description="Frames advanced per step")
    def set_speed(self, speed: int = Field(1, ge=1, le=10)):
        self.pipeline.set_speed(speed)

    @command("set_colour", description="The colour painted")
    def set_colour(self, r: int = Field(..., ge=0, le=255), g: int = 0, b: int = 0):
        self.pipeline.set_colour((r, g, b))

    def start_session(self):
        while not get_ctx()._stop_evt.is_set():
            get_ctx().emit_block(self.pipeline.step())  # one [H, W, 3] frame
            time.sleep(0.002)


class LoopingClip(VideoModel):
    """A finite clip that the model wraps around."""

    def __init__(self, length=4, size=16, **kwargs):
        self.frames = [np.full((size, size, 3), 10 * (i + 1), dtype=np.uint8) for i in range(length)]

    def start_session(self):
        i = 0
        while not get_ctx()._stop_evt.is_set():
            get_ctx().emit_block(self.frames[i])
            i = (i + 1) % len(self.frames)
            time.sleep(0.001)


class FaultyModel(VideoModel):
    """Raises once mid-session (the model resets itself in `finally`); a command that raises."""

    def __init__(self, fail_at=3, size=16, **kwargs):
        self.fail_at, self.size, self.failed, self.resets = fail_at, size, False, 0

    @command("explode", description="A command that raises")
    def explode(self, how: str = "badly"):
        raise ValueError(f"exploded {how}")

    def start_session(self):
        n = 0
        try:
            while not get_ctx()._stop_evt.is_set():
                if not self.failed and n == self.fail_at:
                    self.failed = True
                    raise RuntimeError("CUDA out of memory (pretend)")
                get_ctx().emit_block(np.full((1, self.size, self.size, 3), n, dtype=np.uint8))
                n += 1
                time.sleep(0.002)
        finally:
            self.resets += 1


class WeightsModel(VideoModel):
    """Reads its weights folder in __init__ with VideoModel.weights(name), as the runtime documents."""

    def __init__(self, size=16, **kwargs):
        self.folder = VideoModel.weights("TinyWeights")
        self.level = int((self.folder / "level.txt").read_text())
        self.size = size

    def start_session(self):
        while not get_ctx()._stop_evt.is_set():
            get_ctx().emit_block(np.full((self.size, self.size, 3), self.level, dtype=np.uint8))
            time.sleep(0.002)


class NewerApiModel(VideoModel):
    """Written for 1.x (should_stop()), run on 0.0.x: refused naming the method and the version."""

    def start_session(self):
        while not get_ctx().should_stop():
            get_ctx().emit_block(np.zeros((16, 16, 3), dtype=np.uint8))
