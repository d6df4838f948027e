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
    ready: float = 0.0  # perf_counter when it left the hot path (on a GPU: its work queued, maybe not done)
    on_host: float = 0.0  # perf_counter when its frames were first seen on the host (video())
    _host: torch.Tensor | None = None
    _event: Any = None
    meta: dict = field(default_factory=dict)

    def video(self) -> np.ndarray:
        """Host frames: yuv420p/nv12 as [T, H*3/2, W] uint8, rgb24 as [T, H, W, 3] uint8."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if not self.on_host:
            self.on_host = time.perf_counter()
        return self._host.numpy()

    @property
    def made_s(self) -> float:
        """Seconds from the block's boundary to its frames on the host: what making it took (the GPU's work
        included, which `ready` is not); waits for the frames."""
        self.video()
        return max(0.0, self.on_host - self.started)

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
        # One ring per block shape: a session's first block may be shorter (a causal decoder's first
        # phase), and dropping a ring while its copies are in flight would be a race.
        self._rings: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], list[Any], list[int]]] = {}

    def _slot(self, like: torch.Tensor):
        key = (tuple(like.shape), like.dtype)
        if key not in self._rings:
            self._rings[key] = ([torch.empty_like(like) for _ in range(self.RING)],
                                [torch.empty(like.shape, dtype=like.dtype, pin_memory=True) for _ in range(self.RING)],
                                [None] * self.RING, [0])
        dev, host, done, counter = self._rings[key]
        i = counter[0] % self.RING
        counter[0] += 1
        return dev, host, done, i

    def emit(self, index: int, outputs: dict[str, Any], params, started: float) -> Block:
        video = outputs["video"]
        fmt = getattr(params, "format", "yuv420p")
        t, h = video.shape[0], video.shape[1] if fmt == "rgb24" else video.shape[1] * 2 // 3
        block = Block(index, fmt, t, h, video.shape[2], started)
        if self.cuda:
            dev, host, done, i = self._slot(video)
            main = torch.cuda.current_stream(self.device)
            if done[i] is not None:
                main.wait_event(done[i])  # the host copy from this slot, RING blocks ago
            dev[i].copy_(video, non_blocking=True)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                host[i].copy_(dev[i], non_blocking=True)
                evt = torch.cuda.Event()
                evt.record(self.stream)
            done[i] = evt
            block._host, block._event = host[i], evt
        else:
            block._host = video.detach().clone()
        block.ready = time.perf_counter()
        return block
