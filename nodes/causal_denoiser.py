"""A small block-causal few-step denoiser with a KV cache: the shape of Self-Forcing/CausVid at toy size.

Each block of latent frames is denoised in a few flow-matching steps while attending to the keys/values of
earlier blocks; a last pass at t=0 writes the clean block's keys/values into the cache. The cache holds
`cache_blocks` blocks in fixed buffers: it fills over the first blocks (phase = blocks cached so far) and
then rolls (oldest block dropped in place), so there are exactly cache_blocks + 1 phases.

Keys are cached before rotary position is applied; positions are applied at read time from each slot's
place in the window, so rolling the cache keeps positions consistent.

`positions` says where a token is. `learnt` (the first demo weights): time in rotary positions, the place in
the frame a learnt embedding added to each token. `torus`: all of it rotary, and the place in the frame on
frequencies that are whole turns across the token grid, so attention sees only offsets taken round the frame.
The demo's frame is a torus (a shape that leaves one edge comes back at the other); with `torus` a shape
across the edge is the same pattern to the model as one in the middle, instead of something to learn anew at
every position (the learnt embedding broke shapes at the edges: bench/RESULTS.md, issue 17).

Video-to-video (SDEdit): with the optional `input` latents bound, each block starts from the input noised to
the first step's level, x = (1 - sigma_0) * input + sigma_0 * noise, and runs the few-step schedule from there.
`strength` scales the schedule's (unshifted) noise grid, so the first step sits at
sigma_0 = shift(strength): 1 starts from pure noise (the input is not seen), smaller keeps more of the input.
All `steps` steps run at any strength (one static program). Without `input` the node is the text-to-video
denoiser unchanged (bit for bit).

`strength` is live: the optional `strength` port (a float slot) overrides the param, and the SDEdit schedule's
coefficients sit in a device tensor that `prepare` (the host half, before each block) rewrites in place when it
changes, so a compiled or captured block samples with the new value from the next block, without a recompile.
Each coefficient is the float32 rounding of the double a Python float would give: in float32 the tensor schedule
computes what the Python floats did.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from reactor_graph.node import Node, Port, register
from reactor_graph.weights import load_into


def check_strength(value) -> float:
    """A strength a command may write: a number in (0, 1] (ValueError otherwise, so the command is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {value!r}")
    return float(value)


def flow_sigmas(steps: int, shift: float, strength: float = 1.0) -> list[float]:
    """Few-step flow-matching noise levels, shifted towards noise as Wan/Self-Forcing do; `strength` < 1
    starts the (unshifted) grid lower, for SDEdit."""
    s = [strength * (1.0 - i / steps) for i in range(steps)]  # 1.0 * x == x: strength 1 is the plain grid
    return [shift * x / (1 + (shift - 1) * x) for x in s]


POSITIONS = ("learnt", "torus")


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the frame index over the last dim. x: [B, H, N, d], pos: [N] (frame index)."""
    return Rotary(x.shape[-1])(x, pos)


class Rotary:
    """Rotary positions of a sequence of whole frames (tokens frame-major, each frame in patchify order).

    Without a grid: the frame index on every frequency (`rope`). With a grid (gh, gw): half the frequencies
    carry the frame index, a quarter the token's row and a quarter its column, on frequencies of k whole
    turns per grid height/width (k = 1, 2, ...), so a score depends on the row/column offset modulo the grid:
    the attention of a frame rolled round by whole tokens is the attention of the frame, rolled."""

    def __init__(self, head_dim: int, grid: tuple[int, int] | None = None):
        self.pairs, self.grid = head_dim // 2, grid

    def angles(self, pos: torch.Tensor) -> torch.Tensor:  # pos: [N] frame index -> [N, pairs]
        dev = pos.device
        if self.grid is None:
            freqs = 1.0 / (100.0 ** (torch.arange(self.pairs, device=dev, dtype=torch.float32) / self.pairs))
            return pos.float()[:, None] * freqs[None]
        gh, gw = self.grid
        pt = self.pairs // 2
        py = (self.pairs - pt) // 2
        px = self.pairs - pt - py
        ft = 1.0 / (100.0 ** (torch.arange(pt, device=dev, dtype=torch.float32) / pt))
        fy = 2 * math.pi * torch.arange(1, py + 1, device=dev, dtype=torch.float32) / gh
        fx = 2 * math.pi * torch.arange(1, px + 1, device=dev, dtype=torch.float32) / gw
        cell = torch.arange(pos.shape[0], device=dev) % (gh * gw)
        row, col = (cell // gw).float(), (cell % gw).float()
        return torch.cat([pos.float()[:, None] * ft, row[:, None] * fy, col[:, None] * fx], dim=1)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x: [B, H, N, d]
        ang = self.angles(pos)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        d = self.pairs
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, text_dim: int, rotary: Rotary | None = None):
        super().__init__()
        self.heads = heads
        self.rotary = rotary or Rotary(dim // heads)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(text_dim, 2 * dim)
        self.cross_proj = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim)

    def split(self, x):  # [B, N, D] -> [B, H, N, d]
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x, temb, text, pos, cache_k, cache_v, cache_pos):
        """x: [B, N, D]; cache_k/v: [B, H, M, d] (pre-rope) or None; returns (x, k, v) with k pre-rope."""
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(temb).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = (self.split(t) for t in self.qkv(h).chunk(3, dim=-1))
        rot = self.rotary
        q_r = rot(q, pos)
        if cache_k is not None:
            k_all = torch.cat([rot(cache_k, cache_pos), rot(k, pos)], dim=2)
            v_all = torch.cat([cache_v, v], dim=2)
        else:
            k_all, v_all = rot(k, pos), v
        a = F.scaled_dot_product_attention(q_r, k_all, v_all)
        x = x + g1 * self.proj(a.transpose(1, 2).flatten(2))
        tk, tv = self.cross_kv(text).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(self.split(self.cross_q(self.norm2(x))), self.split(tk), self.split(tv))
        x = x + self.cross_proj(a.transpose(1, 2).flatten(2))
        h = self.norm3(x) * (1 + sc2) + sh2
        return x + g2 * self.mlp(h), k, v


class CausalDiT(nn.Module):
    """Tokens are 2x2 (patch) latent patches of each frame; time is in rotary positions (frame index), the place
    in the frame in a learnt embedding (`positions="learnt"`) or in rotary positions round the torus ("torus")."""

    def __init__(self, channels: int, frames: int, size: tuple[int, int], patch: int, dim: int, layers: int,
                 heads: int, text_dim: int, positions: str = "learnt"):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        self.channels, self.frames, self.size, self.patch = channels, frames, size, patch
        self.gh, self.gw = size[0] // patch, size[1] // patch
        self.tokens_per_frame = self.gh * self.gw
        self.positions = positions
        self.embed = nn.Linear(channels * patch * patch, dim)
        if positions == "learnt":
            self.spatial = nn.Parameter(torch.randn(self.tokens_per_frame, dim) * 0.02)
        self.rotary = Rotary(dim // heads, (self.gh, self.gw) if positions == "torus" else None)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, text_dim, self.rotary) for _ in range(layers))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.out = nn.Linear(dim, channels * patch * patch)
        self.dim = dim

    def tokens(self, x):  # [B, C, T, h, w] -> [B, T*gh*gw, D], with the learnt place when there is one
        h = self.embed(self.patchify(x))
        return h + self.spatial.repeat(self.frames, 1) if self.positions == "learnt" else h

    def patchify(self, x):  # [B, C, T, h, w] -> [B, T*gh*gw, C*p*p]
        b, c, t, _, _ = x.shape
        p = self.patch
        x = x.view(b, c, t, self.gh, p, self.gw, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, t * self.gh * self.gw, c * p * p)

    def unpatchify(self, x):  # inverse of patchify
        b, _, _ = x.shape
        p, c = self.patch, self.channels
        x = x.view(b, self.frames, self.gh, self.gw, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, self.frames, self.gh * p, self.gw * p)

    def time_embedding(self, sigma: torch.Tensor) -> torch.Tensor:  # sigma: [B] in [0, 1]
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device) / half)
        ang = (sigma.float() * 1000.0)[:, None] * freqs[None]
        return self.t_embed(torch.cat([ang.cos(), ang.sin()], dim=-1).to(self.out.weight.dtype))

    def frame_positions(self, first_frame: int, device) -> torch.Tensor:
        f = torch.arange(first_frame, first_frame + self.frames, device=device)
        return f.repeat_interleave(self.tokens_per_frame)

    def forward(self, x, sigma, text, first_frame: int, cache_k=None, cache_v=None, n_cached: int = 0):
        """x: [B, C, T, h, w]; text: [B, L, Dt]; cache_k/v: [layers, B, H, M, d] with n_cached valid tokens.

        Returns (flow prediction like x, per-layer k [layers, B, H, N, d], v)."""
        h = self.tokens(x)
        temb = self.time_embedding(sigma)
        pos = self.frame_positions(first_frame, x.device)
        cache_pos = torch.arange(n_cached, device=x.device) // self.tokens_per_frame
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            ck = cache_k[i, :, :, :n_cached] if n_cached else None
            cv = cache_v[i, :, :, :n_cached] if n_cached else None
            h, k, v = blk(h, temb, text, pos, ck, cv, cache_pos)
            ks.append(k)
            vs.append(v)
        out = self.out(self.norm_out(h))
        return self.unpatchify(out), torch.stack(ks), torch.stack(vs)


@register("causal_denoiser")
class CausalDenoiser(Node):
    description = "Small block-causal few-step flow-matching denoiser with a rolling KV cache."
    every_block = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        latent_channels: int = Field(4, ge=1)
        frames_per_block: int = Field(2, ge=1)
        latent_size: tuple[int, int] = Field((16, 16), description="[h, w] of the latent frames")
        patch: int = Field(2, ge=1)
        dim: int = Field(128, ge=8)
        layers: int = Field(4, ge=1)
        heads: int = Field(4, ge=1)
        text_dim: int = Field(64, ge=1)
        steps: int = Field(4, ge=1, le=50, description="denoising steps per block")
        shift: float = Field(3.0, gt=0, description="noise schedule shift")
        cache_blocks: int = Field(3, ge=1, description="earlier blocks kept in the KV cache")
        positions: Literal["learnt", "torus"] = Field(
            "learnt", description="where a token is in the frame: `learnt` (an embedding per place, the first "
                                  "demo weights) or `torus` (rotary, taken round the frame's edges: for frames "
                                  "whose content wraps round, as the demo's does)")
        strength: float = Field(1.0, gt=0, le=1, description="with `input` bound (SDEdit): how far the input "
                                                             "is noised; 1 = pure noise, small = close to it")
        weights: str | None = None
        weights_prefix: str = ""

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        p = params
        if p.dim % p.heads or (p.dim // p.heads) % 2:
            raise ValueError(f"dim ({p.dim}) must split into {p.heads} heads of even width")
        if p.latent_size[0] % p.patch or p.latent_size[1] % p.patch:
            raise ValueError(f"latent_size {list(p.latent_size)} must be divisible by patch {p.patch}")

    def ports(self):
        p = self.params
        lat = (p.latent_channels, p.frames_per_block, *p.latent_size)
        return (
            {"cond": Port("tensor", "float", ("L", p.text_dim), "text embeddings [L, D]"),
             "noise": Port("tensor", "float", lat, "initial noise [C, T, h, w]"),
             "input": Port("tensor", "float", lat, "optional latents to start from (SDEdit, `strength`)",
                           optional=True),
             "strength": Port("float", description="optional live SDEdit strength in (0, 1] (default: the param); "
                                                   "a new value applies from the next block", optional=True)},
            {"latents": Port("tensor", "float", lat, "denoised block [C, T, h, w]")},
        )

    def num_phases(self) -> int:
        return self.params.cache_blocks + 1

    def phase_for_block(self, block: int) -> int:
        return min(block, self.params.cache_blocks)

    def load(self, device, dtype):
        super().load(device, dtype)
        p = self.params
        torch.manual_seed(self.graph.seed + 2)
        self.model = CausalDiT(p.latent_channels, p.frames_per_block, p.latent_size, p.patch, p.dim, p.layers,
                               p.heads, p.text_dim, p.positions)
        if p.weights:
            load_into(self.model, p.weights, self.graph.root, p.weights_prefix)
        self.model.to(device=device, dtype=dtype).eval()
        tokens = p.cache_blocks * p.frames_per_block * self.model.tokens_per_frame
        shape = (p.layers, 1, p.heads, tokens, p.dim // p.heads)  # [layers, B, H, M, d]
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)
        self.sigmas = flow_sigmas(p.steps, p.shift) + [0.0]
        # [sigma_0..sigma_{S-1}, 1 - sigma_0, sigma_{i+1} - sigma_i for each step], rewritten in place by prepare
        self.input_schedule = torch.tensor(self._input_coefficients(p.strength), device=device)
        self.strength_now = p.strength

    def _input_coefficients(self, strength: float) -> list[float]:
        s = flow_sigmas(self.params.steps, self.params.shift, strength) + [0.0]
        return [*s[:-1], 1.0 - s[0], *(b - a for a, b in zip(s[:-1], s[1:]))]

    def check_input(self, port, value):
        if port == "strength":
            check_strength(value)
        return None

    def prepare(self, strength: float | None = None):
        """Host half, before every block: a new `strength` (the port, else the param) rewrites the SDEdit
        schedule in place; the next block samples with it."""
        s = self.params.strength if strength is None else check_strength(strength)
        if s != self.strength_now:
            with torch.no_grad():
                self.input_schedule.copy_(torch.tensor(self._input_coefficients(s)))
            self.strength_now = s

    def reset(self):
        self.cache_k.zero_()
        self.cache_v.zero_()

    def forward(self, cond, noise, input=None):
        return {"latents": self.generate(cond, noise, self.phase, input)}

    def generate(self, cond, noise, phase: int, input=None):
        """Denoise one block in `phase` (blocks already cached) and write it into the cache; from `input`
        noised to the first step's level when given (SDEdit)."""
        p = self.params
        block_tokens = p.frames_per_block * self.model.tokens_per_frame
        if phase == p.cache_blocks:  # full: drop the oldest block, in place, to make room
            self.cache_k[:, :, :, :-block_tokens] = self.cache_k[:, :, :, block_tokens:].clone()
            self.cache_v[:, :, :, :-block_tokens] = self.cache_v[:, :, :, block_tokens:].clone()
            phase -= 1
        n_cached = phase * block_tokens
        first_frame = phase * p.frames_per_block
        text = cond[None]
        x = noise[None]  # [1, C, T, h, w]
        if input is None:
            for s, s_next in zip(self.sigmas[:-1], self.sigmas[1:]):
                sigma = torch.full((1,), s, device=x.device)
                flow, _, _ = self.model(x, sigma, text, first_frame, self.cache_k, self.cache_v, n_cached)
                x = x + (s_next - s) * flow  # Euler step of the flow ODE; flow = noise - clean
        else:  # the same steps on the live schedule's tensor (float32, so a low-precision x rounds only the step)
            c, n = self.input_schedule, p.steps
            x = (c[n] * input[None].float() + c[0] * x.float()).to(x.dtype)
            for i in range(n):
                flow, _, _ = self.model(x, c[i:i + 1], text, first_frame, self.cache_k, self.cache_v, n_cached)
                x = x + (c[n + 1 + i] * flow.float()).to(x.dtype)
        # The clean pass: keys/values of the denoised block at t=0 become context for later blocks.
        _, k, v = self.model(x, torch.zeros(1, device=x.device), text, first_frame, self.cache_k, self.cache_v,
                             n_cached)
        self.cache_k[:, :, :, n_cached:n_cached + block_tokens] = k
        self.cache_v[:, :, :, n_cached:n_cached + block_tokens] = v
        return x[0]
