"""Wan 2.1 causal VAE *decoder*, streamed one block of latent frames at a time over fixed caches.

Architecture
------------
A re-implementation of the decoder half of Wan 2.1's video VAE (``wan/modules/vae.py``) with the
same module tree, so the ``conv2.*`` and ``decoder.*`` entries of ``Wan2.1_VAE.pth`` load as they
are (``encoder.*`` and the encoder-side top-level ``conv1.*`` are ignored by :func:`load_wan_vae`)::

    conv2                       CausalConv3d(z, z, 1)              conv2.weight / conv2.bias
    decoder.conv1               CausalConv3d(z, 4d, 3)             decoder.conv1.weight
    decoder.middle.{0,2}        ResidualBlock(4d, 4d)              decoder.middle.0.residual.2.weight
    decoder.middle.1            AttentionBlock(4d)                 decoder.middle.1.to_qkv.weight
    decoder.upsamples.0..14     3 x (3 ResidualBlocks + Resample), then 3 ResidualBlocks
                                (Resample modes upsample3d, upsample3d, upsample2d)
    decoder.head                RMS_norm, SiLU, CausalConv3d(d, 3, 3)   decoder.head.2.weight

with base width ``d = dim`` (96 for the real model; tests use e.g. 8) and ``z = z_dim = 16``.
Spatial upsampling is 8x and temporal upsampling 4x (the two ``upsample3d`` stages).

Causality and the feature cache
-------------------------------
Every ``CausalConv3d`` with a temporal kernel of 3 pads 2 frames *before* the sequence (zeros at the
start of a video) and none after.  Streaming keeps, per such conv, the last ``CACHE_T = 2`` frames of
that conv's input in a preallocated buffer (``CausalConv3d.cache``, ``[B, C_in, 2, H_k, W_k]`` at the
layer's resolution).  A block runs the conv on ``cat(cache, x)`` and then overwrites the cache in place
(``copy_``) with the last 2 frames of that concatenation.  Zeroed caches reproduce Wan's zero padding
at the start of a session exactly, so the caches need no "empty" special case.  RMS_norm,
AttentionBlock (per-frame spatial attention) and the 2-D convs do not mix time and keep no state.

Time upsampling and the phase
-----------------------------
In Wan's reference decode (one latent frame per decoder call, cache list starting as ``None``) an
``upsample3d`` Resample passes the *first* frame of a video through without its ``time_conv`` (that is
the ``'Rep'`` marker), and feeds every later frame through a causal ``time_conv`` (zero history) that
doubles it (channel halves emitted in order).  Two such stages make latent frame 0 give 1 frame and
every later latent frame 4 frames: ``1 + 4 * (T - 1)`` frames for ``T`` latents.

Here that difference is a bounded, host-side *phase* (a Python int), not data-dependent control flow:

* phase 0 (``PHASE_FIRST``): the first block of a session; at each ``upsample3d`` the block's first
  frame skips ``time_conv``.  ``T`` latent frames -> ``4 * T - 3`` frames (1 -> 1, 3 -> 9).
* phase 1 (``PHASE_STEADY``): every later block; all frames go through ``time_conv`` with its cache.
  ``T`` latent frames -> ``4 * T`` frames (3 -> 12).

The phase only selects static slices, so a compiled / CUDA-graph-captured block function has at most
two variants (one per phase, and one per block length ``T``).  ``decode_block`` advances the phase
after each block; ``reset()`` zeroes every cache in place (addresses unchanged) and returns to phase 0.

Latent normalisation: the incoming latents are in the diffusion model's normalised space and are
un-normalised with Wan 2.1's public per-channel statistics (``z * std + mean``; Wan writes it as
``z / (1 / std) + mean``) before ``conv2``.  Output frames are clamped to [-1, 1] like ``WanVAE.decode``.

Compile / capture usage: ``allocate_state(batch, h, w, device, dtype)`` (or run one eager block), then
compile ``block_forward`` (``dec.block_forward = torch.compile(dec.block_forward, fullgraph=True)``);
``decode_block`` passes the phase in and advances it outside the compiled region.  Decode under
``torch.no_grad()`` / ``torch.inference_mode()``.

``decode_full`` is the straightforward non-streaming reference: zero causal padding over the whole
sequence and the first-frame rule of ``upsample3d`` applied to frame 0; it never touches the caches.
It equals Wan's own ``WanVAE_.decode`` (checked once against the public code with random weights,
to about 4e-6; that check is not part of the test suite).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reactor_graph.models.streaming import PHASE_FIRST, PHASE_STEADY, StreamingDecoder
from reactor_graph.weights import load_exact, read_state_dict

__all__ = [
    "CACHE_T",
    "PHASE_FIRST",
    "PHASE_STEADY",
    "WAN21_LATENT_MEAN",
    "WAN21_LATENT_STD",
    "CausalConv3d",
    "RMS_norm",
    "ResidualBlock",
    "AttentionBlock",
    "Resample",
    "Decoder3d",
    "WanVAEDecoder",
    "load_wan_vae",
    "load_decoder_state_dict",
]

CACHE_T = 2

# Wan 2.1 per-channel latent statistics (public values from Wan's vae.py).
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 values, got {v!r}")
    return t  # type: ignore[return-value]


class CausalConv3d(nn.Conv3d):
    """3-D conv, causal in time: ``2 * padding_t`` frames of history before each output frame.

    Spatial padding is the ordinary symmetric zero padding.  While streaming, the history comes from
    ``cache`` (non-persistent buffer of the last ``time_pad`` input frames), updated in place.
    """

    cache: torch.Tensor | None

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0, stride=1):
        pt, ph, pw = _triple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt
        self.register_buffer("cache", None, persistent=False)

    def allocate_cache(self, batch: int, height: int, width: int, device, dtype) -> None:
        if self.time_pad > 0:
            self.cache = torch.zeros(
                batch, self.in_channels, self.time_pad, height, width, device=device, dtype=dtype
            )

    def forward(self, x: torch.Tensor, stream: bool = False) -> torch.Tensor:
        if self.time_pad > 0:
            if stream:
                x = torch.cat([self.cache, x], dim=2)
                self.cache.copy_(x[:, :, -self.time_pad :])
            else:
                x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
        return super().forward(x)


class RMS_norm(nn.Module):  # noqa: N801 - public class name kept for recognisability
    """L2 normalisation over channels times ``sqrt(dim) * gamma`` (Wan's RMS_norm, no bias)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, stream: bool = False) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, stream) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).permute(0, 2, 1, 3, 4)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no time mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        y = self.norm(_frames_to_batch(x))
        q, k, v = self.to_qkv(y).reshape(b * t, 1, c * 3, h * w).transpose(-1, -2).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return _batch_to_frames(self.proj(y), b) + identity


class Resample(nn.Module):
    """2x spatial upsampling (nearest + 3x3 conv to ``dim // 2``); ``upsample3d`` also doubles time.

    ``upsample3d``: ``time_conv`` (causal, kernel 3 in time) maps each frame to two (first / second
    channel half), except the first frame of a session, which passes through without it.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d"):
            raise ValueError(f"decoder Resample mode must be upsample2d or upsample3d, got {mode!r}")
        self.dim = dim
        self.mode = mode
        # Nearest 2x copies pixels, so nearest-exact (Wan's choice) gives the same values in any dtype.
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def _double_time(self, x: torch.Tensor, stream: bool) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.time_conv(x, stream)  # [b, 2c, t, h, w]
        return y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def forward(self, x: torch.Tensor, stream: bool = False, phase: int = PHASE_FIRST) -> torch.Tensor:
        if self.mode == "upsample3d":
            if stream and phase != PHASE_FIRST:
                x = self._double_time(x, stream)
            elif x.shape[2] > 1:
                # The first frame of the session skips time_conv; the rest is doubled.
                x = torch.cat([x[:, :, :1], self._double_time(x[:, :, 1:], stream)], dim=2)
        b = x.shape[0]
        return _batch_to_frames(self.resample(_frames_to_batch(x)), b)


class Decoder3d(nn.Module):
    """Wan 2.1 ``Decoder3d`` (same module tree and parameter names)."""

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temperal_upsample: Sequence[bool] = (True, True, False),
        dropout: float = 0.0,
    ):
        super().__init__()
        dim_mult = list(dim_mult)
        dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)

        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0], dropout)
        )
        upsamples: list[nn.Module] = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim = in_dim // 2  # the previous Resample halved the channels
            for _ in range(num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    upsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                upsamples.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def cached_convs(self) -> Iterator[tuple[str, CausalConv3d, int]]:
        """``(name, conv, spatial scale relative to the latent)`` for every conv with a time cache."""
        scale = 1
        for name, mod in self.named_modules():  # registration order: conv1, middle, upsamples, head
            if isinstance(mod, Resample):
                scale *= 2  # its time_conv runs before the spatial upsampling, hence scale // 2
            elif isinstance(mod, CausalConv3d) and mod.time_pad > 0:
                yield name, mod, (scale // 2 if name.endswith(".time_conv") else scale)

    def forward(self, x: torch.Tensor, stream: bool = False, phase: int = PHASE_FIRST) -> torch.Tensor:
        x = self.conv1(x, stream)
        for layer in self.middle:
            x = layer(x, stream) if isinstance(layer, ResidualBlock) else layer(x)
        for layer in self.upsamples:
            if isinstance(layer, ResidualBlock):
                x = layer(x, stream)
            elif isinstance(layer, Resample):
                x = layer(x, stream, phase)
            else:
                x = layer(x)
        for layer in self.head:
            x = layer(x, stream) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class WanVAEDecoder(StreamingDecoder):
    """Wan 2.1 VAE decoder (``conv2`` + ``decoder``) with block streaming over preallocated caches
    (`StreamingDecoder`): ``[B, 16, T, h, w]`` normalised latents -> ``[B, 3, T', 8h, 8w]`` frames in [-1, 1].

    Args:
        dim: base width (96 for the real Wan 2.1 VAE).
        z_dim: latent channels (16).
        dim_mult, num_res_blocks, attn_scales, temperal_upsample: as Wan (the defaults are Wan 2.1's).
        latents_mean, latents_std: per-channel statistics used to un-normalise the latents; default
            to Wan 2.1's public values (required length ``z_dim``).
    """

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temperal_upsample: Sequence[bool] = (True, True, False),
        latents_mean: Sequence[float] = WAN21_LATENT_MEAN,
        latents_std: Sequence[float] = WAN21_LATENT_STD,
    ):
        super().__init__()
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean / latents_std need {z_dim} values")
        self.z_dim = z_dim
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_upsample)
        self.register_buffer(
            "latents_mean", torch.tensor(latents_mean, dtype=torch.float32).view(1, z_dim, 1, 1, 1), persistent=False
        )
        self.register_buffer(
            "latents_std", torch.tensor(latents_std, dtype=torch.float32).view(1, z_dim, 1, 1, 1), persistent=False
        )
        self.t_upscale = 2 ** sum(bool(v) for v in temperal_upsample[: len(dim_mult) - 1])
        self.s_upscale = 2 ** (len(dim_mult) - 1)

    # ------------------------------------------------------------------ state
    def _allocate_buffers(self, batch_size, latent_height, latent_width, device, dtype) -> None:
        for _, conv, scale in self.decoder.cached_convs():
            conv.allocate_cache(batch_size, latent_height * scale, latent_width * scale, device, dtype)

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """The allocated caches by name (``decoder.<layer>.cache``)."""
        return {
            f"decoder.{name}.cache": conv.cache
            for name, conv, _ in self.decoder.cached_convs()
            if conv.cache is not None
        }

    # ------------------------------------------------------------------ decoding
    def frames_per_block(self, num_latent_frames: int, phase: int) -> int:
        """Output frames for a block of latents in ``phase``: ``4T - 3`` first, ``4T`` after."""
        n = self.t_upscale * num_latent_frames
        return n - (self.t_upscale - 1) if phase == PHASE_FIRST else n

    def _unnormalize(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"expected latents [B, {self.z_dim}, T, h, w], got {tuple(latents.shape)}")
        return latents * self.latents_std.to(latents.dtype) + self.latents_mean.to(latents.dtype)

    def block_forward(self, latents: torch.Tensor, phase: int) -> torch.Tensor:
        """Decode one block with the caches (updated in place); the compile / capture target.

        ``phase`` must be a Python int (0 or 1).
        """
        x = self.conv2(self._unnormalize(latents))
        return self.decoder(x, stream=True, phase=phase).clamp(-1.0, 1.0)

    def decode_full(self, latents: torch.Tensor) -> torch.Tensor:
        """Non-streaming reference: decode a whole latent video at once (caches untouched)."""
        x = self.conv2(self._unnormalize(latents))
        return self.decoder(x, stream=False).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------- loading
def _is_encoder_key(key: str) -> bool:
    # ``conv1`` at the top level is the encoder's mu / log-var projection.
    return key.startswith("encoder.") or key.startswith("conv1.")


def load_decoder_state_dict(model: WanVAEDecoder, sd: Mapping[str, torch.Tensor]) -> None:
    """Load Wan VAE weights into ``model``; encoder keys are ignored, everything else must match.

    Raises ``ValueError`` naming missing, unexpected and wrongly shaped keys.
    """
    sd = {k: v for k, v in sd.items() if not _is_encoder_key(k)}
    load_exact(model, sd, "Wan VAE")


def load_wan_vae(
    path: str | os.PathLike,
    *,
    dim: int | None = None,
    z_dim: int = 16,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> WanVAEDecoder:
    """Build a :class:`WanVAEDecoder` and load the decoder half of ``Wan2.1_VAE.pth`` (or .safetensors).

    ``dim`` is read from ``decoder.head.0.gamma`` when not given (96 for the real checkpoint).
    """
    sd = read_state_dict(path)
    if dim is None:
        gamma = sd.get("decoder.head.0.gamma")
        dim = int(gamma.shape[0]) if gamma is not None else 96
    model = WanVAEDecoder(dim=dim, z_dim=z_dim, **kwargs)
    load_decoder_state_dict(model, sd)
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
