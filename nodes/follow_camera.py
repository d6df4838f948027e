"""Generated frames moved to where the camera's bright spot is: the CPU camera demo's steering."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.node import Node, Port, register


def _centroid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, H, W] >= 0 -> (y, x) in [-1, 1] and the total weight, per item."""
    n, h, w = weight.shape
    ys = torch.linspace(-1, 1, h, device=weight.device, dtype=weight.dtype).view(1, h, 1)
    xs = torch.linspace(-1, 1, w, device=weight.device, dtype=weight.dtype).view(1, 1, w)
    total = weight.sum(dim=(1, 2)).clamp_min(1e-6)
    return (weight * ys).sum(dim=(1, 2)) / total, (weight * xs).sum(dim=(1, 2)) / total, total


@register("follow_camera")
class FollowCamera(Node):
    description = ("Moves each generated frame's subject (what differs from its border colour) to the camera's "
                   "brightest region; where the camera shows no bright spot the frames pass unchanged. "
                   "Tensor work only: capturable.")

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        threshold: float = Field(0.35, description="how much brighter than the picture's mean a bright spot is "
                                                   "(luma, values in [-1, 1])")
        follow: float = Field(1.0, ge=0, le=1, description="0: ignore the camera, 1: sit on the bright spot")

    inputs = {"frames": Port("tensor", "float", ("T", 3, "H", "W"), "generated frames in [-1, 1]"),
              "camera": Port("tensor", "float", ("C", 3, "h", "w"), "camera pictures in [-1, 1]")}

    def ports(self):
        return dict(self.inputs), {"frames": Port("tensor", "float", ("T", 3, "H", "W"), "moved frames")}

    def forward(self, frames, camera):
        x = frames.float()
        t, _, h, w = x.shape
        cam = camera[-1:].float()
        luma = 0.299 * cam[:, 0] + 0.587 * cam[:, 1] + 0.114 * cam[:, 2]  # [1, h, w]
        spot = (luma - luma.mean() - self.params.threshold).clamp_min(0)
        cy, cx, mass = _centroid(spot)
        present = (mass > 1e-3 * spot[0].numel() * 0.05).float()  # no bright spot: stay where it is
        border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # [T, 3, 2H+2W]
        bg = border.median(dim=2).values  # [T, 3]
        diff = (x - bg[:, :, None, None]).abs().sum(dim=1)  # [T, H, W]
        peak = diff.flatten(1).amax(dim=1).clamp_min(1e-6)[:, None, None]
        subject = (diff / peak - 0.5).clamp_min(0)  # the subject's core, not the background's texture
        sy, sx, _ = _centroid(subject)
        k = self.params.follow * present
        dy, dx = (cy - sy) * k, (cx - sx) * k  # [T]
        theta = torch.zeros((t, 2, 3), device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = 1
        theta[:, 1, 1] = 1
        theta[:, 0, 2] = -dx
        theta[:, 1, 2] = -dy
        grid = F.affine_grid(theta, (t, 3, h, w), align_corners=False)
        moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return {"frames": moved.to(frames.dtype)}
