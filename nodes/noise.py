"""Gaussian noise for each block, from a generator reseeded at every session start."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.node import Node, Port, register


@register("noise")
class Noise(Node):
    description = "Fresh Gaussian noise every block, [C, T, h, w]; reproducible per session from `seed`."
    every_block = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        shape: tuple[int, int, int, int] = Field(description="[C, T, h, w] of the latent block")
        seed: int = Field(0, description="added to the graph's seed")

    inputs = {"seed": Port("int", description="per-session seed (optional)", optional=True)}
    outputs = {"noise": Port("tensor", "float", None, "[C, T, h, w] of shape params.shape")}

    def ports(self):
        return dict(self.inputs), {"noise": Port("tensor", "float", tuple(self.params.shape), "[C, T, h, w]")}

    def load(self, device, dtype):
        super().load(device, dtype)
        self.generator = torch.Generator(device="cpu") if device.type != "cuda" else None
        # Filled in place every block: a captured hot path reads it at this fixed address, no copy.
        self.buffer = torch.empty(self.params.shape, device=device, dtype=dtype)
        self._seed_used = None
        self.reset()

    def reset(self):
        self._seed_used = None

    def prepare(self, seed: int | None = None):
        """Host half: (re)seed when the seed slot changes or a session starts. On CUDA this seeds the
        device's default generator, whose state a captured graph reads at every replay, so the noise is
        drawn inside the captured hot path and still follows the seed."""
        seed = self.graph.seed + self.params.seed + (seed or 0)
        if seed != self._seed_used:
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            else:
                self.generator.manual_seed(seed)
            self._seed_used = seed

    def forward(self):
        if self.device.type == "cuda":
            self.buffer.normal_()  # the default generator: graph-safe, philox offset advances per replay
        else:
            self.buffer.normal_(generator=self.generator)
        return {"noise": self.buffer}
