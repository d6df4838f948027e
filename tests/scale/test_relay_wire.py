"""The relay's messages (reactor_graph/scale/relay_wire.py): blocks survive the trip, anything else is refused."""
from __future__ import annotations

import numpy as np
import pytest

from reactor_graph.scale import relay_wire as W


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("fmt,shape", [("yuv420p", (3, 27, 14)), ("rgb24", (2, 18, 14, 3)), ("nv12", (1, 27, 14))])
def test_a_block_comes_back_as_it_left(fmt, shape, compress):
    frames = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    header, payload = W.unpack(W.pack_block(frames, fmt, 7, 0.25, compress))
    assert header["k"] == "block" and header["index"] == 7 and header["made_s"] == 0.25
    back = W.unpack_block(header, payload, height=18, width=14)
    assert back.shape == frames.shape and np.array_equal(back, frames)


def test_blocks_that_do_not_fit_this_replica_are_refused():
    frames = np.zeros((2, 27, 14), np.uint8)
    header, payload = W.unpack(W.pack_block(frames, "yuv420p", 0, 0.0))
    with pytest.raises(W.WireError, match="serves"):
        W.unpack_block(header, payload, height=20, width=14)  # another frame size
    with pytest.raises(W.WireError, match="bytes"):
        W.unpack_block(header, payload[:-1], height=18, width=14)  # a short payload
    with pytest.raises(W.WireError, match="format"):
        W.unpack_block({**header, "format": "gray"}, payload, height=18, width=14)
    z_header, z_payload = W.unpack(W.pack_block(np.zeros((4, 27, 14), np.uint8), "yuv420p", 0, 0.0, True))
    with pytest.raises(W.WireError):  # a compressed payload that inflates past its declared shape
        W.unpack_block({**z_header, "shape": [2, 27, 14]}, z_payload, height=18, width=14)


@pytest.mark.parametrize("data", [b"", b"\x00\x00", (10_000).to_bytes(4, "big") + b"{}", (2).to_bytes(4, "big") + b"[]",
                                  (4).to_bytes(4, "big") + b"nope"])
def test_malformed_messages_are_refused(data):
    with pytest.raises(W.WireError):
        W.unpack(data)
