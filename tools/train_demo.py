#!/usr/bin/env python
"""Train the built-in demo's model (graphs/demo.yaml) on the procedural shapes data set (tools/demo_data.py).

Stages, one fixed seed, a wall-clock budget (`--minutes`, about 1/5 for the first stage):
  1. an autoencoder: a small conv encoder (training only) and the demo's own TinyDecoder; the encoder ends
     in a non-affine BatchNorm, so latents come out near zero mean and unit variance per channel and the
     decoder reads them as they are (nothing to fold in afterwards). Latent noise while training makes
     the decoder forgiving of a denoiser's small errors.
  2. the text encoder and the block-causal CausalDiT, by flow matching in that latent space, with teacher
     forcing that reproduces CausalDenoiser.generate exactly: a clip of K blocks is run as one sequence of
     K clean blocks (sigma 0: the "clean pass" that writes the KV cache at inference) followed by K noisy
     blocks (each at its own sigma), under a block mask: a clean block sees itself and the `context` clean
     blocks before it, a noisy block sees itself and the `context` clean blocks before it. `context` is
     what the node's rolling cache gives a block (cache_blocks - 1: it drops the oldest block before it
     denoises the new one). Rotary positions are relative, so absolute frame indices here and window
     indices at inference give the same attention. tests/test_demo_model.py checks the equivalence
     against the node itself.
  3. (`--rollout-share`, or all of the budget with `--init-from`) Self-Forcing-style training on its own
     streams: a pool of sessions, each at its own point of its stream, advanced one block a step through
     the node's rolling KV cache (PoolCache), trained against an expert (the data generator) that renders
     the prompt from where the model's last frame put the shape (train_rollouts says how).
  `--init-from WEIGHTS` starts from trained weights instead: an encoder is fitted to their decoder (the
  encoder itself is not shipped) and stage 3 runs alone.
Then it writes `demo_weights.safetensors` (keys `text.`, `dit.`, `decoder.`: the demo nodes' params
`weights` + `weights_prefix`), `train_log.json`, `loss.png`, and an evaluation through the real engine on
the CPU (`samples.png`, scores in the log).

  python tools/train_demo.py --out out/demo --minutes 8.5 --device cuda      # issue 8's weights (stages 1-2)
  python tools/train_demo.py --out out/demo --device cuda --init-from graphs/demo_weights.safetensors \
      --enc-seconds 60 --minutes 6.5 --rollout-batch 1024 --no-eval          # + stage 3 (issue 17)
  python tools/train_demo.py --out /tmp/demo --tiny                          # CPU smoke test, < 60 s
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data as data  # noqa: E402

from reactor_graph.nodes.causal_denoiser import CausalDiT, flow_sigmas  # noqa: E402
from reactor_graph.nodes.latent_decoder import TinyDecoder  # noqa: E402
from reactor_graph.nodes.text_encoder import TextEncoderModel, WordTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# -- the graph's architecture ----------------------------------------------------------------------------------
def graph_config(path: Path) -> dict:
    """Sizes from the graph file, so what is trained is what the demo nodes build."""
    from reactor_graph.plan import load_plan

    plan = load_plan(path)
    by_type = {n.type_name: n for n in plan.nodes.values()}
    missing = {"text_encoder", "causal_denoiser", "latent_decoder"} - set(by_type)
    if missing:
        raise SystemExit(f"{path} has no node of type {', '.join(sorted(missing))}")
    t, d, v = (by_type[k].params for k in ("text_encoder", "causal_denoiser", "latent_decoder"))
    if d.text_dim != t.dim or d.latent_channels != v.latent_channels:
        raise SystemExit(f"{path}: text_dim/latent_channels do not agree between the nodes")
    size = (plan.info.height, plan.info.width)
    if (size[0] // v.upsample, size[1] // v.upsample) != tuple(d.latent_size):
        raise SystemExit(f"{path}: frame size / upsample does not give the denoiser's latent_size")
    return {
        "size": size, "fps": plan.info.fps,
        "text": dict(vocab_size=t.vocab_size, dim=t.dim, max_tokens=t.max_tokens, layers=t.layers, heads=t.heads),
        "dit": dict(channels=d.latent_channels, frames=d.frames_per_block, size=tuple(d.latent_size), patch=d.patch,
                    dim=d.dim, layers=d.layers, heads=d.heads, text_dim=d.text_dim, positions=d.positions),
        "steps": d.steps, "shift": d.shift, "cache_blocks": d.cache_blocks,
        "decoder": dict(channels=v.latent_channels, width=v.width, upsample=v.upsample, padding=v.padding),
    }


class RunningNorm(nn.Module):
    """Per-channel normalisation by running statistics (updated while training, never by the batch's own):
    latents come out near zero mean and unit variance without each batch shifting what the decoder sees."""

    def __init__(self, channels: int, momentum: float = 0.02):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                xf = x.float()
                m, v = xf.mean((0, 2, 3)), xf.var((0, 2, 3))
                if self.momentum is None:  # exact (cumulative) statistics: calibration
                    self.count += 1
                    w = 1.0 / float(self.count)
                else:
                    w = self.momentum if self.count > 0 else 1.0
                    self.count += 1
                self.mean.lerp_(m, w)
                self.var.lerp_(v, w)
        return (x - self.mean[:, None, None]) * torch.rsqrt(self.var[:, None, None] + 1e-5)

    def calibrate(self):
        self.count.zero_()
        self.momentum = None


class Encoder(nn.Module):
    """Frames [B, 3, H, W] in [-1, 1] -> latents [B, C, H/u, W/u], normalised per channel (training only)."""

    def __init__(self, channels: int, width: int, downsample: int, norm: bool = True, padding: str = "zeros"):
        super().__init__()
        conv = partial(nn.Conv2d, padding=1, padding_mode=padding)  # the decoder's padding, so both see a torus
        layers: list[nn.Module] = [conv(3, 32, 3), nn.SiLU()]
        w = 32
        for _ in range(int(math.log2(downsample))):
            layers += [conv(w, width, 4, stride=2), nn.SiLU()]
            w = width
        layers += [conv(w, w, 3), nn.SiLU(), conv(w, channels, 3)]
        if norm:
            layers.append(RunningNorm(channels))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def build_models(cfg: dict):
    text = TextEncoderModel(cfg["text"]["vocab_size"], cfg["text"]["dim"], cfg["text"]["max_tokens"],
                            cfg["text"]["layers"], cfg["text"]["heads"])
    dc = cfg["dit"]
    dit = CausalDiT(dc["channels"], dc["frames"], dc["size"], dc["patch"], dc["dim"], dc["layers"], dc["heads"],
                    dc["text_dim"], dc.get("positions", "learnt"))
    # adaLN-zero: every residual branch starts closed and the output at zero, as DiT trains.
    for blk in dit.blocks:
        nn.init.zeros_(blk.modulation.weight)
        nn.init.zeros_(blk.modulation.bias)
    nn.init.zeros_(dit.out.weight)
    nn.init.zeros_(dit.out.bias)
    dec = TinyDecoder(cfg["decoder"]["channels"], cfg["decoder"]["width"], cfg["decoder"]["upsample"],
                      cfg["decoder"].get("padding", "zeros"))
    return text, dit, dec


# -- teacher forcing that matches CausalDenoiser.generate ------------------------------------------------------------
def block_mask(blocks: int, tokens: int, context: int, device) -> torch.Tensor:
    """[2K*N, 2K*N] bool, True = may attend. Sequence: K clean blocks, then K noisy blocks, N tokens each."""
    seg = torch.arange(2 * blocks, device=device).repeat_interleave(tokens)
    noisy, blk = seg >= blocks, seg % blocks
    qn, kn, qb, kb = noisy[:, None], noisy[None, :], blk[:, None], blk[None, :]
    window = kb >= qb - context
    clean_q = ~qn & ~kn & (kb <= qb) & window
    noisy_q = qn & ((~kn & (kb < qb) & window) | (kn & (kb == qb)))
    return clean_q | noisy_q


def _block_forward(blk, x, temb, text, pos, mask, b: int, s: int, n: int):
    """One CausalDiT Block over [B, S*N, D] with a per-segment time embedding [B, S, D] and text [B*S, L, Dt];
    the same arithmetic as Block.forward."""
    d = x.shape[-1]
    mod = blk.modulation(temb)[:, :, None]  # [B, S, 1, 6D]
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
    x4 = x.view(b, s, n, d)
    h = (blk.norm1(x4) * (1 + sc1) + sh1).view(b, s * n, d)
    q, k, v = (blk.split(t) for t in blk.qkv(h).chunk(3, dim=-1))
    a = F.scaled_dot_product_attention(blk.rotary(q, pos), blk.rotary(k, pos), v, attn_mask=mask)
    x4 = x4 + g1 * blk.proj(a.transpose(1, 2).flatten(2)).view(b, s, n, d)
    xs = x4.reshape(b * s, n, d)
    tk, tv = blk.cross_kv(text).chunk(2, dim=-1)
    a = F.scaled_dot_product_attention(blk.split(blk.cross_q(blk.norm2(xs))), blk.split(tk), blk.split(tv))
    x4 = (xs + blk.cross_proj(a.transpose(1, 2).flatten(2))).view(b, s, n, d)
    h = blk.norm3(x4) * (1 + sc2) + sh2
    return (x4 + g2 * blk.mlp(h)).view(b, s * n, d)


def teacher_forced(dit: CausalDiT, clean: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor,
                   text: torch.Tensor, context: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flow predictions [B, K, C, T, h, w] for the noisy blocks, each seeing the clean blocks before it through
    the KV cache as CausalDenoiser.generate builds it.

    clean, noisy: [B, K, C, T, h, w]; sigma: [B, K]; text: [B, K, L, Dt] (the prompt of each block)."""
    b, k = sigma.shape
    s, n, dim = 2 * k, dit.frames * dit.tokens_per_frame, dit.dim
    x = torch.cat([clean, noisy], dim=1).flatten(0, 1)  # [B*S, C, T, h, w]
    h = dit.tokens(x).view(b, s * n, dim)
    sig = torch.cat([torch.zeros_like(sigma), sigma], dim=1)  # the clean pass runs at sigma 0
    temb = dit.time_embedding(sig.flatten()).view(b, s, dim)
    txt = torch.cat([text, text], dim=1).flatten(0, 1)  # [B*S, L, Dt]
    frame = torch.arange(k, device=x.device).repeat(2) * dit.frames  # first frame of each segment
    pos = (frame[:, None] + torch.arange(dit.frames, device=x.device)).repeat_interleave(dit.tokens_per_frame, 1)
    pos = pos.flatten()  # [S*N], frame-major within a segment like patchify
    if mask is None:
        mask = block_mask(k, n, context, x.device)
    for blk in dit.blocks:
        h = _block_forward(blk, h, temb, txt, pos, mask, b, s, n)
    out = dit.out(dit.norm_out(h.view(b, s, n, dim)[:, k:].reshape(b * k, n, dim)))
    return dit.unpatchify(out).view(b, k, *noisy.shape[2:])


# -- rollouts: the node's own inference, batched ------------------------------------------------------------------
class BatchedCache:
    """CausalDenoiser.generate for a batch of sessions at once: the same rolling KV cache (fills over the first
    `cache_blocks` blocks, then drops the oldest block before each new one), the same positions, the same Euler
    steps and clean pass. tests/test_demo_model.py checks it against the node block by block."""

    def __init__(self, dit: CausalDiT, cache_blocks: int, steps: int, shift: float):
        self.dit, self.cache_blocks = dit, cache_blocks
        self.block_tokens = dit.frames * dit.tokens_per_frame
        self.sigmas = flow_sigmas(steps, shift) + [0.0]
        self.k = self.v = None
        self.blocks = 0  # blocks written so far
        self.n_cached = self.first_frame = 0

    def begin_block(self) -> None:
        """Make room for the next block (roll when full) and set its place in the window."""
        phase = min(self.blocks, self.cache_blocks)
        bt = self.block_tokens
        if phase == self.cache_blocks:
            self.k[:, :, :, :-bt] = self.k[:, :, :, bt:].clone()
            self.v[:, :, :, :-bt] = self.v[:, :, :, bt:].clone()
            phase -= 1
        self.n_cached, self.first_frame = phase * bt, phase * self.dit.frames

    def flow(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The model's flow for x [B, C, T, h, w] at per-sample sigma [B], seeing the cache."""
        f, _, _ = self.dit(x, sigma, text, self.first_frame, self.k, self.v, self.n_cached)
        return f

    def denoise(self, noise: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        """The few-step chain from noise; returns [x at sigma_0, x at sigma_1, ..., x at 0] (the last is the block)."""
        xs = [noise]
        for s, s_next in zip(self.sigmas[:-1], self.sigmas[1:]):
            x = xs[-1]
            sigma = torch.full((x.shape[0],), s, device=x.device)
            xs.append(x + (s_next - s) * self.flow(x, sigma, text).to(x.dtype))
        return xs

    def write(self, x: torch.Tensor, text: torch.Tensor) -> None:
        """The clean pass: x's keys/values at sigma 0 go into the cache as context for later blocks."""
        _, k, v = self.dit(x, torch.zeros(x.shape[0], device=x.device), text, self.first_frame, self.k, self.v,
                           self.n_cached)
        if self.k is None:
            shape = (*k.shape[:3], self.cache_blocks * self.block_tokens, k.shape[-1])
            self.k = torch.zeros(shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(shape, device=k.device, dtype=k.dtype)
        n = self.n_cached
        self.k[:, :, :, n:n + self.block_tokens] = k
        self.v[:, :, :, n:n + self.block_tokens] = v
        self.blocks += 1


def _pool_block(blk, x, temb, text, pos, ck_r, cv, mask):
    """Block.forward with the cache's keys already rotated (ck_r) and a per-session key mask [B, 1, 1, M+N]."""
    sh1, sc1, g1, sh2, sc2, g2 = blk.modulation(temb).unsqueeze(1).chunk(6, dim=-1)
    h = blk.norm1(x) * (1 + sc1) + sh1
    q, k, v = (blk.split(t) for t in blk.qkv(h).chunk(3, dim=-1))
    if ck_r is not None:
        k_all, v_all = torch.cat([ck_r.to(k.dtype), blk.rotary(k, pos)], dim=2), torch.cat([cv.to(v.dtype), v], dim=2)
        a = F.scaled_dot_product_attention(blk.rotary(q, pos), k_all, v_all, attn_mask=mask)
    else:
        a = F.scaled_dot_product_attention(blk.rotary(q, pos), blk.rotary(k, pos), v)
    x = x + g1 * blk.proj(a.transpose(1, 2).flatten(2))
    tk, tv = blk.cross_kv(text).chunk(2, dim=-1)
    a = F.scaled_dot_product_attention(blk.split(blk.cross_q(blk.norm2(x))), blk.split(tk), blk.split(tv))
    x = x + blk.cross_proj(a.transpose(1, 2).flatten(2))
    h = blk.norm3(x) * (1 + sc2) + sh2
    return x + g2 * blk.mlp(h), k, v


class PoolCache:
    """A pool of streaming sessions, each at its own point of its stream, advanced one block at a time: the
    node's rolling cache (CausalDenoiser.generate) for every session at once, sessions restarting whenever
    they like. The window always holds `cache_blocks - 1` context blocks; a session with fewer behind it
    (a fresh start) has the missing ones masked out. Rotary positions are relative, so a block placed at the
    window's end with masked slots sees exactly what the node's block at phase `valid` sees (a test checks)."""

    def __init__(self, dit: CausalDiT, cache_blocks: int, steps: int, shift: float, batch: int, device):
        self.dit, self.ctx, self.b = dit, max(cache_blocks - 1, 0), batch
        self.n = dit.frames * dit.tokens_per_frame
        self.sigmas = flow_sigmas(steps, shift) + [0.0]
        self.k = self.v = None  # [layers, B, H, ctx*N, d], pre-rope, allocated at the first write
        self.valid = torch.zeros(batch, dtype=torch.long, device=device)  # context blocks behind each session
        self.pos = dit.frame_positions(self.ctx * dit.frames, device)
        self.cache_pos = torch.arange(self.ctx * self.n, device=device) // dit.tokens_per_frame
        self.slot = torch.arange(self.ctx * self.n, device=device) // self.n
        self._ck_r = None

    def restart(self, which: torch.Tensor) -> None:
        """Sessions `which` [B] bool start afresh (no context)."""
        self.valid = torch.where(which, torch.zeros_like(self.valid), self.valid)

    def begin_block(self) -> None:
        """Once per block: the cache's rotated keys and the mask (the same for every forward of the block)."""
        if self.k is None or self.ctx == 0 or not bool((self.valid > 0).any()):
            self._ck_r = None  # no session has context: self-attention only
            return
        self._ck_r = [self.dit.rotary(self.k[i], self.cache_pos) for i in range(self.k.shape[0])]
        ok = self.slot[None] >= (self.ctx - self.valid)[:, None]  # [B, M]
        ok = torch.cat([ok, torch.ones(self.b, self.n, dtype=torch.bool, device=ok.device)], dim=1)
        self._mask = ok[:, None, None, :]

    def forward(self, x, sigma, text):
        dit = self.dit
        h = dit.tokens(x)
        temb = dit.time_embedding(sigma)
        ks, vs = [], []
        for i, blk in enumerate(dit.blocks):
            ck = self._ck_r[i] if self._ck_r is not None else None
            cv = self.v[i] if self._ck_r is not None else None
            h, k, v = _pool_block(blk, h, temb, text, self.pos, ck, cv, self._mask if ck is not None else None)
            ks.append(k)
            vs.append(v)
        return dit.unpatchify(dit.out(dit.norm_out(h))), ks, vs

    def flow(self, x, sigma, text):
        return self.forward(x, sigma, text)[0]

    def denoise(self, noise, text) -> list[torch.Tensor]:
        xs = [noise]
        for s, s_next in zip(self.sigmas[:-1], self.sigmas[1:]):
            x = xs[-1]
            sigma = torch.full((x.shape[0],), s, device=x.device)
            xs.append(x + (s_next - s) * self.flow(x, sigma, text).to(x.dtype))
        return xs

    def write(self, x, text) -> None:
        """The clean pass; the oldest context block leaves the window, x's keys/values join it."""
        _, ks, vs = self.forward(x, torch.zeros(x.shape[0], device=x.device), text)
        k, v = torch.stack(ks), torch.stack(vs)
        if self.ctx == 0:
            return
        if self.k is None:
            shape = (*k.shape[:3], self.ctx * self.n, k.shape[-1])
            self.k = torch.zeros(shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(shape, device=k.device, dtype=k.dtype)
        self.k = torch.cat([self.k[:, :, :, self.n:], k.to(self.k.dtype)], dim=3)
        self.v = torch.cat([self.v[:, :, :, self.n:], v.to(self.v.dtype)], dim=3)
        self.valid = (self.valid + 1).clamp(max=self.ctx)


SWITCH_KINDS = [("colour", 0.18), ("shape", 0.24), ("motion", 0.14), ("background", 0.12), ("size", 0.10),
                ("everything", 0.22)]


def rollout_attrs(batch: int, blocks: int, rng: random.Random, switch_prob: float) -> list[list[dict]]:
    """[batch][blocks] attributes for rollouts: at each block boundary, with `switch_prob`, a prompt switch of
    one kind (one attribute, as a user edits a prompt, or everything), never two blocks in a row."""
    def fresh():
        return data.sample_attrs(1, 1, rng, 0.0)[0][0]

    kinds, weights = zip(*SWITCH_KINDS)
    out = []
    for _ in range(batch):
        a, seq, last = fresh(), [], -2
        for k in range(blocks):
            if k > 0 and k - last > 1 and rng.random() < switch_prob:
                kind = rng.choices(kinds, weights)[0]
                while True:
                    b = fresh() if kind == "everything" else dict(a, **{kind: fresh()[kind]})
                    if b != a and (b["colour"], b["background"]) not in data.CLASHES:
                        break
                a, last = b, k
            seq.append(a)
        out.append(seq)
    return out


def _circular_centre(mask: torch.Tensor) -> torch.Tensor:
    """(x, y) [B, 2] in pixels of a (soft) mask [B, H, W] on the torus: the circular mean of its columns / rows."""
    _, h, w = mask.shape
    out = []
    for n, m in ((w, mask.sum(1)), (h, mask.sum(2))):  # [B, W]: x from summing rows; [B, H]: y
        a = 2 * math.pi * (torch.arange(n, device=mask.device, dtype=torch.float32) + 0.5) / n
        ang = torch.atan2((m * a.sin()).sum(1), (m * a.cos()).sum(1))
        out.append((ang * n / (2 * math.pi) - 0.5) % n)
    return torch.stack(out, dim=-1)


def _bg_distance(frames: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """[B, H, W]: L1 distance (0..765) of frames [B, 3, H, W] in [-1, 1] from the background colour bg [B, 3]."""
    img = (frames.float().clamp(-1, 1) + 1) * 127.5
    return (img - bg[:, :, None, None] * 255).abs().sum(1)


def shape_centres(frames: torch.Tensor, bg: torch.Tensor, fallback: torch.Tensor, with_ok: bool = False):
    """(x, y) [B, 2] of the shape in frames [B, 3, H, W] in [-1, 1] on the torus (circular mean of the pixels
    far from the background colour bg [B, 3] in [0, 1], as demo_data.foreground), or `fallback` where there
    is no shape to read (too few pixels, or the background itself is off)."""
    _, _, h, w = frames.shape
    mask = (_bg_distance(frames, bg) > 90).float()  # [B, H, W]
    area = mask.sum((1, 2))
    est = _circular_centre(mask)
    ok = ((area > 40) & (area < 0.4 * h * w))[:, None]
    out = torch.where(ok, est, fallback)
    return (out, ok[:, 0]) if with_ok else out


def soft_centres(frames: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """shape_centres' reading with a soft threshold, so it has a gradient: a loss on it moves the shape
    instead of smearing it (a pixel loss against a target a pixel or two off pays for blur)."""
    return _circular_centre(torch.sigmoid((_bg_distance(frames, bg) - 90.0) / 12.0))


def wrap_delta(d: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Displacements (x, y) [..., 2] on the torus of `size` (h, w), into [-w/2, w/2) x [-h/2, h/2)."""
    half = torch.tensor([size[1] / 2, size[0] / 2], device=d.device)
    return (d + half) % (2 * half) - half


def expert_start(want: torch.Tensor, got: torch.Tensor, found: torch.Tensor, align_px: float,
                 size: tuple[int, int]) -> torch.Tensor:
    """Where the expert draws a block's first frame [B, 2]: where the motion says (`want`), moved towards where
    the model drew it (`got`, where `found`) by up to `align_px` px on each axis, across the edges."""
    if align_px <= 0:
        return want
    off = wrap_delta(got - want, size).clamp(-align_px, align_px) * found[:, None]
    wh = torch.tensor([float(size[1]), float(size[0])], device=want.device)
    return (want + off) % wh


# -- training ---------------------------------------------------------------------------------------------------
class Settings:
    def __init__(self, args, cfg):
        tiny = args.tiny
        self.seed = args.seed
        self.minutes = args.minutes if args.minutes is not None else (1.0 if tiny else 8.5)
        self.ae_share = args.ae_share
        self.ae_batch = args.ae_batch or (4 if tiny else 64)  # frames per step
        self.ae_lr = args.ae_lr
        self.ae_max_steps = 6 if tiny else 100_000
        self.batch = args.batch or (2 if tiny else 64)  # clips per step
        self.blocks = args.blocks or (3 if tiny else 6)  # blocks per clip
        self.lr = args.lr
        self.warmup = 10 if tiny else 300
        self.max_steps = args.steps or (4 if tiny else 1_000_000)
        self.fixed_steps = tiny or bool(args.steps)  # else the step count comes from the measured speed
        self.switch_prob = 0.3
        self.start_prob = 0.3  # clips that begin a session (shape centred); the rest are later windows
        self.context_noise = 0.1  # max std of noise added to context latents (robustness to own outputs)
        self.ema = 0.999
        self.self_context = args.self_context
        self.context = max(cfg["cache_blocks"] - 1, 0)
        self.eval_blocks = args.eval_blocks or (3 if tiny else 12)
        self.eval_prompts = 1 if tiny else None  # None: all
        self.checkpoint_s = 60 if tiny else 90
        # stage 3: rollouts (Self-Forcing style)
        self.rollout_share = args.rollout_share  # of the denoiser's budget, at its end
        self.rollout_batch = 4 if tiny else args.rollout_batch  # sessions in the streaming pool
        self.rollout_max_steps = args.rollout_steps or (2 if tiny else 1_000_000)
        self.rollout_fixed = tiny or bool(args.rollout_steps)
        self.rollout_life = (4, 12) if tiny else tuple(int(v) for v in args.rollout_life.split(","))  # blocks
        self.rollout_burn_in = 2 if tiny else args.rollout_burn_in  # blocks the pool plays before training
        self.rollout_switch = args.rollout_switch  # a session's chance of a prompt switch at each block
        # the rollout loss (train_rollouts says why each term is there)
        self.rollout_latent = args.rollout_latent
        self.rollout_pixel = args.rollout_pixel
        self.rollout_pos = args.rollout_pos
        self.rollout_align_px = args.rollout_align_px
        self.rollout_renoise = args.rollout_renoise
        self.rollout_flow = args.rollout_flow
        probs = [float(v) for v in args.rollout_step_probs.split(",")] if args.rollout_step_probs else [1.0] * cfg["steps"]
        if len(probs) != cfg["steps"] or min(probs) < 0 or sum(probs) <= 0:
            raise SystemExit(f"--rollout-step-probs needs {cfg['steps']} non-negative weights, got {probs}")
        self.rollout_step_probs = [v / sum(probs) for v in probs]
        self.probe_every_s = 20 if tiny else args.probe_every
        self.probe_seconds = 1 if tiny else args.probe_seconds
        self.rollout_lr = args.rollout_lr
        self.rollout_tf = 0.5  # weight of the teacher-forced batch alongside
        self.rollout_tf_batch = 2 if tiny else args.rollout_tf_batch
        self.rollout_ema = 0.995
        self.dit_from = args.dit_from
        if self.dit_from and self.rollout_share <= 0:
            raise SystemExit("--dit-from skips stage 2: it needs --rollout-share > 0")
        # --tf-continue: stage 2 goes on from --init-from's text encoder and denoiser (no stage 3)
        self.tf_from = args.init_from if args.tf_continue else None
        if args.tf_continue and not args.init_from:
            raise SystemExit("--tf-continue continues --init-from's weights: give --init-from")
        if args.init_from and not args.tf_continue:
            self.dit_from = args.init_from
        if self.dit_from:
            self.rollout_share = 1.0
        if self.tf_from:
            self.rollout_share = 0.0
        # stage 2's loss: latents under the shape (its coverage, a latent pixel's neighbours too) weigh
        # 1 + shape_weight. What tells a circle from a square is a few corner pixels of a small shape: in a plain
        # mean over the frame that difference is lost, and copying the context's shape is almost free.
        self.shape_weight = args.shape_weight
        self.shape_switch = args.shape_switch


class StepPlan:
    """How many steps fit the budget: measured over steps 5..25 (the first ones warm up), then re-measured
    every 50 steps (a step may get dearer, e.g. when self-generated context starts), so the learning-rate
    schedule ends where the budget does. A hard stop just past the budget in any case."""

    def __init__(self, max_steps: int, budget_s: float, fixed: bool, name: str):
        self.total, self.budget, self.fixed, self.name = max_steps, budget_s, fixed, name
        self.max_steps = max_steps
        self.start = time.perf_counter()
        self.mark: tuple[int, float] | None = None
        self.said = 0

    def done(self, step: int) -> bool:
        now = time.perf_counter()
        if not self.fixed:
            if step == 5:
                self.mark = (5, now)
            elif self.mark and (step == 25 or (step > 25 and step % 50 == 0)):
                per = (now - self.mark[1]) / (step - self.mark[0])
                left = self.budget - (now - self.start)
                self.total = min(self.max_steps, max(step + 1, step + int(left / per)))
                self.mark = (step, now)
                if abs(self.total - self.said) > 0.03 * self.total:
                    say(f"{self.name}: {per * 1000:.0f} ms/step -> {self.total} steps")
                    self.said = self.total
        if step >= self.total:
            return True
        if now - self.start > self.budget * (1.5 if self.fixed else 1.03) and step > 0:
            say(f"{self.name}: stopping at step {step} of {self.total}: out of time")
            return True
        return False


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_autoencoder(cfg, st: Settings, device, budget_s: float, log: dict):
    dcfg = cfg["decoder"]
    enc = Encoder(dcfg["channels"], 64, dcfg["upsample"], padding=dcfg.get("padding", "zeros")).to(device)
    _, _, dec = build_models(cfg)
    dec.to(device)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=st.ae_lr, weight_decay=0.0)
    rng, gen = random.Random(st.seed), torch.Generator().manual_seed(st.seed)
    t_start, step = time.perf_counter(), 0
    plan = StepPlan(st.ae_max_steps, budget_s, st.fixed_steps, "autoencoder")
    fpb = cfg["dit"]["frames"]
    while not plan.done(step):
        total = plan.total
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, st.ae_lr, 50)
        clips = data.make_clips(st.ae_batch // fpb, 1, fpb, cfg["size"], rng, gen, device, switch_prob=0.0,
                                vary_text=False)
        x, a = clips.frames.flatten(0, 1), clips.alpha.flatten(0, 1)[:, None]
        with autocast(device):
            z = enc(x)
            y = dec(z + 0.05 * torch.randn_like(z))
        w = 1 + 8 * a  # the shape is a small part of the frame; weigh its pixels up
        err = y.float() - x
        loss = (w * err.abs()).mean() + (w * err * err).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            log["ae"].append({"step": step, "loss": loss.item(), "t": time.perf_counter() - t_start})
        if step % 200 == 0:
            psnr = -10 * math.log10(max((err.detach() ** 2).mean().item() / 4, 1e-10))
            say(f"autoencoder step {step}/{total} loss {loss.item():.4f} psnr {psnr:.1f} dB")
        step += 1
    # Exact statistics for the encoder's normalisation (an average over fresh frames), so latents have zero
    # mean and unit variance per channel, as the denoiser's noise does.
    enc.net[-1].calibrate()
    enc.train()
    with torch.no_grad(), autocast(device):
        for _ in range(2 if st.fixed_steps and st.ae_max_steps < 100 else 30):
            enc(data.make_clips(st.ae_batch // fpb, 1, fpb, cfg["size"], rng, gen, device, switch_prob=0.0,
                                vary_text=False).frames.flatten(0, 1))
    enc.eval()
    dec.eval()
    with torch.no_grad():  # what the denoiser will see, measured
        clips = data.make_clips(64, 1, fpb, cfg["size"], random.Random(st.seed + 99),
                                torch.Generator().manual_seed(st.seed + 99), device, switch_prob=0.0, vary_text=False)
        x = clips.frames.flatten(0, 1)
        z = enc(x)
        y = dec(z)
        mse = ((y - x) ** 2).mean().item()
        shape_mse = (((y - x) ** 2) * clips.alpha.flatten(0, 1)[:, None]).sum().item() / (
            3 * clips.alpha.sum().item() + 1e-6)
    log["ae_final"] = {"steps": step, "psnr": -10 * math.log10(max(mse / 4, 1e-10)),
                       "shape_psnr": -10 * math.log10(max(shape_mse / 4, 1e-10)),
                       "latent_mean": z.mean((0, 2, 3)).tolist(), "latent_std": z.std((0, 2, 3)).tolist()}
    say(f"autoencoder done: {step} steps, psnr {log['ae_final']['psnr']:.1f} dB "
        f"(shape pixels {log['ae_final']['shape_psnr']:.1f} dB), latent std {[round(v, 2) for v in log['ae_final']['latent_std']]}")
    return enc, dec, (x[:8], y[:8])


def tokenize(tok: WordTokenizer, prompts: list[list[str]], device) -> torch.Tensor:
    return torch.stack([torch.stack([tok(p) for p in clip]) for clip in prompts]).to(device)  # [B, K, L]


def sample_sigma(shape, cfg, gen_device) -> torch.Tensor:
    """Noise levels: mostly the exact levels inference steps through, else continuous (shifted uniform)."""
    sig = torch.tensor(flow_sigmas(cfg["steps"], cfg["shift"]), device=gen_device)
    discrete = sig[torch.randint(len(sig), shape, device=gen_device)]
    u = torch.rand(shape, device=gen_device)
    cont = cfg["shift"] * u / (1 + (cfg["shift"] - 1) * u)
    return torch.where(torch.rand(shape, device=gen_device) < 0.7, discrete, cont)


def shape_weights(alpha: torch.Tensor, b: int, k: int, latent_hw, weight: float) -> torch.Tensor:
    """alpha [B, K*T, H, W] shape coverage -> loss weights [B, K, 1, T, h, w]: 1 + weight where the shape is
    (its coverage per latent pixel, spread one latent pixel around, so the outline's neighbours count too)."""
    cov = F.adaptive_avg_pool2d(alpha.float().flatten(0, 1)[:, None], tuple(latent_hw))  # [B*K*T, 1, h, w]
    cov = F.max_pool2d(cov, 3, stride=1, padding=1)
    return 1 + weight * cov.view(b, k, -1, 1, *latent_hw).transpose(2, 3)


def save_weights(path: Path, text, dit, dec, meta: dict) -> None:
    from safetensors.torch import save_file

    sd = {}
    for prefix, m in (("text.", text), ("dit.", dit), ("decoder.", dec)):
        sd.update({prefix + k: v.detach().float().contiguous().cpu() for k, v in m.state_dict().items()})
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)


def train_denoiser(cfg, st: Settings, device, budget_s: float, enc, dec, log: dict, out: Path, meta: dict):
    text, dit, _ = build_models(cfg)
    text.to(device).train()
    dit.to(device).train()
    enc.eval()
    ema = {id(p): p.detach().clone() for m in (text, dit) for p in m.parameters()}
    params = [p for m in (text, dit) for p in m.parameters()]
    ema_list = [ema[id(p)] for p in params]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=st.lr, betas=(0.9, 0.99))
    tok = WordTokenizer(cfg["text"]["vocab_size"], cfg["text"]["max_tokens"])
    rng, gen = random.Random(st.seed + 1), torch.Generator().manual_seed(st.seed + 1)
    fpb, k = cfg["dit"]["frames"], st.blocks
    mask = block_mask(k, fpb * dit.tokens_per_frame, st.context, device)
    say(f"denoiser: {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M params, text encoder "
        f"{sum(p.numel() for p in text.parameters()) / 1e6:.2f}M; {st.batch} clips x {k} blocks a step, "
        f"context {st.context} blocks")
    t_start, step, last_ckpt = time.perf_counter(), 0, time.perf_counter()
    if st.dit_from or st.tf_from:  # trained already: its weights (live and EMA); stage 3 or more of stage 2
        from safetensors.torch import load_file

        sd = load_file(str(st.dit_from or st.tf_from))
        for prefix, m in (("text.", text), ("dit.", dit)):
            m.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        for p_ in params:
            ema[id(p_)].copy_(p_.detach())
        say(f"text encoder and denoiser from {st.dit_from or st.tf_from}")
    plan = StepPlan(0 if st.dit_from else st.max_steps, budget_s * (1 - st.rollout_share), st.fixed_steps,
                    "denoiser")
    last_sigma = flow_sigmas(cfg["steps"], cfg["shift"])[-1]

    def swap_ema():  # exchange live and EMA weights in place
        for p in params:
            e = ema[id(p)]
            tmp = p.detach().clone()
            p.data.copy_(e)
            e.copy_(tmp)

    def checkpoint(final: bool):
        swap_ema()
        save_weights(out / "demo_weights.safetensors", text, dit, dec, dict(meta, denoiser_steps=step, final=final))
        swap_ema()
        (out / "train_log.json").write_text(json.dumps(log, indent=1))  # so far, should the run be cut short

    while not plan.done(step):
        total = plan.total
        lr = lr_at(step, total, st.lr, st.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        clips = data.make_clips(st.batch, k, fpb, cfg["size"], rng, gen, device, switch_prob=st.switch_prob,
                                shape_only=st.shape_switch,
                                start_prob=st.start_prob)
        ids = tokenize(tok, clips.prompts, device)  # [B, K, L]
        b = ids.shape[0]
        with torch.no_grad(), autocast(device):
            z = enc(clips.frames.flatten(0, 1)).float()  # [B*K*T, C, h, w]
        z = z.view(b, k, fpb, *z.shape[1:]).transpose(2, 3)  # [B, K, C, T, h, w]
        sigma = sample_sigma((b, k), cfg, device)
        noise = torch.randn_like(z)
        sv = sigma.view(b, k, 1, 1, 1, 1)
        noisy = (1 - sv) * z + sv * noise
        ctx_std = st.context_noise * torch.rand(b, 1, 1, 1, 1, 1, device=device) * (
            torch.rand(b, 1, 1, 1, 1, 1, device=device) < 0.5)
        clean = z + ctx_std * torch.randn_like(z)
        with autocast(device):
            emb = text(ids.flatten(0, 1)).view(b, k, ids.shape[-1], -1)
            share = st.self_context * min(max((step / total - 0.1) / 0.2, 0.0), 1.0)  # ramps up from 10% to 30%
            if share > 0:
                # The model's own pictures as context, now and then: what it made of each block from the
                # last noise level inference steps from (its output is exactly such a one-step estimate).
                # Learning to continue those with the true next block keeps the stream from blurring or
                # fading as it feeds on itself, block after block.
                with torch.no_grad():
                    s_last = torch.full((b, k), last_sigma, device=device)
                    x_ctx = (1 - last_sigma) * z + last_sigma * torch.randn_like(z)
                    own = x_ctx - last_sigma * teacher_forced(dit, clean, x_ctx, s_last, emb.detach(), st.context,
                                                              mask).float()
                use = (torch.rand(b, device=device) < share).view(b, 1, 1, 1, 1, 1)
                clean = torch.where(use, own, clean)
            pred = teacher_forced(dit, clean, noisy, sigma, emb, st.context, mask)
        err = (pred.float() - (noise - z)) ** 2  # [B, K, C, T, h, w]
        if st.shape_weight > 0:
            err = err * shape_weights(clips.alpha, b, k, z.shape[-2:], st.shape_weight)
        per_block = err.mean((2, 3, 4, 5))  # [B, K]
        # A window from later in a session starts with blocks that, at inference, would have had context:
        # they only serve as context here. A session's own first blocks are learnt as they are.
        weight = (clips.start[:, None] | (torch.arange(k, device=device) >= st.context)[None]).float()
        loss = (per_block * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(st.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_list, [p.detach() for p in params], 1 - d)
        if step % 20 == 0:
            rec = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": float(gnorm),
                   "t": time.perf_counter() - t_start}
            for lo, hi, name in ((0.0, 0.6, "loss_sigma_lt_0.6"), (0.6, 1.01, "loss_sigma_ge_0.6")):
                sel = (sigma >= lo) & (sigma < hi) & (weight > 0)
                if sel.any():
                    rec[name] = per_block.detach()[sel].mean().item()
            log["dit"].append(rec)
        if step % 100 == 0:
            say(f"denoiser step {step}/{total} loss {loss.item():.4f} lr {lr:.2e} "
                f"({(step + 1) * b / max(time.perf_counter() - t_start, 1e-6):.0f} clips/s)")
        if time.perf_counter() - last_ckpt > st.checkpoint_s:
            checkpoint(final=False)
            last_ckpt = time.perf_counter()
        step += 1
    log["dit_final"] = {"steps": step, "seconds": time.perf_counter() - t_start}
    if st.rollout_share > 0:
        if not st.dit_from:  # stage 2's result (EMA), to try stage 3 again from it with --dit-from
            swap_ema()
            save_weights(out / "teacher_forced.safetensors", text, dit, dec, dict(meta, denoiser_steps=step))
            swap_ema()
        log["dit_final"]["rollout"] = train_rollouts(
            cfg, st, device, budget_s - (time.perf_counter() - t_start), enc, dec, text, dit, tok, opt, params,
            ema_list, mask, log, checkpoint, swap_ema, out, meta)
    swap_ema()  # keep the EMA weights
    text.eval()
    dit.eval()
    return text, dit


def train_rollouts(cfg, st: Settings, device, budget_s: float, enc, dec, text, dit, tok, opt, params, ema_list,
                   mask, log: dict, checkpoint, swap_ema, out: Path, meta: dict) -> dict:
    """Stage 3, Self-Forcing style, streaming: a pool of `rollout_batch` sessions plays on from step to step,
    each at its own point of its stream (PoolCache: the node's rolling cache, batched), and each training
    step generates ONE more block of every session through the KV cache with the model's own blocks as
    context, so a step costs one block, not a whole rollout, and the model trains on the states a long stream
    reaches (edge wrap-arounds every few seconds, prompt switches, blocks hundreds deep). Sessions end after a
    random length and start again (a fresh session: no context, shape centred), so starts are trained too.

    Self-Forcing's gradient: one denoising step of each new block, picked at random (`rollout_step_probs`),
    with gradient, from the state the model's own no-grad chain reached (the cache, written with no gradient,
    is the model's own). The target, where Self-Forcing has a teacher's score (DMD), is an expert that knows
    what the frame must show, the data generator: it reads where the model's last frame put the shape
    (decoded, circular centroid; the centre when the model's frame has no shape, as at a session's start) and
    renders the next block from there with the session's current prompt. So the model learns to continue its own picture
    cleanly: keep the shape whole, move it on, wrap it round the edge, bring a lost shape back, take a new
    prompt at once. A teacher-forced batch rides along (weight `rollout_tf`) so the clean pass that writes
    the cache keeps being trained.

    With `rollout_renoise`, that share of sessions trains instead on the expert's block noised afresh at a
    sampled level, by flow matching as stage 2 does, but with the pool's cache, the model's own stream, as
    context: the denoising the sampler needs stays that of a flow model (a chain step's target is not the
    posterior of its input, and the second run lost its denoising, teacher-forcing loss 0.03 -> 0.18), while
    the context is what a long stream gives it.

    The loss on that step's x0 estimate: latent MSE against the expert's encoded block (`rollout_latent`,
    the shape's latents 5x), a pixel loss through the frozen decoder (`rollout_pixel`: the frame is what is
    judged; the shape and a ring round it weigh 9x, so a smeared edge costs), and a position loss on the
    decoded shape's soft centroid (`rollout_pos`). The model cannot read its own last frame's centroid to a
    pixel, so a target drawn exactly where the motion says is a pixel or two off where it would draw the shape:
    MSE then pays for a blur over the places it might be (the second run's blobs, bench/RESULTS.md). With
    `rollout_align_px` the expert draws where the model's own block put the shape, up to that many px from
    where the motion says, and the position loss (which moves the shape, not smears it) pulls it to the
    right place."""
    rng, gen = random.Random(st.seed + 2), torch.Generator(device="cpu").manual_seed(st.seed + 2)
    fpb, size, steps = cfg["dit"]["frames"], cfg["size"], cfg["steps"]
    h, w = size
    k_tf = st.blocks
    bg_tab = torch.tensor(list(data.BACKGROUNDS.values()), device=device)
    vel_tab = torch.tensor(list(data.MOTIONS.values()), device=device) * data.SPEED * (w / 128.0)
    plan = StepPlan(st.rollout_max_steps, budget_s, st.rollout_fixed, "rollouts")
    b = st.rollout_batch
    lo, hi = st.rollout_life
    step_probs = torch.tensor(st.rollout_step_probs, device=device)
    say(f"rollouts: a pool of {b} streaming sessions, one block each a step, sessions {lo}-{hi} blocks long, "
        f"switch p {st.rollout_switch} a block, lr {st.rollout_lr}, teacher-forced batch {st.rollout_tf_batch}; "
        f"renoised share {st.rollout_renoise}; loss latent {st.rollout_latent} flow {st.rollout_flow} pixel "
        f"{st.rollout_pixel} pos {st.rollout_pos}, align "
        f"{st.rollout_align_px} px, step odds {[round(v, 3) for v in st.rollout_step_probs]}")
    # A fresh optimizer: the teacher-forcing stage's second moments are those of its small late gradients, so
    # Adam would take steps many times the learning rate on the rollouts' larger ones (the first run here did,
    # and lost the picture: bench/RESULTS.md).
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=st.rollout_lr, betas=(0.9, 0.99))
    kinds, kind_w = zip(*SWITCH_KINDS)
    need_pixels = st.rollout_pixel > 0 or st.rollout_pos > 0

    def fresh():
        return data.sample_attrs(1, 1, rng, 0.0)[0][0]

    def encode(frames):  # [B, T, 3, H, W] -> [B, C, T, h, w]
        with torch.no_grad(), autocast(device):
            z = enc(frames.flatten(0, 1)).float()
        return z.view(frames.shape[0], frames.shape[1], *z.shape[1:]).transpose(1, 2)

    def decode(x):  # [B, C, T, h, w] -> [B, T, 3, H, W]
        y = dec(x.transpose(1, 2).flatten(0, 1)).float()
        return y.view(x.shape[0], x.shape[2], *y.shape[1:])

    def latent_weight(alpha):  # [B, T, H, W] -> [B, 1, T, h, w]: the shape's latents count 5x
        a = F.avg_pool2d(alpha, 8)  # area share per latent pixel
        a = F.max_pool2d(a, 3, 1, 1)  # and its neighbours (the decoder's receptive field)
        return (1 + 4 * a)[:, None]

    # the pool's state
    cache = PoolCache(dit, cfg["cache_blocks"], steps, cfg["shift"], b, device)
    attrs = [fresh() for _ in range(b)]
    prompts = [data.describe(a, rng) for a in attrs]
    ids = torch.stack([tok(p) for p in prompts]).to(device)  # [B, L]
    age = [0] * b
    life = [rng.randint(1, hi) for _ in range(b)]  # the first lives staggered, so starts are spread out
    last_switch = [-10] * b
    pos = torch.tensor([[w / 2, h / 2]], device=device).repeat(b, 1)
    lost = torch.zeros(b, dtype=torch.bool, device=device)  # the session's last frame had no shape
    centre0 = torch.tensor([[w / 2, h / 2]], device=device)
    wh = torch.tensor([float(w), float(h)], device=device)
    frame_steps = torch.arange(fpb, device=device, dtype=torch.float32)[None, :, None]  # [1, T, 1]

    def advance(train: bool):
        """One block of every session; returns (per-session loss terms or None, shape-found [B], distance [B]
        of the model's shape from where the motion says)."""
        nonlocal ids, pos, lost
        restart = []
        for i in range(b):  # session ends and prompt switches (a user editing the prompt)
            if age[i] >= life[i]:
                attrs[i], age[i], life[i], last_switch[i] = fresh(), 0, rng.randint(lo, hi), -10
                prompts[i] = data.describe(attrs[i], rng)
                ids[i] = tok(prompts[i]).to(device)
                restart.append(i)
            elif age[i] - last_switch[i] > 3 and rng.random() < st.rollout_switch:
                kind = rng.choices(kinds, kind_w)[0]
                while True:
                    nb = fresh() if kind == "everything" else dict(attrs[i], **{kind: fresh()[kind]})
                    if nb != attrs[i] and (nb["colour"], nb["background"]) not in data.CLASHES:
                        break
                attrs[i], last_switch[i] = nb, age[i]
                prompts[i] = data.describe(nb, rng)
                ids[i] = tok(prompts[i]).to(device)
        start_now = torch.tensor([a == 0 for a in age], device=device)
        if restart:
            r = torch.zeros(b, dtype=torch.bool, device=device)
            r[restart] = True
            cache.restart(r)
        mi = torch.tensor([data.NAMES["motion"].index(a["motion"]) for a in attrs], device=device)
        bgi = torch.tensor([data.NAMES["background"].index(a["background"]) for a in attrs], device=device)
        bg = bg_tab[bgi]
        vel = vel_tab[mi]  # [B, 2] px a frame
        # Where frame 0 must show the shape: moved on from where the model's last frame had it; a fresh session
        # or one whose last frame lost it draws it at the centre, as a session with nothing before it does (a
        # place the model can tell from its context: the expert's own tracking of a lost shape it cannot).
        want0 = torch.where((start_now | lost)[:, None], centre0, (pos + vel) % wh)
        cache.begin_block()
        terms = None
        with autocast(device):
            emb = text(ids) if train else None
            emb_ng = emb.detach() if train else text(ids).detach()
            with torch.no_grad():
                chain = cache.denoise(torch.randn(b, dit.channels, fpb, *dit.size, device=device), emb_ng)
                block = chain[-1]
                own = decode(block)  # [B, T, 3, H, W]: the model's own frames
                got0, found0 = shape_centres(own[:, 0], bg, want0, with_ok=True)
                # sessions whose step is the expert's block noised afresh (flow matching on the model's own
                # context), the others a step of the model's own chain (Self-Forcing)
                renoise = torch.rand(b, device=device) < st.rollout_renoise
                start = torch.where(renoise[:, None], want0,
                                    expert_start(want0, got0, found0, st.rollout_align_px, size))
            frames, alpha, centre = data.render([[a] for a in attrs], fpb, size, start, device)
            if train:
                target = encode(frames)
                j = torch.multinomial(step_probs, b, replacement=True)  # the step that gets the gradient
                x_j = torch.stack(chain[:steps])[j, torch.arange(b, device=device)]
                sig = torch.tensor(cache.sigmas[:steps], device=device)[j]
                noise = torch.randn_like(target)
                s_rn = sample_sigma((b,), cfg, device)
                x_rn = (1 - s_rn.view(b, 1, 1, 1, 1)) * target + s_rn.view(b, 1, 1, 1, 1) * noise
                x_in = torch.where(renoise.view(b, 1, 1, 1, 1), x_rn, x_j)
                sig = torch.where(renoise, s_rn, sig)
                flow = cache.flow(x_in, sig, emb).float()
                x0 = x_in - sig.view(b, 1, 1, 1, 1) * flow
                lw = latent_weight(alpha)
                terms = {"latent": ((x0 - target) ** 2 * lw).mean((1, 2, 3, 4)) * ~renoise,
                         "flow": ((flow - (noise - target)) ** 2 * lw).mean((1, 2, 3, 4)) * renoise}
                shares[0] = {"latent": 1 - renoise.float().mean().item(), "flow": renoise.float().mean().item()}
                if need_pixels:
                    y = decode(x0)  # [B, T, 3, H, W], through the frozen decoder
                    err = y - frames
                    wpx = 1 + 8 * F.max_pool2d(alpha, 5, 1, 2)[:, :, None]  # the shape and a 2-px ring round it
                    terms["pixel"] = (wpx * (err.abs() + err * err)).mean((1, 2, 3, 4))
                    if st.rollout_pos > 0:
                        want = (want0[:, None] + vel[:, None] * frame_steps) % wh  # [B, T, 2]
                        sc = soft_centres(y.flatten(0, 1), bg.repeat_interleave(fpb, 0)).view(b, fpb, 2)
                        # a shape far off (a lost one) is the pixel loss's to bring back: no pull beyond 8 px
                        d = wrap_delta(sc - want, size).clamp(-8.0, 8.0)
                        terms["pos"] = F.smooth_l1_loss(d, torch.zeros_like(d), reduction="none", beta=1.0).sum(-1).mean(1) * found0
            with torch.no_grad():
                cache.write(block, emb_ng)
                pos, found = shape_centres(own[:, -1], bg, centre[:, -1], with_ok=True)
                lost = ~found
                d = wrap_delta(got0 - want0, size).norm(dim=-1)
        for i in range(b):
            age[i] += 1
        last_frames[0] = own[:, -1]
        return terms, found, d

    weights_of = {"latent": st.rollout_latent, "flow": st.rollout_flow, "pixel": st.rollout_pixel,
                  "pos": st.rollout_pos}
    last_frames = [None]  # the pool's last frames, [B, 3, H, W]
    shares = [{}]  # the share of sessions each loss term had in the last step (the log shows their own mean)

    def pool_readings(n: int = 256) -> dict:
        """What the frame analyser reads in the pool's last frames (up to n sessions): the share that show the
        prompt's shape, and that show it all (colour, shape, size, background), as the bench asks."""
        import frame_analyser as fa

        x = last_frames[0][:n]
        u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        got = fa.analyse_batch(u8, chunk=128)
        right = [fa.matches(f, a) for f, a in zip(got, attrs[:n])]
        return {"pool_shape_ok": sum(r["shape"] for r in right) / len(right),
                "pool_right": sum(all(r.values()) for r in right) / len(right)}
    probes = probe_sessions_for(st)
    best = {"score": -float("inf")}
    t_probe = [time.perf_counter()]

    def probe(step: int, final: bool = False) -> None:
        """The EMA weights' streams, scored as the bench scores them; the best so far is kept."""
        if not probes:
            return
        import demo_stream_probe as sp

        t0 = time.perf_counter()
        swap_ema()
        try:
            with torch.no_grad():
                frames = sp.render_streams(text, dit, dec, tok, PoolCache, cfg, probes,
                                           int(st.probe_seconds * cfg["fps"]) // fpb, device)
            res = sp.score(frames, probes, device)
            rec = {"step": step, "t": time.perf_counter() - t_start, "final": final,
                   **{k: v for k, v in res.items() if k != "sessions"},
                   "held_per_session": [round(r["held"], 3) for r in res["sessions"]]}
            log.setdefault("probe", []).append(rec)
            if res["score"] > best["score"]:
                best.update(score=res["score"], step=step, held=res["held"], blank_share=res["blank_share"])
                save_weights(out / "demo_weights_best.safetensors", text, dit, dec,
                             dict(meta, rollout_step=step, probe=best, final=False))
        except Exception as exc:  # a broken probe must not cost the run: say so, train on without it
            import traceback

            traceback.print_exc()
            log["probe_error"] = repr(exc)
            probes.clear()
            return
        finally:
            swap_ema()
        t_probe[0] = time.perf_counter()
        say(f"probe at step {step}: score {res['score']:.3f} held {res['held'] * 100:.1f}% (min "
            f"{res['held_min'] * 100:.0f}%) blank {res['blank_share'] * 100:.2f}% switches {res['switch_blocks']} "
            f"({time.perf_counter() - t0:.1f} s){' best' if best['step'] == step else ''}")

    t_b = time.perf_counter()
    with torch.no_grad():
        for _ in range(st.rollout_burn_in):  # the pool plays a while first: sessions at all depths
            advance(False)
    say(f"rollouts: pool burnt in over {st.rollout_burn_in} blocks in {time.perf_counter() - t_b:.1f} s")
    t_start, step = time.perf_counter(), 0
    probe(0)  # the start's score (its time, as every probe's, is inside the budget)
    while not plan.done(step):
        total = plan.total
        lr = lr_at(step, total, st.rollout_lr, min(50, max(total // 10, 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        terms, found, derr = advance(True)
        loss_r = sum(weights_of[k] * v.mean() for k, v in terms.items())
        # teacher forcing alongside
        clips = data.make_clips(st.rollout_tf_batch, k_tf, fpb, size, rng, gen, device,
                                switch_prob=st.switch_prob, start_prob=st.start_prob)
        tids = tokenize(tok, clips.prompts, device)
        bt = tids.shape[0]
        with torch.no_grad(), autocast(device):
            zz = enc(clips.frames.flatten(0, 1)).float()
        zz = zz.view(bt, k_tf, fpb, *zz.shape[1:]).transpose(2, 3)
        sigma = sample_sigma((bt, k_tf), cfg, device)
        noise = torch.randn_like(zz)
        sv = sigma.view(bt, k_tf, 1, 1, 1, 1)
        with autocast(device):
            temb = text(tids.flatten(0, 1)).view(bt, k_tf, tids.shape[-1], -1)
            pred = teacher_forced(dit, zz, (1 - sv) * zz + sv * noise, sigma, temb, st.context, mask)
        per_block = ((pred.float() - (noise - zz)) ** 2).mean((2, 3, 4, 5))
        weight = (clips.start[:, None] | (torch.arange(k_tf, device=device) >= st.context)[None]).float()
        loss_tf = (per_block * weight).sum() / weight.sum()
        loss = loss_r + st.rollout_tf * loss_tf
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_list, [p.detach() for p in params], 1 - st.rollout_ema)
        if step % 10 == 0:
            rec = {"step": step, "loss": loss_r.item(), "loss_tf": loss_tf.item(), "lr": lr,
                   "grad_norm": float(gnorm), "t": time.perf_counter() - t_start,
                   "blank_share": 1.0 - found.float().mean().item(), "pos_err_px": derr.mean().item(),
                   "mean_age": sum(age) / b, **{f"loss_{k}": v.mean().item() / max(shares[0].get(k, 1.0), 1e-6) for k, v in terms.items()
                      if shares[0].get(k, 1.0) > 0},
                   **pool_readings(256 if device.type == "cuda" else 16)}
            log["rollout"].append(rec)
        if step % 100 == 0:
            r = log["rollout"][-10:]
            parts = " ".join(f"{k} {sum(x['loss_' + k] for x in r if 'loss_' + k in x) / sum('loss_' + k in x for x in r):.4f}"
                             for k in terms if any("loss_" + k in x for x in r))
            say(f"rollout step {step}/{total} loss {sum(x['loss'] for x in r) / len(r):.4f} ({parts}) tf "
                f"{sum(x['loss_tf'] for x in r) / len(r):.4f} no shape {100 * sum(x['blank_share'] for x in r) / len(r):.1f}% "
                f"pos err {sum(x['pos_err_px'] for x in r) / len(r):.1f} px, pool frames right "
                f"{100 * sum(x['pool_right'] for x in r) / len(r):.0f}% (shape {100 * sum(x['pool_shape_ok'] for x in r) / len(r):.0f}%) lr {lr:.2e}")
        if step % 500 == 499:
            checkpoint(final=False)
        step += 1
        if st.probe_every_s and time.perf_counter() - t_probe[0] > st.probe_every_s:
            t0 = time.perf_counter()
            probe(step)
            if plan.mark:  # the step plan's pace is that of training steps, not probes
                plan.mark = (plan.mark[0], plan.mark[1] + time.perf_counter() - t0)
    if not log.get("probe") or log["probe"][-1]["step"] != step:
        probe(step, final=True)
    return {"steps": step, "seconds": time.perf_counter() - t_start, "sessions": b,
            "blocks_per_step": 1, "burn_in": st.rollout_burn_in, "life": [lo, hi],
            "best_probe": best if probes else None}


def probe_sessions_for(st: Settings):
    """The probe's streams (tools/demo_stream_probe.py), none when probing is off."""
    if not st.probe_every_s:
        return []
    import demo_stream_probe as sp

    sessions = sp.probe_sessions()
    return [sessions[0], sessions[-1]] if st.probe_seconds <= 1 else sessions  # tiny: one of each kind


def fit_encoder(cfg, st: Settings, device, budget_s: float, weights: Path, log: dict):
    """An encoder for a trained decoder: stage 3 from shipped weights needs latents of their decoder's space
    (the encoder that made it is not shipped). The decoder stays frozen; the encoder learns to give latents
    it decodes to the frame (the autoencoder's loss), and, anchoring it to the space the denoiser was trained
    in, to give back the denoiser's own latents from their decoded frames (a cycle term on blocks the
    shipped model generates)."""
    from safetensors.torch import load_file

    sd = load_file(str(weights))
    text, dit, dec = build_models(cfg)
    for prefix, m in (("text.", text), ("dit.", dit), ("decoder.", dec)):
        m.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    for m in (text, dit, dec):
        m.to(device).eval().requires_grad_(False)
    dcfg, fpb = cfg["decoder"], cfg["dit"]["frames"]
    tok = WordTokenizer(cfg["text"]["vocab_size"], cfg["text"]["max_tokens"])
    rng, gen = random.Random(st.seed + 5), torch.Generator().manual_seed(st.seed + 5)
    # blocks of the denoiser's own, a few deep into their streams
    nb, blocks = (8, 3) if st.fixed_steps or device.type == "cpu" else (256, 6)
    pool = PoolCache(dit, cfg["cache_blocks"], cfg["steps"], cfg["shift"], nb, device)
    attrs = [a[0] for a in data.sample_attrs(nb, 1, rng, 0.0)]
    ids = torch.stack([tok(data.describe(a, rng)) for a in attrs]).to(device)
    own = []
    with torch.no_grad(), autocast(device):
        emb = text(ids)
        for _ in range(blocks):
            pool.begin_block()
            x = pool.denoise(torch.randn(nb, dit.channels, fpb, *dit.size, device=device), emb)[-1]
            pool.write(x, emb)
            own.append(x.float().transpose(1, 2).flatten(0, 1))  # [nb*T, C, h, w]
        own = torch.cat(own)
        own_img = dec(own).float().clamp(-1, 1)
    enc = Encoder(dcfg["channels"], 64, dcfg["upsample"], norm=False, padding=dcfg.get("padding", "zeros")).to(device)
    opt = torch.optim.AdamW(enc.parameters(), lr=st.ae_lr, weight_decay=0.0)
    plan = StepPlan(st.ae_max_steps, budget_s, st.fixed_steps, "encoder")
    t_start, step = time.perf_counter(), 0
    log["enc"] = []
    while not plan.done(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, plan.total, st.ae_lr, 50)
        clips = data.make_clips(st.ae_batch // fpb, 1, fpb, cfg["size"], rng, gen, device, switch_prob=0.0,
                                vary_text=False)
        x, a = clips.frames.flatten(0, 1), clips.alpha.flatten(0, 1)[:, None]
        sel = torch.randint(own.shape[0], (st.ae_batch // 2,), device=device)
        with autocast(device):
            y = dec(enc(x))
            zc = enc(own_img[sel])
        err = y.float() - x
        wgt = 1 + 8 * a
        rec = (wgt * err.abs()).mean() + (wgt * err * err).mean()
        cyc = ((zc.float() - own[sel]) ** 2).mean()
        loss = rec + 0.5 * cyc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            log["enc"].append({"step": step, "loss": loss.item(), "rec": rec.item(), "cycle": cyc.item(),
                               "t": time.perf_counter() - t_start})
        if step % 500 == 0:
            say(f"encoder step {step}/{plan.total} rec {rec.item():.4f} cycle {cyc.item():.4f}")
        step += 1
    enc.eval()
    with torch.no_grad():
        clips = data.make_clips(64, 1, fpb, cfg["size"], random.Random(st.seed + 99),
                                torch.Generator().manual_seed(st.seed + 99), device, switch_prob=0.0, vary_text=False)
        x = clips.frames.flatten(0, 1)
        z = enc(x)
        y = dec(z)
        mse = ((y - x) ** 2).mean().item()
        shape_mse = (((y - x) ** 2) * clips.alpha.flatten(0, 1)[:, None]).sum().item() / (
            3 * clips.alpha.sum().item() + 1e-6)
        cyc = ((enc(own_img) - own) ** 2).mean().item()
    log["ae_final"] = {"encoder_fitted_to": str(weights), "steps": step,
                       "psnr": -10 * math.log10(max(mse / 4, 1e-10)),
                       "shape_psnr": -10 * math.log10(max(shape_mse / 4, 1e-10)), "cycle_mse": cyc,
                       "latent_mean": z.mean((0, 2, 3)).tolist(), "latent_std": z.std((0, 2, 3)).tolist()}
    say(f"encoder fitted to {weights.name}'s decoder: {step} steps, psnr {log['ae_final']['psnr']:.1f} dB (shape "
        f"{log['ae_final']['shape_psnr']:.1f} dB), cycle mse {cyc:.4f}, latent std "
        f"{[round(v, 2) for v in log['ae_final']['latent_std']]}")
    dec.requires_grad_(False)
    return enc, dec


# -- outputs -------------------------------------------------------------------------------------------------------
def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ae", "autoencoder (weighted L1 + L2)", ("loss",)),
              ("enc", "encoder fitted to the decoder", ("loss", "rec", "cycle")),
              ("dit", "denoiser, teacher forcing (flow-matching MSE)", ("loss", "loss_sigma_lt_0.6", "loss_sigma_ge_0.6")),
              ("rollout", "denoiser on its own streams (vs the expert)", ("loss", "loss_latent", "loss_flow",
                                                                          "loss_pixel", "loss_pos", "loss_tf")),
              ("rollout", "the streaming pool: its own last frames", ("blank_share", "pool_right", "pool_shape_ok",
                                                                      "pos_err_px")),
              ("probe", "stream probe (EMA weights, bench rules)", ("held", "held_min", "blank_share"))]
    panels = [p for p in panels if log.get(p[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, title, names) in zip(axes[0], panels):
        recs = log[key]
        for name in names:
            pts = [(r["step"], r[name]) for r in recs if name in r]
            if pts:
                if name == "pos_err_px":
                    ax2 = ax.twinx()
                    ax2.plot(*zip(*pts), color="C1", lw=0.8, label="shape's distance from the expert's (px)")
                    ax2.set_ylabel("px")
                    ax2.legend(loc="upper right")
                else:
                    ax.plot(*zip(*pts), lw=1 if name == "loss" else 0.8, marker="o" if key == "probe" else None,
                            label={"loss": "all", "blank_share": "share with no shape", "held": "seconds held",
                                   "pool_right": "share right (bench rule)", "pool_shape_ok": "share of the right shape",
                                   "held_min": "seconds held, worst stream"}.get(name, name.replace("loss_", "")))
        if "blank_share" not in names:
            ax.set_yscale("log")
        ax.legend(loc="upper center" if "blank_share" in names else "upper right", fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("rollout step" if key in ("rollout", "probe") else "step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


EVAL_PROMPTS = [
    "a red circle moving left on a dark blue background",
    "a big blue square moving right on a black background",
    "a small yellow triangle moving up on a grey background",
    "a green circle moving down on a black background",
    "a big white square on a green background",
    "a purple triangle moving left on a white background",
]
EVAL_CHANGE = ("a red circle moving right on a black background", "a big blue square moving down on a grey background")


def evaluate(graph: Path, weights: Path, out: Path, blocks: int, log: dict, prompts: int | None = None) -> None:
    """The shipped path: the graph's own nodes on the CPU, eager, reading the weights file."""
    import numpy as np

    from reactor_graph.loop import Engine
    from reactor_graph.plan import load_plan

    path = data.graph_with_weights(graph, weights, out / "eval_graph.yaml", device="cpu")
    engine = Engine(load_plan(path), device="cpu", compile="eager").load()
    rows, scores = [], []
    for prompt in EVAL_PROMPTS[:prompts]:
        a = data.parse_prompt(prompt)
        t0 = time.perf_counter()
        frames = data.run_prompt(engine, prompt, blocks)
        ms = (time.perf_counter() - t0) / blocks * 1000
        late = frames[len(frames) // 2:]
        share = float(np.mean([data.shape_colour_share(f, a["colour"]) for f in late]))
        bg = float(np.mean([data.background_name(f) == a["background"] for f in late]))
        fill = float(np.nanmean([data.fill_ratio(data.foreground(f)) for f in late]))
        dx, dy = data.motion_of(frames[2:])
        scores.append({"prompt": prompt, "colour_share": share, "background_ok": bg, "fill_ratio": fill,
                       "motion_px_per_frame": [dx, dy], "cpu_ms_per_block": ms})
        rows.append((prompt, frames))
    first, second = EVAL_CHANGE
    frames = data.run_prompt(engine, first, blocks, changes={blocks // 2 - 1: second})
    after = frames[(blocks // 2 + 1) * 2:]  # from the second block after the change
    scores.append({"prompt": f"{first} -> {second} after block {blocks // 2 - 1}",
                   "colour_share_after": float(np.mean([data.shape_colour_share(f, "blue") for f in after])),
                   "colour_share_before": float(np.mean([data.shape_colour_share(f, "red")
                                                         for f in frames[2:blocks]]))})
    rows.append((f"{first} -> {second}", frames))
    log["eval"] = scores
    for s in scores:
        say("eval: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, len(rows[0][1]))
    idx = np.linspace(0, len(rows[0][1]) - 1, cols).round().astype(int)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 1.6, len(rows) * 1.8))
    for r, (prompt, frames) in enumerate(rows):
        for c, i in enumerate(idx):
            ax = axes[r, c]
            ax.imshow(frames[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {i}", fontsize=7)
        axes[r, 0].set_ylabel("\n".join(prompt[i:i + 28] for i in range(0, len(prompt), 28)), fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--graph", type=Path, default=ROOT / "graphs" / "demo.yaml", help="graph whose sizes to train")
    ap.add_argument("--minutes", type=float, default=None, help="training wall-clock budget (8.5; tiny: 0.5)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: a few steps of everything, < 60 s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None, help="clips per denoiser step (64; tiny: 2)")
    ap.add_argument("--ae-batch", type=int, default=None, help="frames per autoencoder step (64; tiny: 4)")
    ap.add_argument("--blocks", type=int, default=None, help="blocks per training clip (6; tiny: 3)")
    ap.add_argument("--steps", type=int, default=None, help="fix the denoiser's step count (else from the budget)")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--self-context", type=float, default=0.5,
                    help="share of clips whose context is the model's own estimate (after a ramp)")
    ap.add_argument("--rollout-share", type=float, default=0.45,
                    help="share of the denoiser's budget for stage 3, training on its own rollouts (0: none)")
    ap.add_argument("--rollout-batch", type=int, default=512, help="sessions in the streaming pool (stage 3)")
    ap.add_argument("--rollout-tf-batch", type=int, default=32, help="teacher-forced clips alongside each stage-3 step")
    ap.add_argument("--rollout-steps", type=int, default=None, help="fix stage 3's step count (else the budget)")
    ap.add_argument("--rollout-burn-in", type=int, default=48, help="blocks the pool plays before stage 3 trains")
    ap.add_argument("--rollout-lr", type=float, default=1e-4)
    ap.add_argument("--rollout-life", default="16,320", help="a pool session's length in blocks: min,max (uniform)")
    ap.add_argument("--rollout-switch", type=float, default=0.04,
                    help="a pool session's chance of a prompt switch at each block (0.04: about every 3 s)")
    ap.add_argument("--rollout-latent", type=float, default=1.0, help="stage 3: weight of the latent x0 MSE")
    ap.add_argument("--rollout-pixel", type=float, default=0.0,
                    help="stage 3: weight of a pixel loss through the frozen decoder (shape pixels and their "
                         "surroundings weigh 9x)")
    ap.add_argument("--rollout-pos", type=float, default=0.0,
                    help="stage 3: weight of a position loss (px, Huber) on the decoded shape's soft centroid")
    ap.add_argument("--rollout-align-px", type=float, default=0.0,
                    help="stage 3: the expert draws its target where the model's own block put the shape, up to "
                         "this many px from where the motion says (0: always where the motion says)")
    ap.add_argument("--rollout-renoise", type=float, default=0.0,
                    help="stage 3: share of sessions whose step is the expert's block noised afresh at a sampled "
                         "level (flow matching with the model's own streams as context) instead of a step of "
                         "the model's own chain")
    ap.add_argument("--rollout-flow", type=float, default=1.0,
                    help="stage 3: weight of the flow-matching MSE of those sessions (shape latents 5x)")
    ap.add_argument("--rollout-step-probs", default=None,
                    help="stage 3: odds of each denoising step getting the gradient, e.g. 0.1,0.2,0.3,0.4 (even)")
    ap.add_argument("--probe-every", type=float, default=60.0,
                    help="stage 3: seconds between stream probes (tools/demo_stream_probe.py; the best EMA "
                         "weights by it go to demo_weights_best.safetensors); 0: none")
    ap.add_argument("--probe-seconds", type=int, default=20, help="length of each probe stream")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="hard wall-clock limit for the whole run (the budget is cut to end and save in it)")
    ap.add_argument("--enc-from", type=Path, default=None,
                    help="with --init-from: autoencoder.pt of an earlier --init-from run (its fitted encoder)")
    ap.add_argument("--enc-only", action="store_true", help="with --init-from: fit the encoder, write it, stop")
    ap.add_argument("--ae-share", type=float, default=0.15, help="share of the budget for the autoencoder")
    ap.add_argument("--ae-from", type=Path, default=None,
                    help="autoencoder.pt of an earlier run: skip stage 1 (e.g. two calls of a few minutes)")
    ap.add_argument("--dit-from", type=Path, default=None,
                    help="teacher_forced.safetensors of an earlier run (with --ae-from): stage 3 only")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="trained demo weights (e.g. graphs/demo_weights.safetensors): fit an encoder to their "
                         "decoder (--enc-seconds), then stage 3 alone from their text encoder and denoiser")
    ap.add_argument("--tf-continue", action="store_true",
                    help="with --init-from: continue stage 2 (teacher forcing) from its weights instead of stage 3")
    ap.add_argument("--shape-weight", type=float, default=0.0,
                    help="stage 2: extra loss weight of the latents under the shape (Settings says why)")
    ap.add_argument("--shape-switch", type=float, default=0.0,
                    help="stage 2: share of clips whose switch changes the shape only")
    ap.add_argument("--enc-seconds", type=float, default=45.0, help="encoder fitting time with --init-from")
    ap.add_argument("--ae-only", action="store_true", help="stage 1 only (all of --minutes); see --ae-from")
    ap.add_argument("--ae-lr", type=float, default=1e-3)
    ap.add_argument("--no-eval", action="store_true", help="skip the CPU evaluation through the engine")
    ap.add_argument("--eval-weights", type=Path, default=None,
                    help="no training: the CPU evaluation (samples.png, eval.json) of this weights file")
    ap.add_argument("--eval-blocks", type=int, default=None, help="blocks per evaluation stream (12; tiny: 3)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.eval_weights:  # a sample sheet of weights made earlier (e.g. on the GPU), through the engine
        args.out.mkdir(parents=True, exist_ok=True)
        log = {"weights": str(args.eval_weights)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nan means of frames with no shape
            evaluate(args.graph, args.eval_weights, args.out, args.eval_blocks or 12, log)
        (args.out / "eval.json").write_text(json.dumps(log, indent=1))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = graph_config(args.graph)
    st = Settings(args, cfg)
    budget = st.minutes * 60
    if args.max_seconds:  # what is left after the saving, the plots and the last probe must fit the limit
        budget = min(budget if args.minutes is not None else float("inf"), args.max_seconds - 30.0)
        st.minutes = budget / 60
    say(f"training {args.graph.name} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, budget {st.minutes:.1f} min, seed {st.seed}")
    log = {"config": {k: v for k, v in cfg.items()}, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(st).items()}, "ae": [], "dit": [], "rollout": [],
           "device": str(device), "torch": torch.__version__}
    meta = {"made_by": "tools/train_demo.py", "seed": st.seed, "minutes": st.minutes, "graph": args.graph.name,
            "config": cfg, "prefixes": {"text_encoder": "text.", "causal_denoiser": "dit.", "latent_decoder": "decoder."}}

    if args.init_from and args.enc_from:  # an encoder fitted to this decoder already
        enc = Encoder(cfg["decoder"]["channels"], 64, cfg["decoder"]["upsample"], norm=False,
                      padding=cfg["decoder"]["padding"])
        _, _, dec = build_models(cfg)
        ae = torch.load(args.enc_from, map_location="cpu", weights_only=True)
        enc.load_state_dict(ae["encoder"])
        dec.load_state_dict(ae["decoder"])
        from safetensors.torch import load_file

        shipped = {k[len("decoder."):]: v for k, v in load_file(str(args.init_from)).items() if k.startswith("decoder.")}
        if any(not torch.equal(shipped[k], v) for k, v in dec.state_dict().items()):
            raise SystemExit(f"{args.enc_from}'s decoder is not {args.init_from}'s: fit the encoder again")
        enc.to(device).eval()
        dec.to(device).eval().requires_grad_(False)
        log["ae_final"] = {"encoder_from": str(args.enc_from), "fitted_to": str(args.init_from)}
        meta["initialised_from"] = str(args.init_from.name)
        say(f"encoder from {args.enc_from}")
    elif args.init_from:  # from trained weights: an encoder for their decoder, then stage 3 alone
        enc, dec = fit_encoder(cfg, st, device, args.enc_seconds, args.init_from, log)
        torch.save({"encoder": enc.state_dict(), "decoder": dec.state_dict()}, args.out / "autoencoder.pt")
        meta["initialised_from"] = str(args.init_from.name)
        if args.enc_only:
            (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
            say(f"wrote {args.out / 'autoencoder.pt'}")
            return 0
    elif args.ae_from:  # stage 1 done already (e.g. in an earlier run): all the budget goes to stage 2
        enc = Encoder(cfg["decoder"]["channels"], 64, cfg["decoder"]["upsample"], padding=cfg["decoder"]["padding"])
        _, _, dec = build_models(cfg)
        ae = torch.load(args.ae_from, map_location="cpu", weights_only=True)
        enc.load_state_dict(ae["encoder"])
        dec.load_state_dict(ae["decoder"])
        enc.to(device).eval()
        dec.to(device).eval()
        log["ae_final"] = {"from": str(args.ae_from)}
        say(f"autoencoder from {args.ae_from}")
    else:
        enc, dec, _ = train_autoencoder(cfg, st, device, budget * (1.0 if args.ae_only else st.ae_share), log)
        torch.save({"encoder": enc.state_dict(), "decoder": dec.state_dict()}, args.out / "autoencoder.pt")
        if args.ae_only:
            (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
            say(f"wrote {args.out / 'autoencoder.pt'}")
            return 0
    t_dit = time.perf_counter()
    text, dit = train_denoiser(cfg, st, device, budget - (t_dit - T0), enc, dec, log, args.out, meta)
    weights = args.out / "demo_weights.safetensors"
    save_weights(weights, text, dit, dec, dict(meta, denoiser_steps=log["dit_final"]["steps"],
                                               rollout=log["dit_final"].get("rollout"),
                                               autoencoder=log["ae_final"], final=True))
    say(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB)")
    log["wall_s"] = time.perf_counter() - T0
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    plot_losses(log, args.out / "loss.png")
    if not args.no_eval:
        try:
            torch.set_num_threads(min(torch.get_num_threads(), 8))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # nan means of frames with no shape
                evaluate(args.graph, weights, args.out, st.eval_blocks, log, st.eval_prompts)
        except Exception as exc:  # the weights are written; say why the evaluation failed and go on
            import traceback

            traceback.print_exc()
            log["eval_error"] = repr(exc)
    log["wall_s"] = time.perf_counter() - T0
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    say(f"done in {log['wall_s']:.0f} s: " + ", ".join(str(p) for p in sorted(args.out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
