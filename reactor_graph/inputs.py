"""The input side: video and image slots, the latest-frame buffer, and a bounded image decoder.

A `video` slot is fed by a client's published track. Frames arrive on the server's thread already resized
to the slot's size (yuv420p, see server/media_in.py) and go into a small bounded buffer that keeps only the
newest few (read mode *latest*: a slow model never builds a backlog, a fast one repeats the last frame). At
each block boundary the engine calls `InputFeeds.sync`, which converts the newest frame(s) into the slot's
device tensor (yuv420p -> RGB on the device: the Triton kernel on CUDA) and bumps the slot's version only
when something new arrived. The tensor keeps its address, shape and dtype, so a compiled or captured hot
path sees the new frame as a copy into its static buffer: no recompile, no recapture.

An `image` slot holds a still picture, written by a command param of type `image` (an uploaded file or a
base64 string, decoded here with size and pixel limits). An image written to a video slot becomes the still
it shows while no camera is live.

Slot values of both kinds: `[T, 3, H, W]` (T = `frames`, 1 for images), values in [-1, 1], the engine's
compute dtype, on its device (the CPU float32 form between a write and the next boundary).
"""
from __future__ import annotations

import base64
import binascii
import io
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BeforeValidator, WithJsonSchema
from typing_extensions import Annotated

MEDIA_TYPES = ("video", "image")
COLOURS = {"black": (-1.0, -1.0, -1.0), "grey": (0.0, 0.0, 0.0), "gray": (0.0, 0.0, 0.0),
           "white": (1.0, 1.0, 1.0)}

MAX_IMAGE_BYTES = 10 * 1024 * 1024  # an uploaded or base64 image, encoded
MAX_IMAGE_PIXELS = 4096 * 4096  # checked from the header, before anything is decoded
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF",
               "image/bmp": "BMP"}
STALE_SECONDS = 1.0  # no frame for this long: the slot shows its default again
BUFFER_FRAMES = 4  # newest frames kept per track (at least the slot's `frames`, which a block reads at once)


class ImageError(ValueError):
    """A file or string that is not an acceptable image; the message is for the client."""


@dataclass(frozen=True)
class Picture:
    """A decoded image: RGB uint8 [H, W, 3], and where it came from (for messages)."""

    rgb: np.ndarray
    source: str = "image"

    def __repr__(self) -> str:  # never dump pixels into a message or a log
        return f"<Picture {self.rgb.shape[1]}x{self.rgb.shape[0]} from {self.source}>"


