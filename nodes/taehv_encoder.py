"""TAEHV tiny causal video encoder (Wan2.1 latent space) as a hot-path node: RGB frames -> latents.

Ports: frames [T, 3, H, W] in [-1, 1] (a video slot's pictures, e.g. through `video_in`) -> latents
[16, T/4, H/8, W/8] (the DiT's layout). T must be a multiple of 4 (set the video slot's `frames`, e.g. 12 for
3 latent frames a block). One phase: every block encodes the same way; the memory between blocks (each
MemBlock's last input frame) lives in buffers allocated in `load()` for the graph's frame size and zeroed in
place by `reset()`.

Weights: `random` (PyTorch's default init, seeded), or a local `taew2_1.pth` / `.safetensors` (its encoder
half; width and latent channels are read from the file).
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.node import Node, Port, register
from reactor_graph.weights import RANDOM, resolve_weights


@register("taehv_encoder")
class TAEHVEncoderNode(Node):
    description = ("TAEHV tiny causal video encoder for Wan2.1 latents: [T, 3, H, W] in [-1, 1] -> "
                   "[16, T/4, H/8, W/8]; T a multiple of 4.")
    every_block = True
    accepts_random_weights = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int = Field(64, ge=1, description="encoder width (random weights; a checkpoint sets its own)")
        latent_channels: int = Field(16, ge=1)
        size: tuple[int, int] | None = Field(None, description="[H, W] of the frames in (default: the graph's)")
        weights: str = Field(RANDOM, description="'random', or a local taew2_1.pth / .safetensors")
        seed: int = Field(0, description="seed of random weights (added to the graph's seed)")

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        self.size = tuple(params.size) if params.size else (graph.height, graph.width)
        if self.size[0] % 8 or self.size[1] % 8:
            raise ValueError(f"frame size {self.size[0]}x{self.size[1]} is not a multiple of the encoder's 8x "
                             f"downsampling")
        self.latent_hw = (self.size[0] // 8, self.size[1] // 8)

    def ports(self):
        c = self.params.latent_channels
        return ({"frames": Port("tensor", "float", ("T", 3, *self.size), "[T, 3, H, W] in [-1, 1], T = 4t")},
                {"latents": Port("tensor", "float", (c, "t", *self.latent_hw), f"latent block [{c}, T/4, h, w]")})

    def load(self, device, dtype):
        super().load(device, dtype)
        from reactor_graph.models.taehv import TAEHVEncoder, load_taehv_encoder

        p = self.params
        if p.weights == RANDOM:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.graph.seed + p.seed)
                model = TAEHVEncoder(p.width, p.latent_channels).to(device=device, dtype=dtype)
        else:
            model = load_taehv_encoder(resolve_weights(p.weights, self.graph.root, "TAEHV"), device=device,
                                       dtype=dtype)
            if model.latent_channels != p.latent_channels:
                raise ValueError(f"the TAEHV weights give {model.latent_channels} latent channels, the graph "
                                 f"takes {p.latent_channels}")
        self.model = model.eval().requires_grad_(False)
        self.model.allocate_state(1, *self.latent_hw, device=device, dtype=dtype)

    def reset(self):
        self.model.reset()

    def forward(self, frames):
        t = frames.shape[0]
        if t % self.model.t_downscale:
            raise ValueError(f"taehv_encoder '{self.name}': {t} frames a block, not a multiple of "
                             f"{self.model.t_downscale} (set the video slot's frames)")
        # [T, 3, H, W] -> TAEHV's [B, T, 3, H, W]; latents [B, t, C, h, w] -> the DiT's [C, t, h, w]
        return {"latents": self.model.block_forward(frames.to(self.dtype)[None])[0].transpose(0, 1)}
