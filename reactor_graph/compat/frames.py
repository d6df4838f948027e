"""What `emit_block` accepts, and the one conversion every accepted form goes through.

Accepted (anything else is refused with a ValueError/TypeError that says what was given and what is taken):

- numpy ``uint8`` ``[N, H, W, 3]`` or one frame ``[H, W, 3]``, RGB in [0, 255] (the Reactor runtime API);
- torch tensors on any device, ``[N, H, W, 3]`` or ``[N, 3, H, W]`` (or one frame ``[H, W, 3]`` /
  ``[3, H, W]``), ``uint8`` in [0, 255] or float (fp16/bf16/fp32/fp64) in [-1, 1];
- ``None``: one black frame of the stream's size (the Reactor API's "emit a black frame"), once the size is
  known.

Float frames are read as [-1, 1] and clamped, so a decoder that overshoots a little is fine; a float block whose
values go past +-2 is refused, because that is almost always a [0, 255] or otherwise mis-scaled block and would
otherwise stream as solid white. Where a tensor's layout is ambiguous (the last dim and dim 1 are both 3), the
API's own channels-last layout wins.

Everything becomes ``[N, 3, H, W]`` on the input's device, uint8 or float (no copy where a view suffices).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

ACCEPTS = ("numpy uint8 [N, H, W, 3] or [H, W, 3] (RGB, 0..255), or a torch tensor [N, H, W, 3] or "
           "[N, 3, H, W] on any device, uint8 (0..255) or float in [-1, 1], or None for a black frame")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OVERSHOOT = 2.0  # float blocks beyond +-this are refused as mis-scaled; within it they are clamped


class FrameError(ValueError):
    """A block emit_block cannot take; the message says what it got and what it takes."""


def describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"numpy {x.dtype} array of shape {list(x.shape)}"
    if isinstance(x, torch.Tensor):
        return f"torch {str(x.dtype).replace('torch.', '')} tensor of shape {list(x.shape)} on {x.device}"
    if isinstance(x, (list, tuple)):
        return f"a Python {type(x).__name__} of {len(x)} items"
    t = type(x)
    return f"a {t.__qualname__}" if t.__module__ == "builtins" else f"a {t.__module__}.{t.__qualname__}"


def _refuse(x: Any, why: str) -> FrameError:
    return FrameError(f"emit_block got {describe(x)}: {why}. It takes {ACCEPTS}.")


def as_frames(x: Any, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Any accepted block -> [N, 3, H, W] (uint8 or float) on the block's device. `size` is (H, W) for None."""
    if x is None:
        if size is None or not size[0]:
            raise FrameError("emit_block(None) emits a black frame of the stream's size, which is not known yet "
                             "(no block emitted so far and no 'size' in the manifest); emit a real frame first")
        return torch.zeros((1, 3, size[0], size[1]), dtype=torch.uint8)
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            hint = ("; for float frames in [0, 1] use (x * 255).round().astype(np.uint8), or pass a torch tensor "
                    "in [-1, 1]") if x.dtype.kind == "f" else ""
            raise _refuse(x, f"numpy frames must be uint8{hint}")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise _refuse(x, _shape_hint(x.shape, numpy=True))
        _check_nonempty(x, x.shape[0], x.shape[1], x.shape[2])
        return torch.from_numpy(x).permute(0, 3, 1, 2)
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8 and x.dtype not in _FLOAT:
            raise _refuse(x, "tensor frames must be uint8 (0..255) or float (in [-1, 1])")
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4:
            raise _refuse(x, _shape_hint(x.shape, numpy=False))
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)  # [N, H, W, 3] -> [N, 3, H, W] (the documented layout wins ties)
        elif x.shape[1] != 3:
            raise _refuse(x, _shape_hint(x.shape, numpy=False))
        _check_nonempty(x, x.shape[0], x.shape[2], x.shape[3])
        if x.dtype in _FLOAT:
            peak = float(x.detach().abs().amax())  # one scalar sync per block; catches [0, 255] floats
            if not peak <= _OVERSHOOT:  # also refuses NaN
                raise _refuse(x, f"float frames are read as [-1, 1], but values reach {peak:g}"
                                 + ("; for [0, 255] floats convert with .round().to(torch.uint8)" if peak > 2 else ""))
        return x
    if isinstance(x, (list, tuple)):
        raise _refuse(x, "stack the frames into one array first (np.stack(frames))")
    raise _refuse(x, "not an array")


def _shape_hint(shape, numpy: bool) -> str:
    shape = list(shape)
    if len(shape) == 5:
        return "a 5-D block (batch first?); drop the batch dimension, e.g. x[0], and put channels last"
    if len(shape) in (3, 4) and shape[-1] in (1, 4):
        return f"{shape[-1]} channels; frames are RGB (3 channels)" + (", drop alpha with x[..., :3]" if shape[-1] == 4 else "")
    want = "[N, H, W, 3] or [H, W, 3]" if numpy else "[N, H, W, 3] or [N, 3, H, W]"
    return f"shape {shape} is not {want}"


def _check_nonempty(x, n, h, w) -> None:
    if n == 0 or h == 0 or w == 0:
        raise _refuse(x, "the block is empty")


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    if frames.dtype == torch.uint8:
        return frames
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_float(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if frames.dtype == torch.uint8:
        return (frames.to(torch.float32) * (2 / 255) - 1).to(dtype)
    return frames.clamp(-1, 1).to(dtype)
