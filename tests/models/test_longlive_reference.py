"""LongLive / Self-Forcing inference semantics against an independent float64 reference of the official
pipelines (NVlabs/LongLive `causal_inference.py`, `interactive_causal_inference.py`; guandeh17/Self-Forcing).

What the reference encodes (read from the official code, written here independently):
  * RoPE positions are absolute frame indices: a block at frames [cur, cur + F) is rotated at cur.., and a
    cached key keeps the position it was written at (the roll moves it, never re-rotates it);
  * a block attends to the sink frames [0, S) and to the most recent W - S frames, itself included (W = the
    cache's frames, LongLive's local_attn_size);
  * the KV re-cache on a prompt switch (before the block at `cur`, global_sink on): while cur <= W every cached
    frame [0, cur) is re-encoded in ONE pass under the new prompt, all of them attending to each other (no
    causal mask); once the cache has rolled (cur > W) the sink keeps its keys/values from the old prompt and the
    W - S window frames are re-encoded in one pass attending to the kept sink and to each other.
"""
from __future__ import annotations

import pytest
import torch

from reactor_graph.models.wan_dit import BlockCausalWan, FlowMatchSchedule, KVCache

from .test_wan_dit import H_LAT, W_LAT, _ref_rope, block_noise, ref_dit, tiny_context, tiny_model

torch.set_num_threads(2)


class RefStream:
    """The official block loop in float64: per-frame history of each layer's (k pre-RoPE, v)."""

    def __init__(self, model, *, max_frames: int, fpb: int, sink: int, sched: FlowMatchSchedule):
        self.model, self.W, self.F, self.S, self.sched = model, max_frames, fpb, sink, sched
        self.hist: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.latents: dict[int, torch.Tensor] = {}
        self.tpf = (H_LAT // 2) * (W_LAT // 2)

    def _kv(self, frames: list[int]):
        if not frames:
            return None
        L = self.model.cfg.num_layers
        return [(torch.cat([self.hist[f][i][0] for f in frames], dim=1),
                 torch.cat([self.hist[f][i][1] for f in frames], dim=1), frames) for i in range(L)]

    def _store(self, frames: list[int], kv) -> None:
        n = self.tpf
        for j, f in enumerate(frames):
            self.hist[f] = [(k[:, j * n:(j + 1) * n], v[:, j * n:(j + 1) * n]) for k, v in kv]

    def context_frames(self, cur: int) -> list[int]:
        if cur + self.F <= self.W:
            return list(range(cur))
        return list(range(self.S)) + list(range(cur + self.F - self.W + self.S, cur))

    def recache(self, cur: int, ctx) -> None:
        if cur == 0:
            return
        if cur <= self.W:
            frames, kept = list(range(cur)), []
        else:
            frames, kept = list(range(cur - (self.W - self.S), cur)), list(range(self.S))
        x = torch.cat([self.latents[f] for f in frames], dim=2)
        _, kv = ref_dit(self.model, x, torch.zeros(1, len(frames)), ctx, frames, ctx_kv=self._kv(kept))
        self._store(frames, kv)

    def block(self, cur: int, noise: torch.Tensor, ctx) -> torch.Tensor:
        sched, F = self.sched, self.F
        ctx_kv = self._kv(self.context_frames(cur))
        pos = list(range(cur, cur + F))
        x = noise[0].double()
        for i in range(sched.num_steps):
            flow, _ = ref_dit(self.model, x, torch.full((1, F), sched.timesteps[i]), ctx, pos, ctx_kv=ctx_kv)
            x0 = x - sched.sigmas[i] * flow
            if i + 1 < sched.num_steps:
                s = sched.sigmas[i + 1]
                x = (1 - s) * x0 + s * noise[i + 1].double()
        _, kv = ref_dit(self.model, x0, torch.zeros(1, F), ctx, pos, ctx_kv=ctx_kv)
        self._store(pos, kv)
        for j, f in enumerate(pos):
            self.latents[f] = x0[:, :, j:j + 1].float()
        return x0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def stream(sink: int, blocks: int, switch_at: int | None = None, *, fpb=2, max_frames=6, seed=3):
    """Module and reference side by side; returns per-block relative errors."""
    model = tiny_model(seed)
    cfg = model.cfg
    ctx_a, ctx_b = tiny_context(cfg, seed + 1), tiny_context(cfg, seed + 2)
    sched = FlowMatchSchedule()
    cache = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=max_frames, frames_per_block=fpb,
                    sink_frames=sink, rolling=True, dtype=torch.float32)
    gen = BlockCausalWan(model, cache, sched)
    ref = RefStream(model, max_frames=max_frames, fpb=fpb, sink=sink, sched=sched)
    noise = block_noise(sched.num_steps, fpb, blocks, seed=seed + 10)
    errs = []
    for b in range(blocks):
        ctx = ctx_b if switch_at is not None and b >= switch_at else ctx_a
        switch = b == switch_at
        if switch:
            ref.recache(b * fpb, ctx)
        want = ref.block(b * fpb, noise[b], ctx)
        got = gen.generate_block(noise[b], ctx, gen.phase_for_block(b), recache=switch)
        errs.append(rel(got, want))
    return errs


