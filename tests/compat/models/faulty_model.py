"""Models that go wrong: one raising mid-session (once), a command that raises, one ignoring should_stop()."""
import time

import numpy as np

from reactor_runtime import VideoModel, command, get_ctx


class FaultyModel(VideoModel):
    def __init__(self, fail_at=3, size=16):
        self.fail_at = fail_at
        self.size = size
        self.failed = False

    @command("explode", description="A command that raises")
    def explode(self, how: str = "badly"):
        raise ValueError(f"exploded {how}")

    def _step(self, n):
        if not self.failed and n == self.fail_at:
            self.failed = True
            raise RuntimeError("CUDA out of memory (pretend)")
        return np.full((1, self.size, self.size, 3), n, dtype=np.uint8)

    def start_session(self):
        n = 0
        while not get_ctx().should_stop():
            get_ctx().emit_block(self._step(n))
            n += 1
            time.sleep(0.002)


class StubbornModel(VideoModel):
    """Emits once, then works `seconds` without checking should_stop()."""

    def __init__(self, seconds=0.6, size=16):
        self.seconds, self.size = seconds, size

    def _long_denoise(self):
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            time.sleep(0.01)

    def start_session(self):
        get_ctx().emit_block(np.zeros((self.size, self.size, 3), dtype=np.uint8))
        self._long_denoise()


class SizeChanger(VideoModel):
    """Emits a 16x16 block, then a 32x32 one."""

    def start_session(self):
        get_ctx().emit_block(np.zeros((16, 16, 3), dtype=np.uint8))
        get_ctx().emit_block(np.zeros((32, 32, 3), dtype=np.uint8))
        while not get_ctx().should_stop():
            time.sleep(0.005)
