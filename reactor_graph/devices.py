"""Which device and dtype an engine runs on, from the graph's `device:`/`dtype:` or the CLI."""
from __future__ import annotations

import torch

from .errors import ReactorGraphError


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReactorGraphError(f"device '{requested}' was asked for but CUDA is not available here; "
                                f"use --device cpu (or device: auto in the graph)")
    return dev


def resolve_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    if requested is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, requested)