@pytest.mark.parametrize("sink", [pytest.param(0, marks=pytest.mark.slow), 2])  # 0: Self-Forcing's case
def test_rolling_matches_the_official_loop_over_12_rolled_blocks(sink):
    errs = stream(sink, blocks=3 + 12)
    assert max(errs) < 1e-5, [f"{e:.1e}" for e in errs]


@pytest.mark.parametrize("switch_at", [2, 3, 6])  # filling (cur 4 < W), first roll (cur = W), rolled (cur > W)
def test_recache_after_a_switch_matches_the_official_one_pass(switch_at):
    errs = stream(2, blocks=switch_at + 3, switch_at=switch_at)
    assert max(errs) < 1e-5, [f"{e:.1e}" for e in errs]


def test_recache_without_sink_rolled():
    errs = stream(0, blocks=8, switch_at=5)
    assert max(errs) < 1e-5, [f"{e:.1e}" for e in errs]


# ------------------------------------------------------------------------------------ long-stream precision


def _layer0_key_ref(model, x0: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """The first layer's RoPE'd keys of a block in float64 (they depend on the block alone)."""
    _, kv = ref_dit(model, x0, torch.zeros(1, x0.shape[2]), tiny_context(model.cfg), frames)
    return _ref_rope(kv[0][0], frames, H_LAT // 2, W_LAT // 2, model.cfg)


def test_cached_keys_are_rounded_once_over_50_rolls():
    """bf16 cache, 50 rolls: every cached key is its float64 value rounded once (moves are exact copies), so
    the error of the oldest key in the window equals that of the newest and does not grow with the stream."""
    model = tiny_model(5)
    cfg = model.cfg
    fpb, W, S = 2, 16, 2
    cache = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=W, frames_per_block=fpb,
                    sink_frames=S, rolling=True, dtype=torch.bfloat16)
    gen = BlockCausalWan(model, cache)
    gen.set_context(tiny_context(cfg))
    g = torch.Generator().manual_seed(0)
    n = cache.tokens_per_frame
    want: dict[int, torch.Tensor] = {}
    blocks = W // fpb + 50
    worst = {}
    for b in range(blocks):
        ph = gen.phase_for_block(b)
        x0 = torch.randn(1, 16, fpb, H_LAT, W_LAT, generator=g)
        if ph.roll:
            before = cache.kv[:, :, :, (S + fpb) * n:].clone()
            cache.roll_()
            assert torch.equal(cache.kv[:, :, :, S * n:(W - fpb) * n], before)  # moved, not re-rounded
        gen.write_cache(x0, ph)
        frames = list(range(b * fpb, (b + 1) * fpb))
        k = _layer0_key_ref(model, x0, frames)
        for j, f in enumerate(frames):
            want[f] = k[:, j * n:(j + 1) * n]
        if b in (W // fpb + 5, blocks - 1):  # after 6 and after 50 rolls
            held = list(range(S)) + list(range((b + 1) * fpb - (W - S), (b + 1) * fpb))
            errs = [rel(cache.kv[0, 0, :, s * n:(s + 1) * n], want[f]) for s, f in enumerate(held)]
            worst[b] = max(errs)
            assert max(errs) < 4e-3, [f"{e:.1e}" for e in errs]
    first, last = worst.values()
    assert last < 1.5 * first, worst


def test_rolled_recache_keeps_the_sink_and_unrolled_rewrites_it():
    """The sink's selection is on the device: one program for the first rolled block (sink re-encoded, as
    LongLive when its re-cache starts at frame 0) and for the later ones (sink kept)."""
    model = tiny_model(4)
    cfg = model.cfg
    ctx_a, ctx_b = tiny_context(cfg, 5), tiny_context(cfg, 6)
    fpb, W, S = 2, 6, 2
    cache = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=W, frames_per_block=fpb,
                    sink_frames=S, dtype=torch.float32)
    gen = BlockCausalWan(model, cache)
    noise = block_noise(4, fpb, 6, seed=7)
    sink = S * cache.tokens_per_frame
    for b in range(5):
        ph = gen.phase_for_block(b)
        gen.generate_block(noise[b], ctx_a, ph)
        if b == 2:  # full, not rolled yet: the next block's re-cache starts at frame 0 and rewrites the sink
            old = cache.kv[:, :, :, :sink].clone()
            gen.set_context(ctx_b)
            gen.recache(gen.phase_for_block(3))
            assert (cache.kv[:, :, :, :sink] - old).abs().max() > 1e-2
    assert cache.frame_offset.item() == 2 * fpb
    old, lat = cache.kv.clone(), cache.latents.clone()
    gen.set_context(ctx_b)
    gen.recache(gen.phase_for_block(5))
    assert torch.equal(cache.kv[:, :, :, :sink], old[:, :, :, :sink]) and torch.equal(cache.latents, lat)
    assert (cache.kv[:, :, :, sink:] - old[:, :, :, sink:]).abs().max() > 1e-2
