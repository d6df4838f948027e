"""Blocks leaving the hot path: device -> pinned host copy on a side stream, then handed on.

The copy of block n overlaps the generation of block n+1: `Block.video()` waits only on that block's own
copy event, so the loop never waits for a consumer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Block:
    index: int  # blocks since the session started
    format: str  # yuv420p | nv12 | rgb24
    frames: int
    height: int
    width: int
    started: float  # perf_counter when the block's work began
    ready: float = 0.0  # perf_counter when it left the hot path
    _host: torch.Tensor | None = None
    _event: Any = None
    meta: dict = field(default_factory=dict)

    def video(self) -> np.ndarray:
        """Host frames: yuv420p/nv12 as [T, H*3/2, W] uint8, rgb24 as [T, H, W, 3] uint8."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host.numpy()

    def rgb(self) -> np.ndarray:
        """[T, H, W, 3] uint8, converting on the host where the block is YUV (for tests and previews)."""
        if self.format == "rgb24":
            return self.video()
        import av

        return np.stack([av.VideoFrame.from_ndarray(f, format=self.format).to_ndarray(format="rgb24")
                         for f in self.video()])


class HostCopier:
    """Copies output blocks into a small ring of pinned host buffers on a side stream (CUDA), or clones (CPU)."""

    RING = 4  # blocks in flight before a buffer is reused; consumers copy out or encode well before that

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._ring: list[torch.Tensor] = []
        self._next = 0

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        if not self._ring or self._ring[0].shape != like.shape:
            self._ring = [torch.empty(like.shape, dtype=like.dtype, pin_memory=True) for _ in range(self.RING)]
        buf = self._ring[self._next % self.RING]
        self._next += 1
        return buf

    def emit(self, index: int, outputs: dict[str, Any], params, started: float) -> Block:
        video = outputs["video"]
        fmt = getattr(params, "format", "yuv420p")
        t, h = video.shape[0], video.shape[1] if fmt == "rgb24" else video.shape[1] * 2 // 3
        block = Block(index, fmt, t, h, video.shape[2], started)
        if self.cuda:
            host = self._buffer(video)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(video, non_blocking=True)
                video.record_stream(self.stream)
                evt = torch.cuda.Event()
                evt.record(self.stream)
            block._host, block._event = host, evt
        else:
            block._host = video.detach().clone()
        block.ready = time.perf_counter()
        return block
