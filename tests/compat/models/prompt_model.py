"""A text-to-video model in the Reactor API's usual shape: a prompt command, a loop that reads it every block.

The "generation" paints each frame with a colour derived from the prompt, so a test can see which prompt a
block was made from; `read_log` records the prompt each block read.
"""
import time

import numpy as np
from pydantic import Field

from reactor_runtime import VideoModel, command, get_ctx


def colour_of(prompt: str) -> tuple[int, int, int]:
    h = sum(ord(c) * (i + 1) for i, c in enumerate(prompt))
    return (40 + h % 180, 40 + (h // 7) % 180, 40 + (h // 49) % 180)


class PromptModel(VideoModel):
    name = "prompt-model"

    def __init__(self, size=32, frames_per_block=2, default_prompt="a red circle", **kwargs):
        self.size = size
        self.frames_per_block = frames_per_block
        self.default_prompt = default_prompt
        self._prompt = default_prompt
        self.read_log = []
        self.sessions = 0
        time.sleep(0.01)  # "loading weights"

    @command("set_prompt", description="Change the prompt")
    def set_prompt(self, prompt: str = Field(..., min_length=1, max_length=200, description="what to show")):
        self._prompt = prompt
        get_ctx().send({"type": "prompt", "data": {"prompt": prompt}})

    def _generate(self, prompt):
        block = np.empty((self.frames_per_block, self.size, self.size, 3), dtype=np.uint8)
        block[:] = colour_of(prompt)
        return block

    def start_session(self):
        self.sessions += 1
        try:
            while not get_ctx().should_stop():
                prompt = self._prompt
                self.read_log.append(prompt)
                get_ctx().emit_block(self._generate(prompt))
                time.sleep(0.002)
        finally:
            self._prompt = self.default_prompt  # back to a clean state for the next user
