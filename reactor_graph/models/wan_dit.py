"""Wan2.1-T2V as a block-causal DiT with a static KV cache (Self-Forcing / CausVid style inference).

Architecture
    The modules and parameter names are those of the public Wan2.1 `WanModel` (t2v), so its checkpoints and
    the causal fine-tunes derived from it (CausVid, Self-Forcing, LongLive) load unchanged: `patch_embedding`,
    `text_embedding.{0,2}`, `time_embedding.{0,2}`, `time_projection.1`, `blocks.{i}.{self_attn,cross_attn}.
    {q,k,v,o,norm_q,norm_k}`, `blocks.{i}.{norm1,norm2,norm3,ffn.0,ffn.2,modulation}`, `head.{head,modulation}`.
    Numerics follow Wan where it is explicit about precision: the residual stream, the norms, the adaLN
    modulation (shift/scale/gate = `modulation` + time projection, per latent frame), the time embedding and
    the output head run in float32; the linear layers and attention run in the parameter dtype (bf16 in
    production). Optionally the blocks' linears run in FP8 (`fp8_linear.convert_linears_`): a layer that is an
    `Fp8Linear` gets its input as e4m3 rows + scales from the kernel that makes it (`_norm_modulate`, `_norm`,
    the FFN's bias + GELU), so no separate quantisation pass reads the activation again. RoPE is Wan's 3D
    rotary embedding on adjacent channel pairs, the head_dim split into (frame, height, width) bands of
    d - 4*(d//6), 2*(d//6), 2*(d//6) channels; the angles are evaluated in float64 once, when the tables are
    built, and applied in float32 (Wan applies them in float64).

Latent layout
    Latents are [B, C, F, H, W] (Wan's own layout; Self-Forcing's wrapper uses [B, F, C, H, W]). Tokens are
    frame-major: a block of F frames is F * (H/2) * (W/2) consecutive tokens, so a block of frames is a
    contiguous token range and a cache slot is a contiguous range of the cache.

Block-causal generation
    The video is generated `frames_per_block` latent frames at a time (3 for Self-Forcing). The tokens of a
    block attend to each other (full attention within the block) and to the cached keys/values of all
    earlier blocks; text enters by cross-attention, whose keys/values are computed once per prompt and
    kept in the cache too (`BlockCausalWan.set_context`).

The cache (`KVCache`)
    One buffer `kv` of shape [layers, 2, B, max_tokens, heads, head_dim] (keys at [:, 0], values at [:, 1])
    for `max_frames` latent frames, allocated once; it is only ever updated in place (slice `copy_`), so its
    address never changes. [B, T, heads, head_dim] is the layout `Linear` produces and the layout flash
    attention wants; the attention call gets `transpose(1, 2)` views of it and no copy is made. An FP8 kernel
    (`attention: fa3_fp8`) reads an e4m3 copy beside it instead (`KVCache.fp8`, models/fp8_kv_cache.py).

Phases
    Every shape and offset in a block's forward is a Python int fixed by the block's *phase*, so each phase
    is one static program (one torch.compile specialisation / one CUDA graph). With capacity N =
    max_frames / frames_per_block blocks:
      * filling phases 0 .. N-1: block b sits at frames [b*F, (b+1)*F) and reads the cache up to it;
      * then (if `rolling`) ONE rolling phase, used for every later block: before denoising, the cache is
        rolled in place -- the first `sink_frames` frames (an attention sink, LongLive-style; 0 allowed) stay,
        the window behind them moves F frames towards the front (the oldest F frames after the sink are
        dropped) -- and the block takes the last slot, [max_frames - F, max_frames).
    So a generator with N cache blocks has N + 1 phases (N without rolling); `KVCache.phases()` lists
    them and `KVCache.phase_for_block(i)` maps a block index to its phase.

RoPE positions of the cached keys (as the official Self-Forcing and LongLive inference)
    Keys are cached *after* RoPE at their absolute frame index in the video and are never re-rotated: a roll
    only moves them (plain copies), so each cached key is rounded to the cache dtype once however long the
    stream runs. The sink keeps positions [0, S); the block being made sits at its absolute frames, so the
    query-to-sink distance grows by F every block, as in LongLive. That position lives on the device
    (`KVCache.frame_offset`: the absolute frame of window slot s is s + frame_offset; the roll adds F), so the
    rolling phase is still one static program; its RoPE angles are evaluated in each pass from that counter in
    float64 (frame band only, [F, bands] values), so no table grows with the stream and precision does not
    depend on its length. (The official code indexes a 1024-frame table and stops there; this does not.
    LongLive's `use_infinite_attention` variant, RoPE by slot from un-rotated cached keys, is not built here.)

Two passes per block (as Self-Forcing)
    1. `denoise_step` (x `num_steps`): the noisy block reads the cache; it never changes any valid entry.
       By default (`stage_kv=True`) each layer stages the block's own keys/values in the block's slot,
       [cache_start, cache_start + L), which no earlier block owns and which is rewritten in pass 2, and
       attends over the contiguous cache[:cache_start + L] -- no concatenation, no copy of the cache.
       With `stage_kv=False` the slot is not touched and the attention reads cat(cache[:cache_start], k).
    2. `write_cache`: the denoised block at timestep `context_noise` (0 by default; Self-Forcing passes the
       clean latents with that timestep and adds no noise) writes its keys/values into its slot. The last
       layer's attention/FFN and the head are skipped: their outputs are not needed for the cache.
    The clean latents are kept next to their keys/values (`KVCache.latents`), so after a prompt switch the
    cached frames can be re-encoded under the new prompt's cross-attention (`recache`, LongLive's KV re-cache:
    without it the self-attention cache keeps the old prompt's features and the switch lags). As LongLive
    (`_recache_after_switch`, global sink on) it is ONE pass over the whole cache before the block's roll, in
    which all cached frames attend to each other (no causal mask); once the cache has rolled, the sink keeps
    the old prompt's keys/values and only the window is re-encoded (attending to the kept sink).
    `generate_block(noise, context, phase)` is: the optional re-cache, roll (rolling phase only), the few-step sampler
    (`FlowMatchSchedule`), the cache write. The caller passes all noise (no RNG inside), every loop bound is a
    Python int, so the whole call is static and capture-friendly.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8_linear
from .attention import sdpa_attention
from .fp8_linear import Fp8Linear

__all__ = [
    "WanConfig",
    "WanRMSNorm",
    "WanLayerNorm",
    "WanAttention",
    "WanBlock",
    "WanHead",
    "WanDiT",
    "KVCache",
    "Phase",
    "FlowMatchSchedule",
    "BlockCausalWan",
    "sinusoidal_embedding",
    "rope_angles",
    "rope_tables",
    "apply_rope",
    "load_wan_state_dict",
    "normalize_wan_keys",
    "init_random_",
]


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WanConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    text_len: int = 512
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.freq_dim % 2:
            raise ValueError("freq_dim must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_bands(self) -> tuple[int, int, int]:
        """Channels of head_dim rotated by frame, height and width position (Wan's split)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @classmethod
    def wan_1_3b(cls) -> "WanConfig":
        return cls(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)

    @classmethod
    def wan_14b(cls) -> "WanConfig":
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

    @classmethod
    def tiny(cls) -> "WanConfig":
        return cls(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=8, freq_dim=32)


# ------------------------------------------------------------------------------------- embeddings/RoPE


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: [cos | sin] of t * 10000^(-i/half), evaluated in float64 -> float32."""
    half = dim // 2
    pos = t.to(torch.float64).reshape(-1, 1)
    freq = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float64) / half)
    ang = pos * freq
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).to(torch.float32)


def _band_inv_freq(band: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, band, 2, dtype=torch.float64) / band)


def rope_angles(cfg: WanConfig, frame: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """RoPE angles [N, head_dim/2] (float64) for tokens at (frame, row, col) positions (float64/int [N])."""
    bf, bh, bw = cfg.rope_bands
    parts = [
        frame.to(torch.float64)[:, None] * _band_inv_freq(bf, cfg.rope_theta)[None],
        row.to(torch.float64)[:, None] * _band_inv_freq(bh, cfg.rope_theta)[None],
        col.to(torch.float64)[:, None] * _band_inv_freq(bw, cfg.rope_theta)[None],
    ]
    return torch.cat(parts, dim=1)


def rope_tables(cfg: WanConfig, frames: int, grid_hw: tuple[int, int], frame_offset: int = 0,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [frames*h*w, head_dim/2] float32 for frame-major tokens of a (frames, h, w) patch grid."""
    h, w = grid_hw
    f = torch.arange(frames, dtype=torch.float64) + frame_offset
    r = torch.arange(h, dtype=torch.float64)
    c = torch.arange(w, dtype=torch.float64)
    ff, rr, cc = torch.meshgrid(f, r, c, indexing="ij")
    ang = rope_angles(cfg, ff.reshape(-1), rr.reshape(-1), cc.reshape(-1))
    return ang.cos().float().to(device), ang.sin().float().to(device)


def _plain_form(*tensors: torch.Tensor) -> bool:
    """Whether to use the plain float32 form of a piece instead of its eager fast path (same numbers): under
    torch.compile (inductor fuses the plain form), or when autograd records (the fast paths write into `out=`)."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [..., N, H, D] by angles cos/sin [N, D/2] (in float32)."""
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [N, 1, D/2], broadcast over heads
    if _plain_form(x, cos, sin):
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
        return out.flatten(-2).to(x.dtype)
    # eager, the same numbers with less traffic: x's halves are promoted to float32 inside the products (exact),
    # and the float32 sums are rounded to x's dtype as they are stored into the interleaved output (as .to() does)
    xp = x.unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.empty_like(xp)
    torch.sub(x0 * c, x1 * s, out=out[..., 0])
    torch.add(x0 * s, x1 * c, out=out[..., 1])
    return out.flatten(-2)


# ------------------------------------------------------------------------------------------------ modules


def _linear(layer: nn.Module, x) -> torch.Tensor:
    """A block linear on x: a tensor, or for an `Fp8Linear` also an `Fp8Act` (quantised by the op that made it)."""
    if isinstance(layer, Fp8Linear):
        return layer(x)
    return layer(x.to(layer.weight.dtype))


def _norm_modulate(norm: "WanLayerNorm", x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int,
                   consumer: nn.Module, dtype: torch.dtype | None = None):
    """`_modulate(norm(x), ..., dtype)`; for an FP8 consumer the LayerNorm, the modulation and the per-token e4m3
    quantisation are one kernel (kernels/fp8_act_quant.py) and the result is an `Fp8Act`."""
    if isinstance(consumer, Fp8Linear):
        return fp8_linear.modulate_quant(x, shift, scale, frames, norm.eps)
    return _modulate(norm(x), shift, scale, frames, dtype)


def _norm(norm: nn.Module, x: torch.Tensor, consumer: nn.Module):
    """norm(x) (the cross-attention's affine LayerNorm, or Identity); quantised in the same kernel for FP8."""
    if isinstance(consumer, Fp8Linear):
        if isinstance(norm, WanLayerNorm):
            return fp8_linear.layernorm_quant(x, norm.weight, norm.bias, norm.eps)
        return fp8_linear.quantize_rows(norm(x))
    return norm(x)


def _ffn(ffn: nn.Sequential, h) -> torch.Tensor:
    """Wan's FFN, Linear -> GELU(tanh) -> Linear. On CUDA the GELU runs in cuBLASLt's epilogue
    (`_addmm_activation` is tanh-GELU there, computed on the fp32 accumulator): the [L, ffn_dim] hidden
    activation is written once instead of written, read and written again (about 8 ms of a Self-Forcing block
    on an H100). Elsewhere (the CPU's version is erf-GELU), the plain path.
    In FP8 (h an `Fp8Act`): the first matmul without its bias, then one kernel adds the bias, applies the
    tanh-GELU and quantises the hidden activation per row for the second matmul."""
    first, last = ffn[0], ffn[2]
    if isinstance(first, Fp8Linear):
        y = first(h, bias=False)  # [B, L, ffn_dim] bf16
        return _linear(last, fp8_linear.gelu_quant(y, first.bias))
    if h.is_cuda and first.bias is not None:
        x = h.to(first.weight.dtype)
        y = torch._addmm_activation(first.bias, x.reshape(-1, x.shape[-1]), first.weight.t(), use_gelu=True)
        y = y.view(*x.shape[:-1], -1)
    else:
        y = ffn[1](_linear(first, h))
    return _linear(last, y)


def _linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    b = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), b)


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if x.dtype == torch.float32 or _plain_form(x):
            y = (xf * r).to(x.dtype)
        else:  # eager: the float32 product rounded to x's dtype as it is stored (no float32 temporary)
            y = torch.mul(xf, r, out=torch.empty_like(x))
        return y * self.weight.to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the input/parameter dtype; returns float32."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class WanAttention(nn.Module):
    """q/k/v/o projections and q/k RMSNorm of Wan's self- and cross-attention (the attention is done by the
    caller, which owns the cache)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.norm_q(_linear(self.q, x)))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.norm_k(_linear(self.k, x))), self._heads(_linear(self.v, x))

    def out(self, a: torch.Tensor) -> torch.Tensor:
        """[B, L, H, D] attention output -> [B, L, dim]."""
        return _linear(self.o, a.flatten(-2))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on [B, L, H, D] tensors (transposed views in, transposed view out: no copies for flash)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [B, L, dim] (float32), shift/scale [B, F, 1, dim]: per-frame adaLN, computed in float32 and returned in
    `dtype` (default x's). Eager, a narrower dtype is rounded as the sum is stored: the same numbers as .to(dtype)
    after it, without the float32 temporary and the cast kernel."""
    b, n, d = x.shape
    xv = x.view(b, frames, n // frames, d)
    if dtype is None or dtype == x.dtype or _plain_form(x, shift, scale):
        y = (xv * (1 + scale) + shift).view(b, n, d)
        return y if dtype is None else y.to(dtype)
    out = torch.empty(xv.shape, dtype=dtype, device=x.device)
    torch.add(xv * (1 + scale), shift, out=out)
    return out.view(b, n, d)


def _gate(y: torch.Tensor, gate: torch.Tensor, frames: int) -> torch.Tensor:
    """y [B, L, dim] (parameter dtype) * gate [B, F, 1, dim] (float32) -> float32: the product promotes y (exactly)
    inside the one kernel, no separate cast."""
    b, n, d = y.shape
    return (y.view(b, frames, n // frames, d) * gate).view(b, n, d)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def mods(self, e0: torch.Tensor) -> torch.Tensor:
        """e0 [B, F, 6, dim] float32 -> modulation [B, F, 6, dim] (shift, scale, gate) x (attn, ffn)."""
        return self.modulation.float().unsqueeze(0) + e0

    def qkv(self, x: torch.Tensor, m: torch.Tensor, frames: int, cos: torch.Tensor, sin: torch.Tensor):
        """Self-attention q, k (both RoPE'd) and v, [B, L, H, D] in the parameter dtype."""
        # h in the parameter dtype once, not cast again by each of the q, k and v projections
        h = _norm_modulate(self.norm1, x, m[:, :, 0:1], m[:, :, 1:2], frames, self.self_attn.q, self.modulation.dtype)
        q = apply_rope(self.self_attn.project_q(h), cos, sin)
        k, v = self.self_attn.project_kv(h)
        return q, apply_rope(k, cos, sin), v

    def finish(self, x: torch.Tensor, a: torch.Tensor, m: torch.Tensor, frames: int,
               cross_k: torch.Tensor, cross_v: torch.Tensor) -> torch.Tensor:
        """Residual of self-attention output a [B, L, H, D], then cross-attention and FFN."""
        x = x + _gate(self.self_attn.out(a), m[:, :, 2:3], frames)
        q = self.cross_attn.project_q(_norm(self.norm3, x, self.cross_attn.q))
        x = x + self.cross_attn.out(attend(q, cross_k, cross_v))  # float32 + parameter dtype -> float32
        h = _norm_modulate(self.norm2, x, m[:, :, 3:4], m[:, :, 4:5], frames, self.ffn[0], self.modulation.dtype)
        y = _ffn(self.ffn, h)
        return x + _gate(y, m[:, :, 5:6], frames)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, frames: int) -> torch.Tensor:
        """x [B, L, dim], e [B, F, dim] (time embedding, float32) -> [B, L, out*prod(patch)] float32."""
        m = self.modulation.float().unsqueeze(0) + e.unsqueeze(2)  # [B, F, 2, dim]
        return _linear_f32(self.head, _modulate(self.norm(x), m[:, :, 0:1], m[:, :, 1:2], frames))


class WanDiT(nn.Module):
    """The Wan2.1 T2V DiT (parameter names as the public checkpoints). Two entry points:
    `forward` (full sequence, optional attention mask: plain Wan, or a reference) and `forward_block`
    (one block of frames against a `KVCache`)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = WanHead(cfg)
        # the block's self-attention over the cache, (q, k, v) [B, L, H, D] -> [B, L, H, D]: SDPA, or a kernel
        # of models/attention.py (FlashAttention-3, FP8) set by the caller. Cross-attention (512 text tokens, a
        # few % of a block) and the masked full-sequence forward stay on SDPA.
        self.attn = sdpa_attention

    # -- pieces

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] latents -> [B, F*h*w, dim] float32 tokens (frame-major)."""
        y = self.patch_embedding(x.to(self.dtype))
        return y.flatten(2).transpose(1, 2).float()

    def unpatchify(self, y: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, out*prod(patch)] -> [B, out, F*pt, h*ph, w*pw]."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        b = y.shape[0]
        y = y.view(b, f, h, w, pt, ph, pw, self.cfg.out_dim)
        return y.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.cfg.out_dim, f * pt, h * ph, w * pw)

    def grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        _, _, f, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        return f // pt, h // ph, w // pw

    def time_embed(self, t: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] or [B, F] (patch frames) -> e [B, F, dim], e0 [B, F, 6, dim] (float32)."""
        if t.dim() == 1:
            t = t[:, None].expand(batch, frames)
        emb = sinusoidal_embedding(self.cfg.freq_dim, t)
        e = _linear_f32(self.time_embedding[2], F.silu(_linear_f32(self.time_embedding[0], emb)))
        e0 = _linear_f32(self.time_projection[1], F.silu(e))
        return e.view(batch, frames, -1), e0.view(batch, frames, 6, -1)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """T5 features [B, <=text_len, text_dim] -> [B, text_len, dim]; shorter inputs are zero-padded to
        text_len first, as Wan pads the T5 output (the padded tokens are attended to, as in Wan)."""
        if context.shape[1] < self.cfg.text_len:
            context = F.pad(context, (0, 0, 0, self.cfg.text_len - context.shape[1]))
        return _linear(self.text_embedding[2], self.text_embedding[1](_linear(self.text_embedding[0], context)))

    def cross_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention (k, v) [B, text_len, H, D] for T5 features `context`."""
        c = self.embed_text(context)
        return [blk.cross_attn.project_kv(c) for blk in self.blocks]

    # -- full sequence

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                attn_mask: torch.Tensor | None = None, frame_offset: int = 0) -> torch.Tensor:
        """Full-sequence forward: x [B, C, F, H, W], t [B] or [B, F] -> flow prediction [B, out, F, H, W]
        (float32). attn_mask: bool [L, L] (True = attend) over the frame-major tokens, or None (Wan's
        bidirectional attention). Not for the real-time path (builds its RoPE tables on the fly)."""
        grid = self.grid(x)
        b = x.shape[0]
        tok = self.patchify(x)
        cos, sin = rope_tables(self.cfg, grid[0], grid[1:], frame_offset, device=x.device)
        e, e0 = self.time_embed(t, b, grid[0])
        ckv = self.cross_kv(context)
        for blk, (ck, cv) in zip(self.blocks, ckv):
            m = blk.mods(e0)
            q, k, v = blk.qkv(tok, m, grid[0], cos, sin)
            tok = blk.finish(tok, attend(q, k, v, attn_mask), m, grid[0], ck, cv)
        return self.unpatchify(self.head(tok, e, grid[0]), grid)

    # -- one block against the cache

    def forward_block(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, cache: "KVCache",
                      cache_start: int, *, write_kv: bool = False, return_output: bool = True,
                      keep_sink: torch.Tensor | None = None):
        """One block of frames x [B, C, F, H, W] at token offset `cache_start` (a Python int: the phase).

        Attention reads cache[:cache_start] (earlier blocks) + this block. t: [B] or [B, F] timesteps.
        context: T5 features [B, text_len, text_dim], or None to use the cross-attention keys/values held
        by the cache (`BlockCausalWan.set_context`). write_kv=False: denoising pass, no valid cache entry
        changes (see the module docstring for `stage_kv`); write_kv=True: this block's keys/values are
        written to [cache_start, cache_start + L). return_output=False skips the work that only the output
        needs (the last layer after its k/v, and the head) and returns None. keep_sink (a device bool, only
        with write_kv and cache_start 0): where true, the sink slots keep their keys/values (the re-cache of a
        rolled cache) and the block's sink frames attend to them instead of their own.
        Returns the flow prediction [B, out, F, H, W] (float32).
        """
        grid = self.grid(x)
        frames, b = grid[0], x.shape[0]
        tok = self.patchify(x)
        n = tok.shape[1]
        end = cache_start + n
        if end > cache.max_tokens:
            raise ValueError(f"block [{cache_start}, {end}) does not fit a cache of {cache.max_tokens} tokens")
        cos, sin = cache.rope(cache_start // cache.tokens_per_frame, frames)
        e, e0 = self.time_embed(t, b, frames)
        ckv = self.cross_kv(context) if context is not None else None
        stage = write_kv or cache.stage_kv
        # an FP8 kernel reads the cache's e4m3 copy (models/fp8_kv_cache.py): the write pass updates it from the
        # bf16 cache, a denoising pass stages the block's own k/v in the copy only (stage_kv or not: nothing reads
        # the slot before the write pass rewrites it)
        fp8 = cache.fp8_for(self.attn, written=write_kv)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            m = blk.mods(e0)
            q, k, v = blk.qkv(tok, m, frames, cos, sin)
            kc, vc = cache.kv[i, 0], cache.kv[i, 1]  # [B, T, H, D] views
            if write_kv or (stage and fp8 is None):
                _stage(kc, vc, k, v, cache_start, end, keep_sink, cache.sink_frames * cache.tokens_per_frame)
            if fp8 is not None:
                if write_kv:
                    fp8.write_(i, cache_start, end)
                else:
                    fp8.stage_(i, k, v, cache_start, end)
            if i == last and not return_output:
                return None
            if fp8 is not None:
                a = self.attn.attend_cache(q, fp8, i, end)
            elif stage:
                kk, vv = kc[:, :end], vc[:, :end]
            else:
                kk = torch.cat([kc[:, :cache_start], k.to(kc.dtype)], dim=1)
                vv = torch.cat([vc[:, :cache_start], v.to(vc.dtype)], dim=1)
            if fp8 is None:
                a = self.attn(q, kk.to(q.dtype), vv.to(q.dtype))
            if ckv is not None:
                ck, cv = ckv[i]
            else:
                ck, cv = cache.cross[i, 0], cache.cross[i, 1]
            tok = blk.finish(tok, a, m, frames, ck.to(q.dtype), cv.to(q.dtype))
        return self.unpatchify(self.head(tok, e, frames), grid)


def _stage(kc, vc, k, v, start: int, end: int, keep_sink: torch.Tensor | None, sink: int) -> None:
    """Write k/v [B, L, H, D] to cache slots [start, end); with keep_sink, slots [0, sink) keep their old
    values where keep_sink is true (a select, not a branch: the program stays static)."""
    if keep_sink is None or sink == 0:
        kc[:, start:end].copy_(k)
        vc[:, start:end].copy_(v)
        return
    assert start == 0 and end >= sink, (start, end, sink)
    kc[:, :sink].copy_(torch.where(keep_sink, kc[:, :sink], k[:, :sink]))
    vc[:, :sink].copy_(torch.where(keep_sink, vc[:, :sink], v[:, :sink]))
    kc[:, sink:end].copy_(k[:, sink:])
    vc[:, sink:end].copy_(v[:, sink:])


# ------------------------------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class Phase:
    """A static program: the block sits at token `cache_start` (frame `start_frame`); `roll` says whether
    the cache is rolled before the block. `index` is the phase number (filling 0..N-1, rolling N)."""

    index: int
    start_frame: int
    cache_start: int
    roll: bool

    @property
    def name(self) -> str:
        return f"rolling@{self.start_frame}" if self.roll else f"fill{self.index}@{self.start_frame}"


class KVCache:
    """Static self-attention KV cache for `max_frames` latent frames + the cross-attention KV of the prompt.

    kv:    [layers, 2, B, max_tokens, heads, head_dim]  (RoPE'd keys, values)
    latents: [B, C, max_frames, h, w]  the clean latents the cached frames were written from
    cross: [layers, 2, B, text_len, heads, head_dim]
    frame_offset: int64 scalar on the device; window slot s (s >= sink_frames) holds absolute frame
      s + frame_offset (0 while filling; each roll adds frames_per_block). Sink slots hold frames [0, S).
    """

    def __init__(self, cfg: WanConfig, *, batch_size: int, latent_hw: tuple[int, int], max_frames: int,
                 frames_per_block: int = 3, sink_frames: int = 0, rolling: bool = True, stage_kv: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        pt, ph, pw = cfg.patch_size
        if pt != 1:
            raise ValueError("block-causal caching assumes a temporal patch of 1")
        if latent_hw[0] % ph or latent_hw[1] % pw:
            raise ValueError(f"latent size {latent_hw} is not a multiple of the patch {cfg.patch_size[1:]}")
        if max_frames % frames_per_block:
            raise ValueError(f"max_frames {max_frames} is not a multiple of frames_per_block {frames_per_block}")
        if rolling and not 0 <= sink_frames <= max_frames - frames_per_block:
            raise ValueError(f"sink_frames must be in [0, {max_frames - frames_per_block}]")
        self.cfg = cfg
        self.batch_size = batch_size
        self.latent_hw = tuple(latent_hw)
        self.grid_hw = (latent_hw[0] // ph, latent_hw[1] // pw)
        self.tokens_per_frame = self.grid_hw[0] * self.grid_hw[1]
        self.max_frames = max_frames
        self.frames_per_block = frames_per_block
        self.sink_frames = sink_frames
        self.rolling = rolling
        self.stage_kv = stage_kv
        self.max_tokens = max_frames * self.tokens_per_frame
        self.block_tokens = frames_per_block * self.tokens_per_frame
        self.num_blocks = max_frames // frames_per_block
        L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
        self.kv = torch.zeros(L, 2, batch_size, self.max_tokens, H, D, dtype=dtype, device=device)
        # the clean latents behind each cached frame, so the window can be re-encoded (`BlockCausalWan.recache`)
        self.latents = torch.zeros(batch_size, cfg.out_dim, max_frames, *latent_hw, dtype=dtype, device=device)
        self.cross = torch.zeros(L, 2, batch_size, cfg.text_len, H, D, dtype=dtype, device=device)
        self.frame_offset = torch.zeros((), dtype=torch.int64, device=device)
        # the e4m3 copy of kv an FP8 attention kernel reads (models/fp8_kv_cache.py), made by `fp8_for`
        self.fp8 = None
        # static pieces of the RoPE tables: the height/width bands, the slot numbers, which slots move
        bf = cfg.rope_bands[0]
        _, hw_cos, hw_sin = self._hw_rope(cfg, self.grid_hw)
        self._hw_cos, self._hw_sin = hw_cos.to(device), hw_sin.to(device)  # [h*w, (bh+bw)/2]
        self._inv_freq = _band_inv_freq(bf, cfg.rope_theta).to(device)  # [bf/2] float64
        slots = torch.arange(max_frames, dtype=torch.float64)
        self._slots = slots.to(device)
        self._window = (slots >= sink_frames).double().to(device)

    @staticmethod
    def _hw_rope(cfg: WanConfig, grid_hw: tuple[int, int]):
        h, w = grid_hw
        rr, cc = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        ang = rope_angles(cfg, torch.zeros(h * w, dtype=torch.float64), rr.reshape(-1), cc.reshape(-1))
        ang = ang[:, cfg.rope_bands[0] // 2:]
        return ang, ang.cos().float(), ang.sin().float()

    def rope(self, start_slot: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [frames*h*w, head_dim/2] float32 of slots [start_slot, start_slot + frames) at their
        absolute frame positions (device ops only: capture-friendly, the counter is read on the device)."""
        sl = slice(start_slot, start_slot + frames)
        pos = self._slots[sl] + self.frame_offset.double() * self._window[sl]  # [frames] float64
        ang = pos[:, None] * self._inv_freq[None]  # [frames, bf/2]
        hw = self._hw_cos.shape[0]
        fc = ang.cos().float()[:, None].expand(frames, hw, -1)
        fs = ang.sin().float()[:, None].expand(frames, hw, -1)
        cos = torch.cat([fc, self._hw_cos[None].expand(frames, -1, -1)], dim=-1)
        sin = torch.cat([fs, self._hw_sin[None].expand(frames, -1, -1)], dim=-1)
        return cos.reshape(frames * hw, -1), sin.reshape(frames * hw, -1)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def nbytes(self) -> int:
        fp8 = self.fp8.nbytes() if self.fp8 is not None else 0
        return self.kv.numel() * self.kv.element_size() + self.cross.numel() * self.cross.element_size() + fp8

    def fp8_for(self, attn, written: bool = False):
        """The e4m3 copy of the cache that `attn` reads (`attn.reads_fp8_cache`, its scale granularity
        `attn.per`), made (and filled from kv) on first use, refreshed where kv was written without it; None for
        a kernel that reads kv. `written`: the caller is about to write kv (a kernel without the copy marks it
        stale)."""
        if not getattr(attn, "reads_fp8_cache", False):
            if written and self.fp8 is not None:
                self.fp8.stale = True
            return None
        if self.fp8 is None or self.fp8.per != attn.per:
            if torch.compiler.is_compiling():
                raise RuntimeError("KVCache: make the FP8 copy (cache.fp8_for(attn)) before compiling the block")
            from .fp8_kv_cache import Fp8KVCache

            self.fp8 = Fp8KVCache(self, attn.per)
            self.fp8.refresh_()
        elif self.fp8.stale:
            self.fp8.refresh_()
        return self.fp8

    # phases

    def phases(self) -> list[Phase]:
        """The bounded set of static programs: N filling phases, then one rolling phase (if rolling)."""
        fb, n = self.frames_per_block, self.tokens_per_frame
        out = [Phase(i, i * fb, i * fb * n, False) for i in range(self.num_blocks)]
        if self.rolling:
            last = self.max_frames - fb
            out.append(Phase(self.num_blocks, last, last * n, True))
        return out

    def phase_for_block(self, block_index: int) -> Phase:
        ph = self.phases()
        if block_index < self.num_blocks:
            return ph[block_index]
        if not self.rolling:
            raise ValueError(f"block {block_index} is past the cache ({self.num_blocks} blocks) and rolling is off")
        return ph[-1]

    # in-place roll

    @torch.no_grad()
    def roll_(self) -> None:
        """Drop frames [sink, sink + F) and move [sink + F, max_frames) to [sink, max_frames - F), in place; the
        moved keys keep their RoPE (absolute positions), so this is a plain copy and `frame_offset` grows by F.
        Copies go front to back in chunks of F frames (never overlapping within a chunk), all layers and both
        keys and values in one copy per chunk. The last slot keeps stale data until the next block overwrites
        it."""
        n = self.tokens_per_frame
        shift = self.frames_per_block * n
        dst0, src0, end = self.sink_frames * n, (self.sink_frames + self.frames_per_block) * n, self.max_tokens
        for buf in (self.kv,) if self.fp8 is None else (self.kv, self.fp8.kv8):  # the e4m3 copy moves alike
            kv = buf.flatten(0, 2)  # [L*2*B, T, H, D]: one copy per chunk for everything
            pos = 0
            while pos < end - src0:
                c = min(shift, end - src0 - pos)
                kv[:, dst0 + pos:dst0 + pos + c].copy_(kv[:, src0 + pos:src0 + pos + c])
                pos += c
        self.frame_offset.add_(self.frames_per_block)
        self.roll_latents_()

    @torch.no_grad()
    def roll_latents_(self) -> None:
        """The latent frames move as their keys/values do (front to back, chunks of F: no overlap)."""
        f, lat = self.frames_per_block, self.latents
        for d in range(self.sink_frames, self.max_frames - f, f):
            c = min(f, self.max_frames - f - d)
            lat[:, :, d:d + c].copy_(lat[:, :, d + f:d + f + c])

    @torch.no_grad()
    def reset_(self) -> None:
        """Back to frame 0 (the position counter must be reset; zeroing the buffers is not needed for
        correctness: phase b only reads slots that phases < b wrote)."""
        self.frame_offset.zero_()
        self.kv.zero_()
        self.latents.zero_()
        if self.fp8 is not None:
            self.fp8.reset_()


# ------------------------------------------------------------------------------------------------ sampler


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Few-step flow-matching sampler of Self-Forcing.

    The 1000-step training grid is sigma_i = 1 - i/1000 (i = 0..999), shifted as
    sigma' = shift*s / (1 + (shift-1)*s), timestep = 1000*sigma'. With `warp` (Self-Forcing's
    warp_denoising_step) a requested step t maps to grid entry 1000 - t, i.e. s = t/1000, so the 4-step
    config [1000, 750, 500, 250] with shift 5 gives
        sigmas    = [1.0, 0.9375, 0.833333..., 0.625]          (= 1, 15/16, 5/6, 5/8)
        timesteps = [1000.0, 937.5, 833.333..., 625.0]
    and the sampler ends at sigma 0 (the last step outputs x0). Without `warp`, t is the model timestep and
    sigma is the grid entry whose timestep is nearest to t (Self-Forcing's lookup).
    x0 = x_t - sigma_t * v;  x_{next} = (1 - sigma_next) * x0 + sigma_next * noise.
    """

    denoising_steps: tuple[float, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    warp: bool = True

    @staticmethod
    def shift_sigma(s: float, shift: float) -> float:
        return shift * s / (1 + (shift - 1) * s)

    @classmethod
    def self_forcing(cls) -> "FlowMatchSchedule":
        return cls()

    @property
    def num_steps(self) -> int:
        return len(self.denoising_steps)

    @property
    def sigmas(self) -> list[float]:
        T = self.num_train_timesteps
        if self.warp:
            return [self.shift_sigma(float(t) / T, self.shift) for t in self.denoising_steps]
        grid = [self.shift_sigma(1 - i / T, self.shift) for i in range(T)]
        return [min(grid, key=lambda s: abs(s * T - float(t))) for t in self.denoising_steps]

    @property
    def timesteps(self) -> list[float]:
        if self.warp:
            return [s * self.num_train_timesteps for s in self.sigmas]
        return [float(t) for t in self.denoising_steps]

    @property
    def next_sigmas(self) -> list[float]:
        return self.sigmas[1:] + [0.0]


# ---------------------------------------------------------------------------------------------- generator


class BlockCausalWan:
    """The model + its cache + the sampler: block-causal, few-step generation with static shapes.

    Per block: `generate_block(noise, context, phase)`; or, piece by piece, `cache.roll_()` (rolling phase),
    `denoise_step` x num_steps, `write_cache`. All offsets come from `phase` (Python ints).

    `live`: the sampler's coefficients (sigmas, 1 - sigma) are device tensors instead of Python floats, so
    `use_schedule` can switch to another schedule of as many steps between blocks (SDEdit's strength) by copying
    into them: compiled code and captured graphs read the new values, nothing recompiles. Each coefficient is the
    float32 rounding of the same double a Python float would give, so in float32 both forms compute the same."""

    def __init__(self, model: WanDiT, cache: KVCache, schedule: FlowMatchSchedule | None = None,
                 context_noise: float = 0.0, live: bool = False):
        self.model = model
        self.cache = cache
        self.schedule = schedule or FlowMatchSchedule()
        self.context_noise = float(context_noise)
        self.live = live
        dev = cache.device
        b, f = cache.batch_size, cache.frames_per_block
        # timesteps live on the device once; each step reads a [B, F] expanded view (no allocation)
        self._t = torch.tensor(self.schedule.timesteps, dtype=torch.float32, device=dev)
        self._t_ctx = torch.full((1,), self.context_noise, dtype=torch.float32, device=dev)
        self._bf = (b, f)
        coef = self._coefficients(self.schedule)
        if live:
            n = self.schedule.num_steps
            self._coef = torch.tensor(coef, dtype=torch.float32, device=dev)  # [3n + 1], rewritten in place
            self._sig, self._sig_next, self._keep_next = (self._coef[i * n:(i + 1) * n] for i in range(3))
            self._keep0 = self._coef[3 * n]
        else:
            n = self.schedule.num_steps
            self._sig, self._sig_next, self._keep_next = (coef[i * n:(i + 1) * n] for i in range(3))
            self._keep0 = coef[3 * n]
        # entered around the re-cache pass; a caller that compiles the per-block pieces for the block's shape
        # can run the re-cache (another token count, once per prompt switch) plain instead of compiling it too
        self.recache_scope = contextlib.nullcontext

    @staticmethod
    def _coefficients(schedule: FlowMatchSchedule) -> list[float]:
        """sigma_i, sigma_{i+1}, 1 - sigma_{i+1} for every step, then 1 - sigma_0 (SDEdit's start)."""
        sig, nxt = schedule.sigmas, schedule.next_sigmas
        return [*sig, *nxt, *(1 - s for s in nxt), 1.0 - sig[0]]

    def use_schedule(self, schedule: FlowMatchSchedule) -> None:
        """Sample with `schedule` (as many steps) from the next block on, in place (needs `live`)."""
        if not self.live:
            raise RuntimeError("use_schedule needs a BlockCausalWan built with live=True")
        if schedule.num_steps != self.schedule.num_steps:
            raise ValueError(f"a live schedule keeps its {self.schedule.num_steps} steps, got {schedule.num_steps}")
        with torch.no_grad():
            self._coef.copy_(torch.tensor(self._coefficients(schedule), dtype=torch.float32))
            self._t.copy_(torch.tensor(schedule.timesteps, dtype=torch.float32))
        self.schedule = schedule

    def phases(self) -> list[Phase]:
        return self.cache.phases()

    def phase_for_block(self, block_index: int) -> Phase:
        return self.cache.phase_for_block(block_index)

    def step_timestep(self, step: int) -> torch.Tensor:
        return self._t[step:step + 1].expand(*self._bf)

    @torch.no_grad()
    def set_context(self, context: torch.Tensor) -> None:
        """Compute the prompt's cross-attention keys/values into the cache (in place)."""
        for i, (k, v) in enumerate(self.model.cross_kv(context)):
            self.cache.cross[i, 0].copy_(k)
            self.cache.cross[i, 1].copy_(v)

    @torch.no_grad()
    def denoise_step(self, x_t: torch.Tensor, step: int, phase: Phase,
                     context: torch.Tensor | None = None) -> torch.Tensor:
        """One sampler step at `step`: returns the x0 prediction (float32); the cache is read, not changed."""
        flow = self.model.forward_block(x_t, self.step_timestep(step), context, self.cache, phase.cache_start)
        return x_t.float() - self._sig[step] * flow

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """x_t for step+1 from the x0 prediction of `step`."""
        return self._keep_next[step] * x0 + self._sig_next[step] * noise.float()

    @torch.no_grad()
    def write_cache(self, x0: torch.Tensor, phase: Phase, context: torch.Tensor | None = None) -> None:
        """Write the block's keys/values (clean latents at timestep `context_noise`) into its slot."""
        t = self._t_ctx.expand(*self._bf)
        self.model.forward_block(x0, t, context, self.cache, phase.cache_start, write_kv=True, return_output=False)
        f = x0.shape[2]
        self.cache.latents[:, :, phase.start_frame:phase.start_frame + f].copy_(x0)

    @torch.no_grad()
    def recache(self, phase: Phase) -> None:
        """LongLive's KV re-cache after a prompt switch, before `phase`'s block (and before its roll): the
        cached frames are re-encoded from their clean latents under the current cross-attention in ONE pass
        (timestep `context_noise`), all of them attending to each other. While the cache has not rolled that is
        every written frame, the sink included; once it has (frame_offset > 0), the sink keeps the old prompt's
        keys/values and the window frames attend to them, as LongLive with its global sink. One pass of
        max_frames frames, whatever the phase (the sink's selection is on the device)."""
        frames = self.cache.max_frames if phase.roll else phase.start_frame
        if frames == 0:
            return
        x0 = self.cache.latents[:, :, :frames]
        t = self._t_ctx.expand(self._bf[0], frames)
        keep = self.cache.frame_offset > 0 if self.cache.sink_frames else None
        with self.recache_scope():
            self.model.forward_block(x0, t, None, self.cache, 0, write_kv=True, return_output=False,
                                     keep_sink=keep)

    @torch.no_grad()
    def generate_block(self, noise: torch.Tensor, context: torch.Tensor | None, phase: Phase,
                       out: torch.Tensor | None = None, recache: bool = False,
                       start: torch.Tensor | None = None) -> torch.Tensor:
        """Generate one block. noise: [num_steps, B, C, F, H, W] -- noise[0] is x_T, noise[i] re-noises to
        step i (Self-Forcing draws fresh noise each step); a [B, C, F, H, W] noise is reused for every step.
        context: T5 features (their cross-attention k/v are (re)written into the cache first) or None (use
        the ones from `set_context`). recache: re-encode the cached frames under this context first (after a
        prompt switch). start: latents [B, C, F, H, W] to start from (SDEdit): x_T = (1 - sigma_0) * start +
        sigma_0 * noise[0]. Returns the clean latents x0 [B, C, F, H, W] (float32, or into `out`)."""
        if context is not None:
            self.set_context(context)
        if recache:
            self.recache(phase)
        if phase.roll:
            self.cache.roll_()
        per_step = noise.dim() == 6
        x = (noise[0] if per_step else noise).float()
        if start is not None:
            x = self._keep0 * start.float() + self._sig[0] * x
        x0 = x
        steps = self.schedule.num_steps
        for i in range(steps):
            x0 = self.denoise_step(x, i, phase)
            if i + 1 < steps:
                x = self.renoise(x0, noise[i + 1] if per_step else noise, i)
        self.write_cache(x0, phase)
        if out is not None:
            out.copy_(x0)
            return out
        return x0


# ------------------------------------------------------------------------------------------ checkpoints


_WRAPPER_KEYS = ("generator_ema", "generator", "state_dict", "model", "module", "ema", "net")
_PREFIXES = ("generator_ema.", "generator.", "model.", "module.", "diffusion_model.", "_orig_mod.")
_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrap(sd: Mapping, prefer_ema: bool) -> Mapping:
    keys = _WRAPPER_KEYS if prefer_ema else tuple(k for k in _WRAPPER_KEYS if k != "generator_ema") + ("generator_ema",)
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for k in keys:
            if isinstance(sd.get(k), Mapping):
                sd = sd[k]
                break
        else:
            break
    return sd


def normalize_wan_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the wrapper prefixes/infixes that Self-Forcing / CausVid / FSDP / torch.compile add."""
    out = {}
    for key, val in sd.items():
        if not isinstance(val, torch.Tensor):
            continue
        k = key
        for inf in _INFIXES:
            k = k.replace(inf, "")
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = val
    return out


def _few(keys: Sequence[str], n: int = 10) -> str:
    return (", ".join(keys[:n]) + (" ..." if len(keys) > n else "")) or "none"


def load_wan_state_dict(model: nn.Module, src, strict: bool = True, prefer_ema: bool = True):
    """Load Wan weights into `model` from a safetensors file, a torch .pt/.pth file or a dict.

    Torch files may wrap the weights under `generator_ema` / `generator` / `state_dict` / `model` (EMA
    preferred unless prefer_ema=False); key prefixes such as `model.`, `generator.model.`,
    `_fsdp_wrapped_module.` are stripped. Values are cast to each parameter's dtype. A model built on the
    `meta` device is materialised from the checkpoint (on the CPU, in the meta model's dtype: build it as
    `WanDiT(cfg).to(torch.bfloat16)` under `torch.device("meta")` to load bf16 without a float32 copy). strict: any missing or unexpected key, or a shape
    mismatch, raises ValueError naming them. Returns (missing, unexpected) key lists.
    """
    if isinstance(src, (str, Path)):
        p = Path(src)
        if not p.exists():
            raise FileNotFoundError(p)
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            try:
                sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
        where = str(p)
    elif isinstance(src, Mapping):
        sd, where = src, "state dict"
    else:
        raise TypeError(f"cannot load Wan weights from {type(src).__name__}")
    sd = normalize_wan_keys(_unwrap(sd, prefer_ema))
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if strict and (missing or unexpected or bad):
        msg = (f"Wan weights from {where} do not fit {type(model).__name__}: "
               f"{len(missing)} missing keys: {_few(missing)}; {len(unexpected)} unexpected keys: {_few(unexpected)}")
        if bad:
            msg += "; shape mismatches: " + _few([f"{k} {list(sd[k].shape)} vs {list(want[k].shape)}" for k in bad])
        raise ValueError(msg)
    load = {k: sd[k].to(want[k].dtype) for k in want if k in sd and k not in bad}
    is_meta = any(t.is_meta for t in want.values())
    model.load_state_dict(load, strict=False, assign=is_meta)
    return missing, unexpected


# ------------------------------------------------------------------------------------------- random init


@torch.no_grad()
def init_random_(model: WanDiT, seed: int = 0) -> WanDiT:
    """Random weights (any size, any dtype/device; run it on the GPU for the 1.3B model): weights
    N(0, 1/fan_in) (the output projections and the second FFN layer further scaled by 1/sqrt(2*layers)),
    biases 0, norm weights 1, modulations N(0, 1/dim) (as Wan). Activations stay O(1), so it is bf16-safe."""
    g = None
    layers = max(1, len(getattr(model, "blocks", [])))
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError("init_random_: materialise the model first (e.g. model.to_empty(device=...))")
        if g is None:
            g = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith("modulation"):
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        elif name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:  # norm weights
            p.fill_(1.0)
        else:
            std = (p[0].numel()) ** -0.5
            if name.endswith((".o.weight", "ffn.2.weight")):
                std /= math.sqrt(2 * layers)
            if name == "head.head.weight":
                std *= 0.5
            p.normal_(0.0, std, generator=g)
    return model
