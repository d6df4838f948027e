"""A game-like world model: `control` with two Literal choices, a starting image sent as base64 PNG, its own
`reset` command, and an __init__(self, config) that reads a config dict."""
import base64
import io
import time
from typing import Literal

import torch
from pydantic import Field

from reactor_runtime import VideoModel, command, get_ctx

MOVES = {"forward": (0, -1), "back": (0, 1), "left": (-1, 0), "right": (1, 0), "still": (0, 0)}


def decode_png(data: bytes):
    import av

    with av.open(io.BytesIO(data), format="png_pipe") as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="rgb24")


class GameModel(VideoModel):
    name = "game-model"

    def __init__(self, config):
        self.size = config.get("size", 32)
        self.block = config.block  # attribute access works too
        self.controls = []
        self._reset_state()

    def _reset_state(self):
        self.pos = [self.size // 2, self.size // 2]
        self.move = "still"
        self.camera = "still"
        self.background = torch.zeros(self.size, self.size, 3, dtype=torch.uint8)

    @command("control", description="Move and look")
    def control(self, movement: Literal["forward", "back", "left", "right", "still"] = "still",
                camera: Literal["up", "down", "left", "right", "still"] = Field("still", description="where to look")):
        self.move, self.camera = movement, camera
        self.controls.append((movement, camera))

    @command("set_starting_image", description="Start from this image (base64 PNG of the stream's size)")
    def set_starting_image(self, image_b64: str = Field(..., description="base64 of a PNG")):
        img = decode_png(base64.b64decode(image_b64, validate=True))
        if img.shape[:2] != (self.size, self.size):
            raise ValueError(f"the image is {img.shape[0]}x{img.shape[1]}, the world is {self.size}x{self.size}")
        self.background = torch.from_numpy(img.copy())

    @command("reset", description="Back to the start of the level")
    def reset(self):
        self._reset_state()

    def _frame(self):
        f = self.background.clone()
        x, y = self.pos
        f[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = torch.tensor([255, 255, 255], dtype=torch.uint8)
        return f

    def start_session(self):
        self._reset_state()
        while not get_ctx().should_stop():
            frames = []
            for _ in range(self.block):
                dx, dy = MOVES[self.move]
                self.pos = [min(max(self.pos[0] + dx, 1), self.size - 2), min(max(self.pos[1] + dy, 1), self.size - 2)]
                frames.append(self._frame())
            get_ctx().emit_block(torch.stack(frames))  # uint8 [N, H, W, 3] torch
            time.sleep(0.002)
