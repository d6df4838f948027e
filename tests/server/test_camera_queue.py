"""The outgoing queue of a model that follows the client's camera: short (it is latency), but never shorter than
what plays while the next block is made, or the lossless producer starves the player every block."""
import asyncio
import threading
import time

import numpy as np
import pytest

from reactor_graph.server.media_in import just_in_time_frames
from reactor_graph.server.tracks import BlockVideoTrack


def test_just_in_time_frames_covers_one_block_with_a_margin():
    assert just_in_time_frames(None, 16, 2) == 2  # no block measured yet: the configured floor
    assert just_in_time_frames(0.01, 16, 2) == 2  # a fast model keeps the short queue
    assert just_in_time_frames(0.436, 16, 2) == 10  # StreamDiffusionV2 on the H200: 0.545 s of frames, + 1
    assert just_in_time_frames(30.0, 16, 2) == 64  # a stalled block does not make the queue unbounded
    assert just_in_time_frames(0.2, 0, 3) == 3


def stream(capacity_of, block_s: float, frames: int, fps: float, seconds: float) -> BlockVideoTrack:
    """A producer making a block of `frames` in `block_s` then pushing it (lossless, as the engine's thread does),
    a consumer taking frames on the track's clock for `seconds`; returns the track with its counters."""
    track = BlockVideoTrack(fps, 8, 8, policy="lossless", capacity=capacity_of(None), fmt="rgb24")
    stop = threading.Event()

    def produce():
        while not stop.is_set():
            time.sleep(block_s)  # making the block
            track.capacity = capacity_of(block_s)
            track.push(np.zeros((frames, 8, 8, 3), np.uint8))

    async def consume():
        while track.fresh == 0:
            await track.recv()
        track.repeats = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await track.recv()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        asyncio.run(consume())
    finally:
        stop.set()
        track.stop()
        producer.join(2)
    return track


@pytest.mark.slow
def test_a_queue_shorter_than_a_block_starves_the_player_and_the_just_in_time_one_does_not():
    fps, frames, block_s = 50.0, 10, 0.12  # a block plays 0.2 s and takes 0.12 s to make
    short = stream(lambda b: 2, block_s, frames, fps, 1.5)
    fitted = stream(lambda b: just_in_time_frames(b, fps, 2), block_s, frames, fps, 1.5)
    # with 2 frames queued the producer starts a block when 2 frames are left: 0.12 s of making, 0.04 s of
    # frames, so about a third of the clock's frames are repeats; fitted, the player always has a frame
    assert short.repeats > 0.2 * short.sent, short.counters()
    assert fitted.repeats < 0.05 * fitted.sent, fitted.counters()


def test_a_block_says_how_long_it_took_until_its_frames_were_on_the_host():
    """The queue is sized from `made_s`, not from `ready` (on a GPU `ready` is when the work was queued)."""
    import torch

    from reactor_graph.emit import HostCopier

    started = time.perf_counter() - 0.05
    block = HostCopier(torch.device("cpu")).emit(0, {"video": torch.zeros(3, 8, 8, 3, dtype=torch.uint8)},
                                                 {"format": "rgb24"}, started)
    assert block.on_host == 0.0  # nobody has looked at the frames yet
    made = block.made_s
    assert made >= 0.05 and block.on_host >= block.ready and block.made_s == made  # fixed once seen
