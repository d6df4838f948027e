"""What a relay between two replicas carries (relay.py), as websocket messages.

Text messages are the client's data-channel messages (host -> engine) and the messages for the client
(engine -> host), as they are. Binary messages are `[4-byte big-endian header length][JSON header][payload]`:
blocks of frames (engine -> host: uint8 frames `[T, ...]` as the engine's emit made them, raw or zlib'd),
and the relay's own control (`started`, `refused`, `ack`, `upload`, `end`).

Raw is the default: a block is one memcpy on the engine's thread, and generated video barely compresses
(measure.py's `relay_codec` measures both on this machine).
"""
from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np

FORMATS = ("yuv420p", "nv12", "rgb24")
MAX_HEADER = 4096
MAX_BLOCK_BYTES = 256 * 1024 * 1024  # a block of 1080p frames is ~50 MB; anything past this is not a block


class WireError(ValueError):
    pass


def pack(header: dict, payload: bytes | memoryview = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return len(head).to_bytes(4, "big") + head + bytes(payload)


def unpack(data: bytes) -> tuple[dict, memoryview]:
    if len(data) < 4:
        raise WireError("a relay message shorter than its header")
    n = int.from_bytes(data[:4], "big")
    if n > MAX_HEADER or 4 + n > len(data):
        raise WireError("a relay header of a bad length")
    try:
        header = json.loads(data[4:4 + n])
    except ValueError:
        raise WireError("a relay header that is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("k"), str):
        raise WireError("a relay header without its kind")
    return header, memoryview(data)[4 + n:]


def pack_block(frames: np.ndarray, fmt: str, index: int, made_s: float, compress: bool = False) -> bytes:
    """frames: uint8 [T, H*3/2, W] (yuv420p, nv12) or [T, H, W, 3] (rgb24)."""
    raw = np.ascontiguousarray(frames, dtype=np.uint8).data
    payload = zlib.compress(raw, 1) if compress else raw
    return pack({"k": "block", "format": fmt, "shape": list(frames.shape), "index": int(index),
                 "made_s": round(float(made_s), 6), "z": bool(compress)}, payload)


def unpack_block(header: dict, payload: memoryview, height: int, width: int) -> np.ndarray:
    """The frames of a block header + payload, checked against the frame size both replicas serve."""
    fmt, shape = header.get("format"), header.get("shape")
    if fmt not in FORMATS or not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise WireError("a block of an unknown format or shape")
    frame = [height, width, 3] if fmt == "rgb24" else [height * 3 // 2, width]
    if shape[1:] != frame or len(shape) != len(frame) + 1 or shape[0] > 1024:
        raise WireError(f"a block of shape {shape[:5]}; this replica serves {frame} frames")
    size = int(np.prod(shape))
    if header.get("z"):
        d = zlib.decompressobj()
        raw: Any = d.decompress(payload, size + 1)
        if d.unconsumed_tail:
            raise WireError("a compressed block larger than its shape")
    else:
        raw = payload
    if len(raw) != size or size > MAX_BLOCK_BYTES:
        raise WireError(f"a block of {len(raw)} bytes for shape {shape}")
    return np.frombuffer(raw, np.uint8).reshape(shape)
