"""The "wrap an existing pipeline" pattern: the VideoModel holds a pipeline object; commands call its setters;
the pipeline's own loop polls the private stop event (`get_ctx()._stop_evt`) and emits torch float frames."""
import threading
import time

import torch
from pydantic import Field

from reactor_runtime import VideoModel, command, get_ctx


class Pipeline:
    def __init__(self, size):
        self.size = size
        self._mouse = (0.5, 0.5)
        self._paused = False
        self._lock = threading.Lock()
        self.frame = 0

    def set_mouse(self, x, y):
        with self._lock:
            self._mouse = (x, y)

    def mouse(self):
        with self._lock:
            return self._mouse

    def reset_session_state(self):
        self._mouse = (0.5, 0.5)
        self._paused = False
        self.frame = 0
        get_ctx().disable_monitoring()

    def _render(self):
        x, y = self.mouse()
        s = self.size
        frames = torch.full((1, 3, s, s), -1.0)  # [N, 3, H, W] float in [-1, 1]
        frames[0, 0] = x * 2 - 1  # red tracks x
        frames[0, 1] = y * 2 - 1  # green tracks y
        return frames

    def run(self):
        get_ctx().enable_monitoring()
        try:
            while True:
                if get_ctx()._stop_evt.is_set():
                    break
                if self._paused:
                    time.sleep(0.005)
                    continue
                self.frame += 1
                get_ctx().emit_block(self._render())
                time.sleep(0.002)
        finally:
            self.reset_session_state()


class PipelineModel(VideoModel):
    name = "pipeline-model"

    def __init__(self, fps=24, size=(32, 32), **kwargs):
        self._fps = fps
        self._pipeline = Pipeline(size[0])

    @command("mouse", description="Move the pointer")
    def mouse(self, x: float = Field(..., ge=0.0, le=1.0, description="0 = left"),
              y: float = Field(..., ge=0.0, le=1.0, description="0 = top")):
        self._pipeline.set_mouse(x, y)

    @command("pause", description="Pause frame generation")
    def pause(self):
        self._pipeline._paused = True

    @command("resume", description="Resume frame generation")
    def resume(self):
        self._pipeline._paused = False

    def start_session(self):
        self._pipeline.run()
