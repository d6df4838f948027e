"""BlockVideoTrack: engine blocks in, paced video frames out.

The engine's thread pushes whole blocks (copied out of their pinned buffers at once); aiortc's sender
calls `recv()`, which hands frame k out at `t0 + k / fps` on an absolute clock with pts `k * 90000 / fps`,
so the stream never drifts: when generation is faster the track waits (and the bounded queue fills), when
it is slower the last frame is repeated. The queue's policy is `latest` (a full queue drops its oldest
frame: low latency, frames may be skipped) or `lossless` (a full queue makes the producer wait: every frame
is shown and the engine runs at the stream's pace; `close_producer()` releases it at session end).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from fractions import Fraction
from typing import Any, Awaitable, Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

CLOCK_RATE = 90000
TIME_BASE = Fraction(1, CLOCK_RATE)
# `run --trace`: a bounded deque that every track appends to: each frame from its block leaving the hot path,
# through the frame queue, to the encoder (aiortc encodes and sends it next); None: off
TRACE = None
_BLOCK_OF_PTS: dict[int, int] = {}  # `run --trace`: which block a frame sent (pts) came from, for the encoder's spans
POLICIES = ("latest", "lossless")


class _Item:
    __slots__ = ("pixels", "format", "ready", "block")

    def __init__(self, pixels: np.ndarray, fmt: str, ready: float, block: int):
        self.pixels, self.format, self.ready, self.block = pixels, fmt, ready, block


def blank(fmt: str, height: int, width: int) -> np.ndarray:
    """A black frame in the given pixel format (limited-range YUV black is Y=16, U=V=128)."""
    if fmt == "rgb24":
        return np.zeros((height, width, 3), np.uint8)
    frame = np.full((height * 3 // 2, width), 128, np.uint8)
    frame[:height] = 16
    return frame


class BlockVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, fps: float, height: int, width: int, *, policy: str = "lossless", capacity: int = 8,
                 fmt: str = "yuv420p", idle_fps: float = 2.0, max_lag: float = 0.5,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if fps <= 0 or capacity < 1:
            raise ValueError("fps must be > 0 and capacity >= 1")
        self.fps = Fraction(fps).limit_denominator(1001)
        self.policy, self.capacity = policy, int(capacity)
        self.height, self.width, self.format = int(height), int(width), fmt
        self.idle_stride = max(1, round(float(self.fps) / idle_fps)) if idle_fps > 0 else 1
        self.max_lag = max_lag
        self._clock, self._sleep = clock, sleep
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._producer_closed = False
        self._last: _Item | None = None
        self._t0: float | None = None
        self.k = 0  # index of the next frame on the clock
        # counters (read by metrics and the stats message)
        self.pushed = 0  # frames accepted from blocks
        self.sent = 0  # frames handed to the encoder (fresh + repeats + idle)
        self.fresh = 0  # frames sent for the first time
        self.repeats = 0  # the last frame again because the queue was empty
        self.idle = 0  # blank frames before the first block arrived
        self.drops = 0  # frames dropped by `latest` when the queue was full
        self.skipped = 0  # clock slots skipped because recv() fell more than max_lag behind
        self.last_queue_s = 0.0  # how long the last fresh frame waited between block ready and send

    # -- producer side (the engine's thread) ------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._queue)

    def push_block(self, block: Any) -> int:
        """Copy a reactor_graph.emit.Block's frames out of its (reused) host buffer and queue them."""
        pixels = np.array(block.video(), copy=True)
        return self.push(pixels, fmt=block.format, ready=block.ready or time.perf_counter(), block=block.index)

    def push(self, frames: np.ndarray, fmt: str | None = None, ready: float | None = None,
             block: int = -1) -> int:
        """Queue frames [T, ...] (the caller hands over ownership). Returns how many were queued; under
        `lossless` it waits for room, returning early once the producer is closed."""
        fmt = fmt or self.format
        ready = time.perf_counter() if ready is None else ready
        queued = 0
        for pixels in frames:
            item = _Item(pixels, fmt, ready, block)
            with self._cond:
                if self._producer_closed:
                    return queued
                if self.policy == "lossless":
                    while len(self._queue) >= self.capacity and not self._producer_closed:
                        self._cond.wait(0.1)
                    if self._producer_closed:
                        return queued
                elif len(self._queue) >= self.capacity:
                    self._queue.popleft()
                    self.drops += 1
                self._queue.append(item)
                self.pushed += 1
                queued += 1
        return queued

    def close_producer(self) -> None:
        """No more frames: wake a producer waiting for room and refuse later pushes (safe from any thread)."""
        with self._cond:
            self._producer_closed = True
            self._cond.notify_all()

    @property
    def producer_closed(self) -> bool:
        return self._producer_closed

    # -- consumer side (aiortc's sender, on the event loop) ---------------------------------------------
    def pts(self, k: int) -> int:
        """Presentation time of clock slot k in 1/90000 s: exactly k * 90000 / fps, rounded once."""
        return round(k * CLOCK_RATE * self.fps.denominator / self.fps.numerator)

    def due(self, k: int) -> float:
        return self._t0 + k * self.fps.denominator / self.fps.numerator

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = self._clock()
        now = self._clock()
        if now - self.due(self.k) > self.max_lag:  # fell far behind (a stall): rejoin the clock, not burst
            behind = int((now - self._t0) * self.fps) - self.k
            if behind > 0:
                self.k += behind
                self.skipped += behind
        wait = self.due(self.k) - self._clock()
        if wait > 0:
            await self._sleep(wait)
        if self.readyState != "live":
            raise MediaStreamError
        with self._cond:
            item = self._queue.popleft() if self._queue else None
            if item is not None:
                self._cond.notify_all()
        k = self.k
        repeated = item is None
        if item is not None:
            self._last = item
            self.fresh += 1
            self.last_queue_s = max(0.0, time.perf_counter() - item.ready)
            self.k += 1
        elif self._last is not None:
            item = self._last
            self.repeats += 1
            self.k += 1
        else:  # nothing generated yet (waiting in line, or the first block is still cooking): slow blanks
            item = _Item(blank(self.format, self.height, self.width), self.format, 0.0, -1)
            self.idle += 1
            self.k += self.idle_stride
        self.sent += 1
        frame = av.VideoFrame.from_ndarray(item.pixels, format=item.format)
        frame.pts = self.pts(k)
        if TRACE is not None and not repeated and item.block >= 0:  # `run --trace`: block -> queue -> encoder
            TRACE.append({"name": f"frame of block {item.block}", "start": item.ready, "end": time.perf_counter(),
                          "args": {"block": item.block, "pts": frame.pts}})
            _BLOCK_OF_PTS[frame.pts] = item.block
            if len(_BLOCK_OF_PTS) > 4096:
                del _BLOCK_OF_PTS[next(iter(_BLOCK_OF_PTS))]
        frame.time_base = TIME_BASE
        return frame

    def stop(self) -> None:
        self.close_producer()
        super().stop()

    def counters(self) -> dict[str, int]:
        return {"pushed": self.pushed, "sent": self.sent, "fresh": self.fresh, "repeats": self.repeats,
                "idle": self.idle, "drops": self.drops, "skipped": self.skipped}


