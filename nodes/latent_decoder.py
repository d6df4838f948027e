"""A small convolutional decoder from latent frames to RGB frames (8x upsampling by default)."""
from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from reactor_graph.node import Node, Port, register
from reactor_graph.weights import load_into


class TinyDecoder(nn.Module):
    def __init__(self, channels: int, width: int, upsample: int, padding: str = "zeros"):
        super().__init__()
        stages = int(math.log2(upsample))
        conv = partial(nn.Conv2d, kernel_size=3, padding=1, padding_mode=padding)
        layers: list[nn.Module] = [conv(channels, width), nn.SiLU()]
        w = width
        for _ in range(stages):
            w_next = max(w // 2, 16)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(w, w_next), nn.SiLU()]
            w = w_next
        layers += [conv(w, 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, 3, H, W] in [-1, 1]
        return torch.tanh(self.net(z))


@register("latent_decoder")
class LatentDecoder(Node):
    description = "Decodes latent frames [C, T, h, w] into RGB frames [T, 3, H, W] in [-1, 1], frame by frame."
    every_block = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        latent_channels: int = Field(4, ge=1)
        width: int = Field(64, ge=8, description="channels of the first conv stage")
        upsample: int = Field(8, description="spatial factor, a power of two")
        padding: Literal["zeros", "circular"] = Field(
            "zeros", description="what the convolutions see past the frame's edge: `zeros`, or `circular` (the "
                                 "other edge: for frames whose content wraps round, as the demo's does)")
        weights: str | None = None
        weights_prefix: str = ""

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        u = params.upsample
        if u < 1 or u & (u - 1):
            raise ValueError(f"upsample must be a power of two, got {u}")
        if graph.height % u or graph.width % u:
            raise ValueError(f"frame size {graph.height}x{graph.width} is not a multiple of upsample {u}")

    def ports(self):
        p, g = self.params, self.graph
        h, w = g.height // p.upsample, g.width // p.upsample
        return ({"latents": Port("tensor", "float", (p.latent_channels, "T", h, w), "[C, T, h, w]")},
                {"frames": Port("tensor", "float", ("T", 3, g.height, g.width), "[T, 3, H, W] in [-1, 1]")})

    def load(self, device, dtype):
        super().load(device, dtype)
        p = self.params
        torch.manual_seed(self.graph.seed + 3)
        self.model = TinyDecoder(p.latent_channels, p.width, p.upsample, p.padding)
        if p.weights:
            load_into(self.model, p.weights, self.graph.root, p.weights_prefix)
        self.model.to(device=device, dtype=dtype).eval()

    def forward(self, latents):
        return {"frames": self.model(latents.transpose(0, 1))}  # [C, T, h, w] -> frames as batch