def decode_image(data: bytes, source: str = "image", max_bytes: int = MAX_IMAGE_BYTES,
                 max_pixels: int = MAX_IMAGE_PIXELS, fit: tuple[int, int] | None = None) -> Picture:
    """Bytes -> Picture, refusing what is too big, not an image, or a decompression bomb (the pixel count is
    read from the header and checked before the pixels are decoded). `fit` (H, W): JPEGs decode at a reduced
    scale when that is still at least this big."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise ImageError(f"{source} is {len(data)} bytes; at most {max_bytes} are accepted")
    if not data:
        raise ImageError(f"{source} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=list(dict.fromkeys(IMAGE_TYPES.values()))) as im:
            w, h = im.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                raise ImageError(f"{source} is {w}x{h} pixels; at most {max_pixels} pixels are accepted")
            if fit is not None and im.format == "JPEG":
                im.draft("RGB", (fit[1], fit[0]))  # decode at 1/2, 1/4, 1/8 scale where that is enough
            im.seek(0)  # the first frame of an animation
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{source} has too many pixels; at most {max_pixels} are accepted") from None
    except UnidentifiedImageError:
        raise ImageError(f"{source} is not a PNG, JPEG, WebP, GIF or BMP image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{source} could not be decoded as an image ({str(exc)[:80]})") from None
    return Picture(rgb, source)


def decode_base64_image(text: str, max_bytes: int = MAX_IMAGE_BYTES) -> Picture:
    """A base64 string (optionally a data: URL) -> Picture."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ImageError("a data: URL image must be base64-encoded")
    if len(text) > (max_bytes * 4) // 3 + 8:
        raise ImageError(f"the base64 image is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("not a base64-encoded image") from None
    return decode_image(data, "the base64 image", max_bytes)


def check_media_spec(spec: Any) -> Any:
    """SlotSpec rules for video/image slots (and that other slots do not use their keys)."""
    if spec.type not in MEDIA_TYPES:
        extra = [k for k in ("size", "fps", "frames") if getattr(spec, k) is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} apply to video and image slots only")
        return spec
    if spec.size is None:
        raise ValueError(f"a {spec.type} slot needs 'size: [height, width]'")
    h, w = spec.size
    if h <= 0 or w <= 0 or h % 2 or w % 2 or h * w > MAX_IMAGE_PIXELS:
        raise ValueError(f"size must be even, positive and at most {MAX_IMAGE_PIXELS} pixels, got {h}x{w}")
    if spec.type == "image" and (spec.fps is not None or spec.frames is not None):
        raise ValueError("fps and frames apply to video slots")
    if spec.shape is not None:
        raise ValueError("a video/image slot's shape follows from size (and frames)")
    if spec.default is None:
        spec.default = "black"
    return spec


# -- slot values (CPU float32 [T, 3, H, W] in [-1, 1]) --------------------------------------------------------

def slot_shape(spec: Any) -> tuple[int, int, int, int]:
    h, w = spec.size
    return (int(spec.frames or 1) if spec.type == "video" else 1, 3, int(h), int(w))


def picture_tensor(pic: Picture, h: int, w: int) -> torch.Tensor:
    """[3, h, w] float in [-1, 1]: scaled to cover h x w and centre-cropped (the aspect ratio is kept)."""
    from PIL import Image

    src = Image.fromarray(pic.rgb)
    sw, sh = src.size
    scale = max(w / sw, h / sh)
    cw, ch = max(w, round(sw * scale)), max(h, round(sh * scale))
    src = src.resize((cw, ch), Image.BILINEAR)
    left, top = (cw - w) // 2, (ch - h) // 2
    arr = np.asarray(src.crop((left, top, left + w, top + h)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def media_value(spec: Any, value: Any) -> torch.Tensor:
    """What a video/image slot holds for a written value: a colour name, a Picture, or a tensor."""
    shape = slot_shape(spec)
    if value is None:
        value = "black"
    if isinstance(value, str):
        rgb = COLOURS.get(value.lower())
        if rgb is None:
            raise ValueError(f"a {spec.type} slot's default is one of {', '.join(COLOURS)}, got {value[:40]!r}")
        return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(shape).contiguous()
    if isinstance(value, Picture):
        return picture_tensor(value, shape[2], shape[3]).unsqueeze(0).expand(shape).contiguous()
    if isinstance(value, torch.Tensor):
        t = value.detach().float().cpu()
        if tuple(t.shape) == shape[1:]:
            t = t.unsqueeze(0)
        if tuple(t.shape) != shape:
            raise ValueError(f"expected a [{', '.join(map(str, shape))}] picture, got {list(t.shape)}")
        return t.contiguous()
    raise ValueError(f"a {spec.type} slot takes an image, got {type(value).__name__}")


def image_param(value: Any) -> Picture:
    """A command param of type `image`: an upload the server resolved, or a base64 string."""
    if isinstance(value, Picture):
        return value
    if isinstance(value, str):
        return decode_base64_image(value)
    raise ValueError("an image parameter takes an uploaded file (the SDK's FileRef) or a base64 string")


IMAGE_PARAM = Annotated[Any, BeforeValidator(image_param), WithJsonSchema({
    "type": "string", "format": "image", "contentMediaType": "image/*",
    "description": "an uploaded image (reactor.uploadFile -> FileRef) or a base64 PNG/JPEG/WebP"})]


MAX_INBOUND_PIXELS = 4096 * 2160  # a decoded frame larger than 4K is refused (the codec would allow more)


def to_yuv420p(frame: Any, h: int, w: int) -> np.ndarray:
    """An av.VideoFrame -> yuv420p [h*3//2, w] uint8: scaled to cover h x w, centre-cropped."""
    fw, fh = frame.width, frame.height
    if fw <= 0 or fh <= 0 or fw * fh > MAX_INBOUND_PIXELS:
        raise ValueError(f"a {fw}x{fh} frame is outside what this server takes (at most {MAX_INBOUND_PIXELS} pixels)")
    scale = max(w / fw, h / fh)
    sw, sh = max(w, 2 * round(fw * scale / 2)), max(h, 2 * round(fh * scale / 2))
    if (sw, sh) == (w, h) and frame.format.name == "yuv420p" and (fw, fh) == (w, h):
        scaled = frame
    else:
        scaled = frame.reformat(width=sw, height=sh, format="yuv420p", interpolation="BILINEAR")
    planes = scaled.to_ndarray()  # [sh*3//2, sw], planes packed
    if (sw, sh) == (w, h):
        return np.ascontiguousarray(planes)
    top, left = ((sh - h) // 2) & ~1, ((sw - w) // 2) & ~1
    y = planes[:sh].reshape(sh, sw)[top:top + h, left:left + w]
    chroma = planes[sh:].reshape(-1)
    q = (sh // 2) * (sw // 2)
    u = chroma[:q].reshape(sh // 2, sw // 2)[top // 2:(top + h) // 2, left // 2:(left + w) // 2]
    v = chroma[q:2 * q].reshape(sh // 2, sw // 2)[top // 2:(top + h) // 2, left // 2:(left + w) // 2]
    return np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(h * 3 // 2, w)


class ClipFeed:
    """`render --input NAME=clip.mp4`: a video file feeds a video slot in video time (headless, no clock):
    before each block, the clip's frames up to that block's time go into the slot's buffer. The clip loops."""

    def __init__(self, inputs: InputFeeds, name: str, path: str):
        import av

        if name not in inputs.feeds:
            known = ", ".join(inputs.feeds) or "none"
            raise ValueError(f"--input {name}=...: the graph has no video slot '{name}' (video slots: {known})")
        self.inputs, self.name, self.path = inputs, name, path
        try:
            self._container = av.open(path)
            self._stream = self._container.streams.video[0]
        except (av.error.FFmpegError, IndexError, OSError) as exc:
            raise ValueError(f"--input {name}={path}: not a readable video file ({exc})") from None
        self._frames = self._decode()
        self._offset = 0.0  # seconds added per loop
        self._next: tuple[float, Any] | None = None
        self._last = 0.0
        self.fed = 0

    def _decode(self):
        yield from self._container.decode(self._stream)

    def _pull(self) -> tuple[float, Any] | None:
        for _ in range(2):
            try:
                frame = next(self._frames)
                t = float(frame.time) if frame.time is not None else self.fed / 30.0
                return self._offset + t, frame
            except StopIteration:
                if self.fed == 0:
                    return None
                rate = self._stream.average_rate or self._stream.guessed_rate or 30
                self._offset += self._last + 1.0 / float(rate)  # loop: the clip starts again after its last frame
                self._container.seek(0)
                self._frames = self._decode()
        return None

    def advance(self, seconds: float) -> None:
        """Feed every frame whose time is <= `seconds` (the newest is what the next block reads)."""
        h, w = self.inputs.size(self.name)
        while True:
            if self._next is None:
                self._next = self._pull()
                if self._next is None:
                    return
            t, frame = self._next
            if t > seconds and self.fed:
                return
            self._last = t - self._offset
            self.inputs.feed(self.name, to_yuv420p(frame, h, w))
            self.fed += 1
            self._next = None

    def close(self) -> None:
        self._container.close()


# -- the latest-frame buffer ----------------------------------------------------------------------------------

@dataclass
class Frame:
    yuv: np.ndarray  # [H*3//2, W] uint8, yuv420p at the slot's size
    arrived: float  # time.perf_counter() when it reached the server (decoded)
    seq: int


class LatestFrames:
    """The newest `capacity` frames of one track; `put` from the server's thread, `newest` from the engine."""

    def __init__(self, capacity: int = BUFFER_FRAMES):
        self._frames: deque[Frame] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._seq = 0
        self.received = 0

    def put(self, yuv: np.ndarray, arrived: float | None = None) -> None:
        with self._lock:
            self._seq += 1
            self._frames.append(Frame(yuv, time.perf_counter() if arrived is None else arrived, self._seq))
            self.received += 1

    def newest(self, n: int = 1) -> list[Frame]:
        with self._lock:
            return list(self._frames)[-n:]

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()


@dataclass
class VideoFeed:
    name: str
    spec: Any
    buffer: LatestFrames = field(default_factory=LatestFrames)
    buf: torch.Tensor | None = None  # the slot's device tensor [T, 3, H, W]
    staging: torch.Tensor | None = None  # host [T, H*3//2, W] uint8 (pinned on CUDA)
    dev_yuv: torch.Tensor | None = None
    copied: Any = None  # CUDA event of the last staging -> device copy
    seen_version: int | None = None  # the slot version this feed last wrote
    fallback: torch.Tensor | None = None  # CPU value shown while no camera is live (default, or a still)
    used_seq: int = 0
    live: bool = False
    used: int = 0  # blocks that read a new camera frame
    skipped: int = 0  # frames a newer one replaced before any block read them (read mode latest)
    latency: deque = field(default_factory=lambda: deque(maxlen=256))  # frame arrival -> block start, s


class InputFeeds:
    """Every video slot of a graph and its buffer. The engine owns one (`engine.inputs`); the server feeds it."""

    def __init__(self, slots: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 stale_seconds: float = STALE_SECONDS):
        self.device, self.dtype, self.stale_seconds = device, dtype, stale_seconds
        self.feeds = {n: VideoFeed(n, s, LatestFrames(max(BUFFER_FRAMES, slot_shape(s)[0])))
                      for n, s in slots.items() if s.type == "video"}
        self.images = [n for n, s in slots.items() if s.type == "image"]
        self._image_bufs: dict[str, tuple[int, torch.Tensor]] = {}

    # -- the server's side (any thread) ---------------------------------------------------------------------
    def tracks(self) -> list[str]:
        return list(self.feeds)

    def size(self, name: str) -> tuple[int, int]:
        h, w = self.feeds[name].spec.size
        return int(h), int(w)

    def feed(self, name: str, yuv: np.ndarray, arrived: float | None = None) -> None:
        f = self.feeds[name]
        h, w = self.size(name)
        if yuv.dtype != np.uint8 or yuv.shape != (h * 3 // 2, w):
            raise ValueError(f"track {name!r} takes yuv420p [{h * 3 // 2}, {w}] uint8, got {yuv.dtype}{list(yuv.shape)}")
        f.buffer.put(yuv, arrived)

    def clear(self) -> None:
        """A session ended (or its client stopped publishing for good): back to defaults at the next sync."""
        for f in self.feeds.values():
            f.buffer.clear()

    def stats(self) -> dict[str, dict]:
        out = {}
        for n, f in self.feeds.items():
            lat = sorted(f.latency)
            out[n] = {"state": "camera" if f.live else "default", "received": f.buffer.received,
                      "used": f.used, "skipped": f.skipped,
                      "latency_ms_p50": round(lat[len(lat) // 2] * 1000, 2) if lat else None}
        return out

    # -- the engine's side (its thread, at block boundaries) ---------------------------------------------------
    def sync(self, slots: Any, now: float | None = None) -> None:
        """Put the newest camera frame (or the default/still) into each video slot's device tensor; bump the
        version only when it changed. Image slots written since the last sync move to the device."""
        now = time.perf_counter() if now is None else now
        for name, f in self.feeds.items():
            self._sync_video(slots, f, now)
        for name in self.images:
            version = slots.versions[name]
            held = self._image_bufs.get(name)
            if held is None or held[0] != version:
                value = slots.values[name]
                buf = held[1] if held is not None else torch.empty(value.shape, device=self.device, dtype=self.dtype)
                if value is not buf:
                    buf.copy_(value)
                slots.values[name] = buf
                self._image_bufs[name] = (version, buf)

    def _sync_video(self, slots: Any, f: VideoFeed, now: float) -> None:
        name = f.name
        t, _, h, w = slot_shape(f.spec)
        if f.buf is None:
            f.buf = torch.empty((t, 3, h, w), device=self.device, dtype=self.dtype)
            pin = self.device.type == "cuda"
            f.staging = torch.empty((t, h * 3 // 2, w), dtype=torch.uint8, pin_memory=pin)
            f.dev_yuv = torch.empty((t, h * 3 // 2, w), dtype=torch.uint8, device=self.device)
        written = slots.versions[name] != f.seen_version
        if written and slots.values[name] is not f.buf:  # a reset, a session start, or a command's still
            f.fallback = slots.values[name]
        frames = f.buffer.newest(t)
        live = bool(frames) and now - frames[-1].arrived <= self.stale_seconds
        if live:
            changed = frames[-1].seq != f.used_seq or written or not f.live
            if changed:
                self._upload(f, frames)
                f.skipped += max(0, frames[-1].seq - f.used_seq - len(frames)) if f.used_seq else 0
                f.used_seq = frames[-1].seq
                f.used += 1
                f.latency.append(now - frames[-1].arrived)
        else:
            changed = f.live or written or slots.values[name] is not f.buf
            if changed:
                f.buf.copy_(f.fallback if f.fallback is not None else media_value(f.spec, None))
        f.live = live
        if changed:
            slots.values[name] = f.buf
            slots.versions[name] = slots.versions.get(name, 0) + 1
            f.seen_version = slots.versions[name]

    def _upload(self, f: VideoFeed, frames: list[Frame]) -> None:
        from reactor_graph.kernels import colour

        t = f.staging.shape[0]
        if f.copied is not None:
            f.copied.synchronize()  # the previous copy out of the staging buffer has finished
        frames = [frames[0]] * (t - len(frames)) + frames  # fewer than T so far: repeat the oldest
        for i, fr in enumerate(frames):
            f.staging[i].copy_(torch.from_numpy(fr.yuv))
        f.dev_yuv.copy_(f.staging, non_blocking=True)
        if self.device.type == "cuda":
            f.copied = torch.cuda.Event()
            f.copied.record()
        colour.yuv420p_to_rgb(f.dev_yuv, out_dtype=self.dtype, out=f.buf)


def input_stats(host: Any) -> dict:
    inputs = getattr(host, "inputs", None)
    return inputs.stats() if inputs is not None and hasattr(inputs, "stats") else {}
