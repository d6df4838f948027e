"""The emitter: converts a block to the encoder's pixel format on the device; the engine streams it."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.node import Node, Port, register


@register("emit")
class Emit(Node):
    description = ("Marks the stream: converts [T, 3, H, W] frames (float in [-1, 1] or uint8) to yuv420p/nv12 "
                   "(Triton on GPU) or rgb24; the engine copies each block to the host and streams it.")
    is_output = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        format: Literal["yuv420p", "nv12", "rgb24"] = Field("yuv420p", description="pixel format handed on")
        matrix: Literal["bt601", "bt709"] = Field("bt601", description="YUV matrix (limited range)")

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        if params.format != "rgb24" and (graph.height % 2 or graph.width % 2):
            raise ValueError(f"{params.format} needs an even frame size, got {graph.height}x{graph.width}")

    def ports(self):
        g = self.graph
        shape = ("T", g.height, g.width, 3) if self.params.format == "rgb24" else ("T", g.height * 3 // 2, g.width)
        return ({"frames": Port("tensor", None, ("T", 3, g.height, g.width), "[T, 3, H, W]")},
                {"video": Port("tensor", "uint8", shape, f"{self.params.format} frames")})

    def forward(self, frames):
        from reactor_graph.kernels import colour

        if self.params.format == "rgb24":
            if frames.dtype != torch.uint8:
                frames = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return {"video": frames.permute(0, 2, 3, 1).contiguous()}  # [T, H, W, 3]
        convert = colour.rgb_to_nv12 if self.params.format == "nv12" else colour.rgb_to_yuv420p
        return {"video": convert(frames, matrix=self.params.matrix)}
