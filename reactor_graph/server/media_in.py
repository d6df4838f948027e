"""Inbound video: the tracks a client publishes (SDK `publishTrack(name, track)`, `<WebcamStream>`) into the
host's video slots.

The session response declares one `{name, kind: "video", direction: "sendonly"}` track per video slot (the
direction is the client's: it sends). The client's offer maps each to a mid; the server's transceiver for
it receives. Frames are read as they arrive, resized (scaled to cover, centre-cropped: the aspect ratio is
kept) and converted to yuv420p at the slot's declared size by libswscale here, and put into the host's
latest-frame buffer; the engine converts the newest to RGB on its device at the next block boundary
(reactor_graph/inputs.py). Only the client in session feeds the model; a waiting client's frames are read
and dropped, so its connection stays healthy. A frame that cannot be used (an absurd size, a conversion
error) is counted and dropped; the track goes on.

A Reactor compat host (one with `push_frame`) gets its model's `on_frame(frame)` (RGB [H, W, 3] uint8 at the
model's size) for each frame, from a thread of its own that always delivers the newest frame.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import weakref
from typing import Any

import numpy as np

from ..inputs import to_yuv420p

log = logging.getLogger("reactor_graph.server")


def just_in_time_frames(block_s: float | None, fps: float, floor: int) -> int:
    """The outgoing queue's capacity when the picture follows the client's camera.

    What the queue holds is latency between the camera and the screen, so it is kept short, but under the
    lossless policy the engine starts its next block only once the last one is queued: a queue shorter than
    one block's making time starves the player every block (a 436 ms block at 16 fps with 2 frames queued
    plays 11.7 frames/s, not 16). So: the frames that play while one block is made (the last block's time,
    25% more, and one frame), at least `floor`, at most 4 seconds."""
    if not block_s or block_s <= 0 or fps <= 0:
        return max(1, floor)
    need = math.ceil(block_s * 1.25 * fps) + 1
    return max(1, floor, min(need, math.ceil(4 * fps)))

def own_size(frame: Any, most: tuple[int, int] = (720, 1280)) -> tuple[int, int]:
    """A frame's own size, even, scaled down to fit `most` (H, W)."""
    scale = min(1.0, most[0] / max(1, frame.height), most[1] / max(1, frame.width))
    return max(2, int(frame.height * scale) // 2 * 2), max(2, int(frame.width * scale) // 2 * 2)


def yuv_to_rgb_hwc(yuv: np.ndarray) -> np.ndarray:
    import av

    h = yuv.shape[0] * 2 // 3
    frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
    return frame.to_ndarray(format="rgb24")[:h]


class CompatFeed:
    """`inputs` for a compat ModelHost: newest frame -> model.on_frame in a thread of its own."""

    def __init__(self, host: Any, names: list[str]):
        self.host, self.names = host, names
        self._cond = threading.Condition()
        self._latest: tuple[str, np.ndarray] | None = None
        self._thread: threading.Thread | None = None
        self.received = 0
        self.delivered = 0
        self.errors = 0
        self._arrived = 0.0

    def tracks(self) -> list[str]:
        return list(self.names)

    def size(self, name: str) -> tuple[int, int] | None:
        """The model's frame size once known (its first block); before that, frames keep their own."""
        h, w = int(self.host.height), int(self.host.width)
        return (h, w) if h > 0 and w > 0 else None

    def feed(self, name: str, yuv: np.ndarray, arrived: float | None = None) -> None:
        with self._cond:
            self._latest = (name, yuv)
            self.received += 1
            self._arrived = time.perf_counter()
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name="reactor-model-frames", daemon=True)
                self._thread.start()

    def clear(self) -> None:
        with self._cond:
            self._latest = None
            self._cond.notify()

    def stats(self) -> dict:
        live = self.received and time.perf_counter() - self._arrived < 1.0
        return {n: {"state": "camera" if live else "default", "received": self.received,
                    "used": self.delivered, "errors": self.errors} for n in self.names}

    IDLE_SECONDS = 1.0  # no frame for this long: the delivering thread ends (the next frame starts another)

    def _deliver(self) -> None:
        while True:
            with self._cond:
                if self._latest is None:
                    self._cond.wait(self.IDLE_SECONDS)
                if self._latest is None:  # idle (the client stopped, the session ended): end the thread
                    self._thread = None
                    return
                name, yuv = self._latest
                self._latest = None
            try:
                self.host.push_frame(yuv_to_rgb_hwc(yuv), name)
                self.delivered += 1
            except Exception:  # noqa: BLE001 - a model's on_frame that fails must not stop the feed
                self.errors += 1
                log.exception("the model's on_frame failed")