class _TimedEncoder:
    """`run --trace`: aiortc's encoder of a track, each frame's encode timed (aiortc runs it in an executor thread
    and sends its packets next)."""

    def __init__(self, inner):
        object.__setattr__(self, "inner", inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):  # aiortc sets target_bitrate on the encoder
        setattr(self.inner, name, value)

    def encode(self, frame, force_keyframe: bool = False):
        pts = getattr(frame, "pts", None)  # before encoding: aiortc's encoders restamp the frame
        t0 = time.perf_counter()
        payloads, timestamp = self.inner.encode(frame, force_keyframe)
        trace = TRACE
        if trace is not None:
            block = _BLOCK_OF_PTS.get(pts)
            trace.append({"name": f"encode frame of block {block}" if block is not None else "encode frame",
                          "start": t0, "end": time.perf_counter(), "track": "encoder",
                          "args": {"block": block, "pts": pts, "packets": len(payloads),
                                   "bytes": sum(len(p) for p in payloads), "keyframe": bool(force_keyframe)}})
        return payloads, timestamp


def trace_encoders() -> None:
    """Time every encoder aiortc makes from now on (`run --trace`); once per process."""
    from aiortc import rtcrtpsender

    if getattr(rtcrtpsender.get_encoder, "timed", False):
        return
    plain = rtcrtpsender.get_encoder

    def get_encoder(codec):
        return _TimedEncoder(plain(codec))

    get_encoder.timed = True
    rtcrtpsender.get_encoder = get_encoder
