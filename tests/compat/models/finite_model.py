"""Finite sources: a clip that the model itself loops over (emitting one frame at a time), and one whose
start_session() returns after the clip (the session ends on its own)."""
import time

import numpy as np

from reactor_runtime import VideoModel, get_ctx


def clip(length, size):
    return [np.full((size, size, 3), 10 * (i + 1), dtype=np.uint8) for i in range(length)]


class LoopingClip(VideoModel):
    def __init__(self, length=5, size=16):
        self.frames = clip(length, size)

    def start_session(self):
        i = 0
        while not get_ctx().should_stop():
            get_ctx().emit_frame(self.frames[i])  # one [H, W, 3] frame
            i = (i + 1) % len(self.frames)  # wrap around
            time.sleep(0.001)


class OneShotClip(VideoModel):
    def __init__(self, length=3, size=16):
        self.frames = clip(length, size)

    def start_session(self):
        for f in self.frames:
            if get_ctx().should_stop():
                return
            get_ctx().emit_block(f)
