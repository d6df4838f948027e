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
    """Hands output blocks to the host without stalling the loop.

    CUDA: the block is first copied device-to-device into a ring slot (microseconds; frees the captured
    graph's static output for the next replay), then a side stream copies that slot into a pinned host
    buffer; `Block.video()` waits on that copy alone. CPU: a clone.
    """

    RING = 4  # blocks in flight before a slot is reused; consumers copy out or encode well before that

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._dev: list[torch.Tensor] = []
        self._host: list[torch.Tensor] = []
        self._done: list[Any] = []
        self._next = 0

    def _slot(self, like: torch.Tensor) -> int:
        if not self._dev or self._dev[0].shape != like.shape or self._dev[0].dtype != like.dtype:
            self._dev = [torch.empty_like(like) for _ in range(self.RING)]
            self._host = [torch.empty(like.shape, dtype=like.dtype, pin_memory=True) for _ in range(self.RING)]
            self._done = [None] * self.RING
        i = self._next % self.RING
        self._next += 1
        return i

    def emit(self, index: int, outputs: dict[str, Any], params, started: float) -> Block:
        video = outputs["video"]
        fmt = getattr(params, "format", "yuv420p")
        t, h = video.shape[0], video.shape[1] if fmt == "rgb24" else video.shape[1] * 2 // 3
        block = Block(index, fmt, t, h, video.shape[2], started)
        if self.cuda:
            i = self._slot(video)
            main = torch.cuda.current_stream(self.device)
            if self._done[i] is not None:
                main.wait_event(self._done[i])  # the host copy from this slot, RING blocks ago
            self._dev[i].copy_(video, non_blocking=True)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                self._host[i].copy_(self._dev[i], non_blocking=True)
                evt = torch.cuda.Event()
                evt.record(self.stream)
            self._done[i] = evt
            block._host, block._event = self._host[i], evt
        else:
            block._host = video.detach().clone()
        block.ready = time.perf_counter()
        return block
