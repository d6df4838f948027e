"""BlockVideoTrack pacing: an absolute clock (no drift), repeats when starved, the two queue policies."""
import asyncio
import threading
import time

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from reactor_graph.server.tracks import BlockVideoTrack, blank

H, W = 8, 16


class FakeClock:
    def __init__(self):
        self.t = 100.0
        self.sleeps = []

    def __call__(self):
        return self.t

    async def sleep(self, dt):
        self.sleeps.append(dt)
        self.t += dt


def frames(n, start=0):
    """n yuv420p frames whose Y plane is filled with their index (mod 256)."""
    out = np.zeros((n, H * 3 // 2, W), np.uint8)
    for i in range(n):
        out[i] = (start + i) % 256
    return out


def track(clock, **kw):
    kw.setdefault("policy", "latest")
    return BlockVideoTrack(16, H, W, clock=clock, sleep=clock.sleep, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def y(frame):
    return int(frame.to_ndarray(format="yuv420p")[0, 0])


def test_frame_k_at_t0_plus_k_over_fps_with_exact_pts():
    clock = FakeClock()
    t = track(clock, capacity=1000)
    t.push(frames(200))

    async def main():
        out = []
        for k in range(200):
            f = await t.recv()
            out.append((clock(), f))
            clock.t += 0.0123 if k % 3 else 0.0  # the encoder's own time between calls must not shift the clock
        return out

    out = run(main())
    t0 = out[0][0]
    for k, (when, f) in enumerate(out):
        assert f.pts == k * 5625  # 90000 / 16
        assert f.time_base.denominator == 90000
        assert when == pytest.approx(t0 + k / 16, abs=0.0131)  # never early, late only by the encoder's time
        assert when >= t0 + k / 16 - 1e-9
        assert y(f) == k % 256
    assert t.fresh == 200 and t.repeats == 0 and t.drops == 0 and t.skipped == 0


def test_fractional_fps_pts_do_not_accumulate_rounding():
    t = BlockVideoTrack(29.97, H, W)
    assert t.pts(0) == 0
    assert t.pts(2997) == 9000000  # exactly 100 s, whatever rounding happened on the way
    assert all(t.pts(k + 1) - t.pts(k) in (3003, 3004) for k in range(1000))


def test_starved_track_repeats_the_last_frame():
    clock = FakeClock()
    t = track(clock)
    t.push(frames(2, start=7))

    async def main():
        return [await t.recv() for _ in range(6)]

    out = run(main())
    assert [y(f) for f in out] == [7, 8, 8, 8, 8, 8]
    assert [f.pts for f in out] == [k * 5625 for k in range(6)]
    assert t.fresh == 2 and t.repeats == 4 and t.sent == 6


def test_idle_track_sends_slow_black_frames_until_the_first_block():
    clock = FakeClock()
    t = track(clock, idle_fps=2)  # 16 fps / 2 -> every 8th clock slot

    async def main():
        return [await t.recv() for _ in range(3)]

    out = run(main())
    assert [f.pts for f in out] == [0, 8 * 5625, 16 * 5625]
    assert all(y(f) == 16 for f in out)  # limited-range black
    assert t.idle == 3
    t.push(frames(1, start=99))
    f = run(t.recv())
    assert y(f) == 99 and f.pts == 24 * 5625


def test_latest_drops_the_oldest_when_full():
    clock = FakeClock()
    t = track(clock, capacity=4)
    assert t.push(frames(10)) == 10
    assert t.drops == 6 and t.depth == 4

    async def main():
        return [y(await t.recv()) for _ in range(4)]

    assert run(main()) == [6, 7, 8, 9]


def test_lossless_makes_the_producer_wait_and_loses_nothing():
    clock = FakeClock()
    t = track(clock, capacity=3, policy="lossless")
    done = threading.Event()

    def produce():
        for b in range(5):
            t.push(frames(4, start=4 * b))
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.1)
    assert not done.is_set() and t.depth == 3  # waiting for room

    async def main():
        out = []
        while len(out) < 20:
            if t.depth == 0:
                await asyncio.sleep(0.005)  # let the producer thread refill
                continue
            out.append(y(await t.recv()))
        return out

    assert run(main()) == list(range(20))
    assert done.wait(5) and t.drops == 0 and t.repeats == 0


def test_lossless_producer_is_released_at_session_end():
    t = BlockVideoTrack(16, H, W, policy="lossless", capacity=2)
    result = {}

    def produce():
        result["queued"] = t.push(frames(10))  # nobody consumes: blocks after 2

    th = threading.Thread(target=produce, daemon=True)
    th.start()
    time.sleep(0.1)
    assert th.is_alive()
    t.close_producer()
    th.join(2)
    assert not th.is_alive() and result["queued"] == 2
    assert t.push(frames(3)) == 0  # later pushes are refused at once


def test_a_stalled_sender_rejoins_the_clock_instead_of_bursting():
    clock = FakeClock()
    t = track(clock, capacity=100)
    t.push(frames(100))

    async def main():
        first = await t.recv()
        clock.t += 2.0  # the loop stalled for 2 s
        second = await t.recv()
        return first, second

    first, second = run(main())
    assert first.pts == 0
    assert second.pts == 32 * 5625  # the slot that is due now, not slot 1
    assert t.skipped == 31


def test_stopped_track_raises_and_releases_the_producer():
    t = BlockVideoTrack(16, H, W, policy="lossless", capacity=1)
    t.push(frames(1))
    t.stop()
    assert t.readyState == "ended" and t.producer_closed
    with pytest.raises(MediaStreamError):
        run(t.recv())


def test_real_clock_pacing():
    t = BlockVideoTrack(50, H, W, policy="latest", capacity=64)
    t.push(frames(20))

    async def main():
        t0 = time.monotonic()
        for _ in range(11):
            await t.recv()
        return time.monotonic() - t0

    elapsed = run(main())
    assert 0.18 <= elapsed < 0.6  # frame 10 is due 0.2 s after frame 0


def test_blank_frames():
    b = blank("yuv420p", 4, 6)
    assert b.shape == (6, 6) and (b[:4] == 16).all() and (b[4:] == 128).all()
    assert blank("rgb24", 4, 6).shape == (4, 6, 3)


def test_push_block_copies_out_of_the_reused_buffer():
    import torch

    from reactor_graph.emit import Block

    buf = torch.full((2, H * 3 // 2, W), 50, dtype=torch.uint8)
    block = Block(index=0, format="yuv420p", frames=2, height=H, width=W, started=0.0, ready=1.0, _host=buf)
    t = BlockVideoTrack(16, H, W, policy="latest", capacity=8)
    assert t.push_block(block) == 2
    buf.fill_(200)  # the ring buffer is reused for a later block
    clock_frame = run(t.recv())
    assert y(clock_frame) == 50


def test_bad_settings():
    with pytest.raises(ValueError):
        BlockVideoTrack(16, H, W, policy="newest")
    with pytest.raises(ValueError):
        BlockVideoTrack(0, H, W)
