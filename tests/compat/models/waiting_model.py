"""A model that shows nothing until the client sends its first prompt."""
import time

import numpy as np

from reactor_runtime import VideoModel, command, get_ctx


class WaitingModel(VideoModel):
    def __init__(self, size=16):
        self.size = size
        self._prompt = None

    @command("set_prompt")
    def set_prompt(self, prompt: str):
        """Change the prompt

        (the first paragraph of the docstring is the description)"""
        self._prompt = prompt

    def start_session(self):
        self._prompt = None
        while not get_ctx().should_stop():
            if self._prompt is None:
                time.sleep(0.005)
                continue
            get_ctx().emit_block(np.full((1, self.size, self.size, 3), len(self._prompt), dtype=np.uint8))
            time.sleep(0.002)