def host_inputs(host: Any) -> Any:
    """The host's input side: an Engine's `inputs`; for a compat host, a CompatFeed over its push_frame (made
    once); None when the host takes no video."""
    inputs = getattr(host, "inputs", None)
    if inputs is not None:
        return inputs
    if not callable(getattr(host, "push_frame", None)):
        return None
    model, driver = getattr(host, "model", None), getattr(host, "driver", None)
    names: list[str] = []
    if driver is not None and getattr(driver, "bundles", False):
        names = list(driver.video_inputs(model))
    elif model is not None and _overrides_on_frame(model):
        names = ["webcam"]
    feed = CompatFeed(host, names) if names else None
    try:
        host.inputs = feed
    except AttributeError:
        pass
    return feed


def _overrides_on_frame(model: Any) -> bool:
    fn = getattr(type(model), "on_frame", None)
    if fn is None:
        return False
    for base in type(model).__mro__[1:]:
        if getattr(base, "on_frame", None) is fn:
            return False  # inherited unchanged from the API's no-op
    return True


class InboundMedia:
    """Reads the tracks clients publish and feeds the host's input side (from the event loop)."""

    def __init__(self, host: Any, metrics: Any):
        self.host, self.metrics = host, metrics
        self.inputs = host_inputs(host)
        self._names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pc -> {mid: declared name}

    def tracks(self) -> list[str]:
        return self.inputs.tracks() if self.inputs is not None else []

    def queue_frames(self, settings: Any, block_s: float | None = None, fps: float = 0.0) -> int:
        """The outgoing frame queue's capacity: when the picture follows the client's camera, just long enough
        to play while the next block is made (`just_in_time_frames`, from the last block's time)."""
        if self.tracks():
            return just_in_time_frames(block_s, fps, min(settings.queue_frames, settings.input_queue_frames))
        return settings.queue_frames

    def expect(self, pc: Any, mapping: list) -> None:
        """An offer's track_mapping: which of its mids carry which published track."""
        declared = set(self.tracks())
        self._names[pc] = {e.mid: e.name for e in mapping
                               if e.direction == "sendonly" and e.kind == "video" and e.name in declared}

    def receive(self, client: Any, pc: Any, remote: Any, is_active) -> Any | None:
        """A coroutine reading `remote` into its slot, or None when it is not a declared input."""
        names = self._names.get(pc, {})
        mid = next((t.mid for t in pc.getTransceivers() if t.receiver.track is remote), None)
        name = names.get(mid)
        if name is None or remote.kind != "video":
            return None
        return self._read(client, name, remote, is_active)

    def min_interval(self, name: str) -> float:
        """Frames closer together than this are not converted (twice the slot's declared fps): a client
        publishing 60 fps to a 16 fps model costs no conversions it cannot use."""
        spec = getattr(self.inputs, "feeds", {}).get(name)
        fps = getattr(getattr(spec, "spec", None), "fps", None)
        return 1.0 / (2.0 * fps) if fps else 0.0

    async def _read(self, client: Any, name: str, remote: Any, is_active) -> None:
        warned = False
        gap, last = self.min_interval(name), 0.0
        while True:
            try:
                frame = await remote.recv()
            except Exception:  # noqa: BLE001 - MediaStreamError when it ends, CancelledError at close
                return
            arrived = time.perf_counter()
            if not is_active():
                self.metrics.inc("input_frames_total", track=name, result="not_in_session")
                continue
            if arrived - last < gap:
                self.metrics.inc("input_frames_total", track=name, result="over_rate")
                continue
            last = arrived
            try:
                h, w = self.inputs.size(name) or own_size(frame)
                big = frame.width * frame.height > 640 * 480 or h * w > 256 * 256
                yuv = await asyncio.to_thread(to_yuv420p, frame, h, w) if big else to_yuv420p(frame, h, w)
                self.inputs.feed(name, yuv, arrived)
            except Exception as exc:  # noqa: BLE001 - a bad frame is dropped; the track goes on
                self.metrics.inc("input_frames_total", track=name, result="rejected")
                if not warned:
                    warned = True
                    from . import protocol as P

                    client.send(P.error_message("bad_frame", f"a frame on track {name!r} was dropped: "
                                                f"{str(exc)[:160]}", track=name))
                continue
            self.metrics.inc("input_frames_total", track=name, result="used")
            await asyncio.sleep(0)

    def ended(self) -> None:
        """The session in progress ended: its frames must not reach the next one."""
        if self.inputs is not None:
            self.inputs.clear()

    def stats(self) -> dict:
        if self.inputs is None or not hasattr(self.inputs, "stats"):
            return {}
        return self.inputs.stats()
