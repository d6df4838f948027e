"""Wan2.1 block-causal DiT: cache vs explicit-mask reference, names/size, checkpoints, schedule (rolling and the
re-cache against the official loops: test_longlive_reference.py).

The references below are written independently of the module: float64, plain tensor ops on the
parameters, Wan's complex-number RoPE, explicit softmax attention with an explicit mask / explicit context.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reactor_graph.models.wan_dit import (
    BlockCausalWan,
    FlowMatchSchedule,
    KVCache,
    WanConfig,
    WanDiT,
    init_random_,
    load_wan_state_dict,
)

torch.set_num_threads(2)

H_LAT, W_LAT = 4, 6  # latent H, W -> a 2 x 3 patch grid, 6 tokens per frame


# ------------------------------------------------------------------------------------------ reference


def _wan_freqs(cfg: WanConfig, max_len: int = 64) -> list[torch.Tensor]:
    """Wan's complex RoPE multipliers per band: [max_len, band/2] each (frame, height, width)."""
    d = cfg.head_dim

    def params(dim):
        inv = 1.0 / torch.pow(cfg.rope_theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
        return torch.polar(torch.ones_like(ang), ang)

    full = torch.cat([params(d - 4 * (d // 6)), params(2 * (d // 6)), params(2 * (d // 6))], dim=1)
    c = d // 2
    return list(full.split([c - 2 * (c // 3), c // 3, c // 3], dim=1))


def _ref_rope(x: torch.Tensor, frame_pos: list[int], h: int, w: int, cfg: WanConfig) -> torch.Tensor:
    """x [B, N, heads, D] with N = len(frame_pos)*h*w frame-major tokens; frame_pos: RoPE frame per frame."""
    fr, fh, fw = _wan_freqs(cfg, max(64, max(frame_pos) + 1))
    f = len(frame_pos)
    mult = torch.cat([
        fr[torch.tensor(frame_pos)].view(f, 1, 1, -1).expand(f, h, w, -1),
        fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * mult).flatten(-2)


def ref_dit(model: WanDiT, x, t, context, frame_pos, mask=None, ctx_kv=None):
    """Reference Wan forward in float64. x [B, C, F, H, W]; t [B, F]; frame_pos: RoPE frame of each frame;
    mask: bool [Lq, Lk] (keys = context tokens then x's tokens); ctx_kv: per layer (k pre-RoPE, v, frame
    positions) of extra context tokens. Returns (flow [B, C, F, H, W], per-layer (k pre-RoPE, v) of x)."""
    cfg = model.cfg
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    lin = lambda z, n: F.linear(z, P[n + ".weight"], P[n + ".bias"])
    gelu = lambda z: F.gelu(z, approximate="tanh")

    def rms(z, n):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + cfg.eps) * P[n + ".weight"]

    def ln(z, n=None):
        return F.layer_norm(z, (cfg.dim,), P.get(f"{n}.weight"), P.get(f"{n}.bias"), cfg.eps)

    def attention(q, k, v, m=None):
        s = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v)

    B, C, Fr, H, W = x.shape
    h, w, nh, D, dim = H // 2, W // 2, cfg.num_heads, cfg.head_dim, cfg.dim
    tok = F.conv3d(x.double(), P["patch_embedding.weight"], P["patch_embedding.bias"], stride=(1, 2, 2))
    tok = tok.flatten(2).transpose(1, 2)
    L = tok.shape[1]
    half = cfg.freq_dim // 2
    ang = t.double().reshape(-1, 1) * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    emb = torch.cat([ang.cos(), ang.sin()], dim=1)
    e = lin(F.silu(lin(emb, "time_embedding.0")), "time_embedding.2")
    e0 = lin(F.silu(e), "time_projection.1").view(B, Fr, 6, dim)
    e = e.view(B, Fr, dim)
    txt = lin(gelu(lin(context.double(), "text_embedding.0")), "text_embedding.2")
    tokwise = lambda z: z.repeat_interleave(h * w, dim=1)  # [B, F, ...] -> [B, L, ...]
    kv_out = []
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        m = tokwise(P[p + "modulation"].unsqueeze(0) + e0)  # [B, L, 6, dim]
        z = ln(tok) * (1 + m[:, :, 1]) + m[:, :, 0]
        q = rms(lin(z, p + "self_attn.q"), p + "self_attn.norm_q").view(B, L, nh, D)
        k = rms(lin(z, p + "self_attn.k"), p + "self_attn.norm_k").view(B, L, nh, D)
        v = lin(z, p + "self_attn.v").view(B, L, nh, D)
        kv_out.append((k, v))
        keys, vals = _ref_rope(k, frame_pos, h, w, cfg), v
        if ctx_kv is not None:
            ck, cv, cpos = ctx_kv[i]
            keys = torch.cat([_ref_rope(ck, cpos, h, w, cfg), keys], dim=1)
            vals = torch.cat([cv, vals], dim=1)
        a = attention(_ref_rope(q, frame_pos, h, w, cfg), keys, vals, mask)
        tok = tok + lin(a.flatten(2), p + "self_attn.o") * m[:, :, 2]
        z = ln(tok, p + "norm3")
        q = rms(lin(z, p + "cross_attn.q"), p + "cross_attn.norm_q").view(B, L, nh, D)
        k = rms(lin(txt, p + "cross_attn.k"), p + "cross_attn.norm_k").view(B, -1, nh, D)
        v = lin(txt, p + "cross_attn.v").view(B, -1, nh, D)
        tok = tok + lin(attention(q, k, v).flatten(2), p + "cross_attn.o")
        z = ln(tok) * (1 + m[:, :, 4]) + m[:, :, 3]
        tok = tok + lin(gelu(lin(z, p + "ffn.0")), p + "ffn.2") * m[:, :, 5]
    hm = tokwise(P["head.modulation"].unsqueeze(0) + e.unsqueeze(2))
    out = lin(ln(tok) * (1 + hm[:, :, 1]) + hm[:, :, 0], "head.head")
    out = out.view(B, Fr, h, w, 1, 2, 2, cfg.out_dim)
    out = torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(B, cfg.out_dim, Fr, H, W)
    return out, kv_out


# ------------------------------------------------------------------------------------------------ fixtures


def tiny_model(seed=0) -> WanDiT:
    torch.manual_seed(seed)
    return init_random_(WanDiT(WanConfig.tiny()).eval(), seed)


def tiny_context(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)


def block_noise(steps, fpb, n_blocks, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(steps, 1, 16, fpb, H_LAT, W_LAT, generator=g) for _ in range(n_blocks)]


# ---------------------------------------------------------------------------------------------------- tests


def test_full_forward_matches_wan_reference():
    model = tiny_model()
    ctx = tiny_context(model.cfg)
    x = torch.randn(1, 16, 3, H_LAT, W_LAT)
    t = torch.tensor([[900.0, 500.0, 10.0]])
    got = model(x, t, ctx)
    want, _ = ref_dit(model, x, t, ctx, [0, 1, 2])
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=0), (got.double() - want).abs().max()


@pytest.mark.parametrize("stage_kv", [True, False])
def test_block_causal_cache_equals_masked_full_sequence(stage_kv):
    model = tiny_model()
    cfg = model.cfg
    ctx = tiny_context(cfg)
    fpb, n_blocks = 3, 3
    sched = FlowMatchSchedule()
    cache = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=fpb * n_blocks, frames_per_block=fpb,
                    rolling=False, stage_kv=stage_kv, dtype=torch.float32)
    gen = BlockCausalWan(model, cache, sched)
    gen.set_context(ctx)
    noise = block_noise(sched.num_steps, fpb, n_blocks)
    tpf = cache.tokens_per_frame
    clean, steps = [], []  # steps[b] = [(x_t, x0_pred)]
    for b in range(n_blocks):
        ph = gen.phase_for_block(b)
        assert ph.cache_start == b * fpb * tpf and not ph.roll
        valid = cache.kv[:, :, :, :ph.cache_start].clone()
        x, rec = noise[b][0], []
        for i in range(sched.num_steps):
            x0 = gen.denoise_step(x, i, ph)
            rec.append((x, x0))
            if i + 1 < sched.num_steps:
                x = gen.renoise(x0, noise[b][i + 1], i)
        # the denoising pass never changes what earlier blocks wrote
        assert torch.equal(cache.kv[:, :, :, :ph.cache_start], valid)
        gen.write_cache(x0, ph)
        clean.append(x0)
        steps.append(rec)

    # reference: the whole sequence (clean earlier blocks + this block at its step) with a block-causal mask
    for b in range(n_blocks):
        frames = (b + 1) * fpb
        blk = torch.arange(frames * tpf) // (fpb * tpf)
        mask = blk[:, None] >= blk[None, :]
        for i, (x_t, x0) in enumerate(steps[b]):
            seq = torch.cat(clean[:b] + [x_t], dim=2)
            t = torch.tensor([[0.0] * (b * fpb) + [sched.timesteps[i]] * fpb])
            flow, _ = ref_dit(model, seq, t, ctx, list(range(frames)), mask=mask)
            want = x_t.double() - sched.sigmas[i] * flow[:, :, b * fpb:]
            err = (x0.double() - want).abs().max().item()
            assert err < 1e-4, f"block {b} step {i}: max err {err}"

    # generate_block (the static one-call form) reproduces the step-by-step loop on a fresh cache
    cache2 = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=fpb * n_blocks,
                     frames_per_block=fpb, rolling=False, stage_kv=stage_kv, dtype=torch.float32)
    gen2 = BlockCausalWan(model, cache2, sched)
    for b in range(n_blocks):
        out = gen2.generate_block(noise[b], ctx, gen2.phase_for_block(b))
        assert torch.allclose(out, clean[b], atol=1e-6, rtol=0)


def test_phase_model():
    cfg = WanConfig.tiny()
    cache = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=21, frames_per_block=3,
                    sink_frames=3, dtype=torch.float32)
    ph = cache.phases()
    assert len(ph) == 8
    assert [p.start_frame for p in ph] == [0, 3, 6, 9, 12, 15, 18, 18]
    assert [p.roll for p in ph] == [False] * 7 + [True]
    assert cache.phase_for_block(7) is not None and cache.phase_for_block(100) == ph[-1]
    no_roll = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=21, rolling=False,
                      dtype=torch.float32)
    assert len(no_roll.phases()) == 7
    with pytest.raises(ValueError):
        no_roll.phase_for_block(7)


PUBLIC_KEYS = [
    "patch_embedding.weight", "patch_embedding.bias",
    "text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
    "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
    "time_projection.1.weight", "time_projection.1.bias",
    "head.head.weight", "head.head.bias", "head.modulation",
] + [
    f"blocks.{i}.{n}"
    for i in (0, 29)
    for n in (
        *[f"{a}.{p}.{s}" for a in ("self_attn", "cross_attn") for p in "qkvo" for s in ("weight", "bias")],
        *[f"{a}.{p}.weight" for a in ("self_attn", "cross_attn") for p in ("norm_q", "norm_k")],
        "norm3.weight", "norm3.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias", "modulation",
    )
]


def test_wan_1_3b_names_and_size_on_meta():
    cfg = WanConfig.wan_1_3b()
    with torch.device("meta"):
        model = WanDiT(cfg)
    sd = model.state_dict()
    missing = [k for k in PUBLIC_KEYS if k not in sd]
    assert not missing, missing
    assert not any(k.startswith(("blocks.0.norm1.", "blocks.0.norm2.", "head.norm.")) for k in sd)  # no affine
    assert tuple(sd["patch_embedding.weight"].shape) == (1536, 16, 1, 2, 2)
    assert tuple(sd["time_projection.1.weight"].shape) == (6 * 1536, 1536)
    assert tuple(sd["blocks.0.modulation"].shape) == (1, 6, 1536)
    assert tuple(sd["head.modulation"].shape) == (1, 2, 1536)
    assert tuple(sd["head.head.weight"].shape) == (64, 1536)
    assert tuple(sd["blocks.0.self_attn.norm_q.weight"].shape) == (1536,)
    assert "blocks.30.modulation" not in sd
    n = sum(p.numel() for p in model.parameters())
    assert 1.3e9 <= n <= 1.45e9, n  # 1,418,996,800 -- Wan's "1.3B"
    assert cfg.head_dim == 128 and cfg.rope_bands == (44, 42, 42)


def test_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = tiny_model(0)
    ctx = tiny_context(src.cfg)
    x = torch.randn(1, 16, 2, H_LAT, W_LAT)
    t = torch.tensor([700.0])
    want = src(x, t, ctx)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}

    st = tmp_path / "wan.safetensors"
    save_file(sd, str(st))
    pt = tmp_path / "self_forcing.pt"
    torch.save({f"generator.model.{k}": v for k, v in sd.items()}, pt)
    pt2 = tmp_path / "wrapped.pt"
    torch.save({"generator": {f"model._fsdp_wrapped_module.{k}": v + 1 for k, v in sd.items()},
                "generator_ema": {f"model.{k}": v for k, v in sd.items()}}, pt2)

    for source in (st, pt, pt2, sd):
        dst = tiny_model(7)
        assert not torch.equal(dst(x, t, ctx), want)
        missing, unexpected = load_wan_state_dict(dst, source)
        assert missing == [] and unexpected == []
        assert torch.equal(dst(x, t, ctx), want), source

    # a model built on the meta device is materialised from the checkpoint
    with torch.device("meta"):
        lazy = WanDiT(WanConfig.tiny())
    load_wan_state_dict(lazy, st)
    assert torch.equal(lazy(x, t, ctx), want)


def test_checkpoint_mismatch_names_keys():
    model = tiny_model()
    sd = dict(model.state_dict())
    del sd["blocks.1.cross_attn.k.bias"]
    sd["blocks.0.lora_up.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as exc:
        load_wan_state_dict(tiny_model(), sd)
    msg = str(exc.value)
    assert "blocks.1.cross_attn.k.bias" in msg and "blocks.0.lora_up.weight" in msg
    assert "1 missing" in msg and "1 unexpected" in msg
    missing, unexpected = load_wan_state_dict(tiny_model(), sd, strict=False)
    assert missing == ["blocks.1.cross_attn.k.bias"] and unexpected == ["blocks.0.lora_up.weight"]


def test_self_forcing_schedule():
    s = FlowMatchSchedule()  # timesteps [1000, 750, 500, 250], shift 5, warped onto the 1000-step grid
    # s = t/1000 -> sigma = 5s / (1 + 4s): 1, 3.75/4, 2.5/3, 1.25/2
    assert s.sigmas == pytest.approx([1.0, 0.9375, 5 / 6, 0.625], abs=1e-12)
    assert s.timesteps == pytest.approx([1000.0, 937.5, 833.3333333333, 625.0], abs=1e-6)
    assert s.next_sigmas == pytest.approx([0.9375, 5 / 6, 0.625, 0.0], abs=1e-12)
    # unwarped: the timestep is taken as is and sigma is the nearest entry of the shifted grid
    u = FlowMatchSchedule(denoising_steps=(1000, 937.5, 625), warp=False)
    assert u.timesteps == [1000.0, 937.5, 625.0]
    assert u.sigmas == pytest.approx([1.0, 0.9375, 0.625], abs=1e-12)


def test_bf16_model_and_cache_track_float32():
    cfg = WanConfig.tiny()
    ctx = tiny_context(cfg)[:, :5]  # shorter than text_len: zero-padded as Wan pads
    noise = block_noise(4, 2, 4, seed=9)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model().to(dtype)
        cache = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=4, frames_per_block=2,
                        sink_frames=1, dtype=dtype)
        gen = BlockCausalWan(model, cache)
        outs[dtype] = [gen.generate_block(n, ctx, gen.phase_for_block(b)) for b, n in enumerate(noise)]
    for a, b in zip(outs[torch.float32], outs[torch.bfloat16]):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        assert (a - b).norm() / a.norm() < 5e-2


# ---------------------------------------------------------------------------------------- prompt re-cache


def _write_fresh(model, cfg, latents, ctx, *, max_frames, fpb, sink):
    """A new cache holding `latents` [1, C, T, h, w] written block by block from slot 0 under `ctx`."""
    cache = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=max_frames, frames_per_block=fpb,
                    sink_frames=sink, dtype=torch.float32)
    gen = BlockCausalWan(model, cache)
    gen.set_context(ctx)
    for b in range(latents.shape[2] // fpb):
        gen.write_cache(latents[:, :, b * fpb:(b + 1) * fpb], cache.phases()[b])
    return cache


def test_recache_during_filling_covers_only_written_frames():
    model = tiny_model(4)
    cfg = model.cfg
    ctx_a, ctx_b = tiny_context(cfg, 5), tiny_context(cfg, 6)
    cache = KVCache(cfg, batch_size=1, latent_hw=(H_LAT, W_LAT), max_frames=9, frames_per_block=3,
                    rolling=False, dtype=torch.float32)
    gen = BlockCausalWan(model, cache)
    noise = block_noise(4, 3, 3, seed=8)
    x0 = gen.generate_block(noise[0], ctx_a, gen.phase_for_block(0))
    x1 = gen.generate_block(noise[1], ctx_b, gen.phase_for_block(1), recache=True)
    want = _write_fresh(model, cfg, torch.cat([x0, x1], dim=2), ctx_b, max_frames=9, fpb=3, sink=0)
    n = 6 * cache.tokens_per_frame
    assert torch.allclose(cache.kv[:, :, :, :n], want.kv[:, :, :, :n], atol=1e-5)
    assert torch.equal(cache.latents[:, :, 6:], torch.zeros_like(cache.latents[:, :, 6:]))  # nothing beyond


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ffn_with_gelu_epilogue_matches_the_plain_path():
    from reactor_graph.models.wan_dit import _ffn

    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(160, 96))
    ffn = ffn.to("cuda", torch.bfloat16)
    h = torch.randn(1, 37, 96, device="cuda")
    got = _ffn(ffn, h).float()  # cuBLASLt's GELU epilogue
    plain = ffn(h.to(torch.bfloat16)).float()
    ref = ffn.double()(h.to(torch.bfloat16).double()).float()  # float64 ground truth (converts ffn in place)
    assert got.shape == (1, 37, 96)
    err = lambda y: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(got) < 1e-2 and err(got) <= err(plain) * 1.5
