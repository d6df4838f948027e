"""Camera frames in: a video slot's pictures as the RGB tensor a model takes (size, value range)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.node import Node, Port, register


@register("video_in")
class VideoIn(Node):
    description = ("A video/image slot's [T, 3, H, W] pictures (values in [-1, 1]) resized to `size` and mapped to "
                   "`range`: the RGB input of an encoder or a model. Capturable (no host work).")

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        size: tuple[int, int] | None = Field(None, description="[height, width] out (default: as it comes)")
        range: Literal["-1..1", "0..1"] = Field("-1..1", description="value range out")

    def ports(self):
        out = ("T", 3, *self.params.size) if self.params.size else ("T", 3, "H", "W")
        return ({"frames": Port("tensor", "float", ("T", 3, "H", "W"), "camera pictures in [-1, 1]")},
                {"rgb": Port("tensor", "float", out, f"[T, 3, h, w] in {self.params.range}")})

    def forward(self, frames):
        x = frames.to(self.dtype)
        if self.params.size and tuple(x.shape[-2:]) != tuple(self.params.size):
            x = F.interpolate(x, size=tuple(self.params.size), mode="bilinear", align_corners=False, antialias=True)
        if self.params.range == "0..1":
            x = x * 0.5 + 0.5
        return {"rgb": x}
