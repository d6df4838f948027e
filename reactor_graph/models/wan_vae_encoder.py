"""Wan 2.1 causal VAE *encoder*, streamed one block of frames at a time over fixed caches.

Architecture
------------
The encoder half of Wan 2.1's video VAE (``wan/modules/vae.py``) rebuilt from the decoder's building blocks
(:mod:`reactor_graph.models.wan_vae`) with the same module tree, so the ``encoder.*`` and top-level ``conv1.*``
entries of ``Wan2.1_VAE.pth`` load as they are (``decoder.*`` and ``conv2.*`` are ignored)::

    encoder.conv1               CausalConv3d(3, d, 3)                  encoder.conv1.weight
    encoder.downsamples.0..10   4 stages of 2 ResidualBlocks, a DownResample after each of the first 3
                                (modes downsample2d, downsample3d, downsample3d); widths d, 2d, 4d, 4d
    encoder.middle.{0,2}        ResidualBlock(4d, 4d)                  encoder.middle.0.residual.2.weight
    encoder.middle.1            AttentionBlock(4d)                     encoder.middle.1.to_qkv.weight
    encoder.head                RMS_norm, SiLU, CausalConv3d(4d, 2z, 3)
    conv1                       CausalConv3d(2z, 2z, 1): mean | log-variance

with ``d = dim`` (96 for the real model; tests use e.g. 4) and ``z = 16``. A ``DownResample`` pads the right and
bottom by one pixel and runs a 3x3 stride-2 conv on every frame; ``downsample3d`` then halves time with a conv of
kernel 3, stride 2 over ``[previous frame, frames]``. Spatial downsampling 8x, temporal 4x. The latent is the
mean, normalised with Wan 2.1's public per-channel statistics: ``(mu - mean) / std``, the DiT's space (the
decoder undoes it).

Causality and streaming
-----------------------
Wan encodes a video in chunks of 1, 4, 4, ... frames: ``1 + 4k`` frames give ``1 + k`` latent frames. Across the
chunks it carries, per causal conv of temporal kernel 3, the last 2 frames of that conv's input (zeros before the
video), and per ``downsample3d`` the last frame of its input; the first chunk's single frame passes a
``downsample3d`` without its time conv. Here the same carried state lives in preallocated buffers updated in place
(``CausalConv3d.cache`` ``[B, C, 2, h_k, w_k]``, ``DownResample.last`` ``[B, C, 1, h_k, w_k]``), and a block may
hold several chunks at once (convolution windows do not depend on where the chunks were cut), in two phases:

* phase 0 (``PHASE_FIRST``): the first block of a session, ``4t - 3`` frames (1 + 4(t-1)) -> ``t`` latents;
  each ``downsample3d`` passes its first frame through and runs its time conv over the rest, windows from frame 0.
* phase 1 (``PHASE_STEADY``): every later block, ``4t`` frames -> ``t`` latents; the time conv reads the carried
  last frame first.

The phase is a host-side Python int that selects static code (the decoder's convention), so a compiled or
CUDA-graph-captured block has one variant per phase; ``reset()`` zeroes the state in place (addresses kept).

``encode_full`` is the straightforward non-streaming reference: zero causal padding over the whole sequence, the
first-frame rule at every ``downsample3d``, frames past the last whole chunk dropped (as Wan's ``encode``); it
never touches the state. Layout: ``[B, 3, T, H, W]`` frames in [-1, 1] (Wan's) -> ``[B, 16, t, H/8, W/8]``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from reactor_graph.models.streaming import PHASE_FIRST, StreamingDecoder
from reactor_graph.models.wan_vae import (
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    AttentionBlock,
    CausalConv3d,
    RMS_norm,
    ResidualBlock,
    _batch_to_frames,
    _frames_to_batch,
    _is_encoder_key,
)
from reactor_graph.weights import load_exact, read_state_dict

__all__ = ["DownResample", "Encoder3d", "WanVAEEncoder", "load_wan_vae_encoder", "load_encoder_state_dict"]


class DownResample(nn.Module):
    """2x spatial downsampling (pad right/bottom, 3x3 stride-2 conv); ``downsample3d`` also halves time.

    ``last`` (non-persistent buffer, ``[B, C, 1, h, w]``) holds the previous block's last frame (after the
    spatial downsampling) while streaming, for the first window of the block's time conv.
    """

    last: torch.Tensor | None

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("downsample2d", "downsample3d"):
            raise ValueError(f"encoder Resample mode must be downsample2d or downsample3d, got {mode!r}")
        self.dim = dim
        self.mode = mode
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.register_buffer("last", None, persistent=False)

    def allocate_last(self, batch: int, height: int, width: int, device, dtype) -> None:
        if self.mode == "downsample3d":
            self.last = torch.zeros(batch, self.dim, 1, height, width, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, stream: bool = False, phase: int = PHASE_FIRST) -> torch.Tensor:
        x = _batch_to_frames(self.resample(_frames_to_batch(x)), x.shape[0])
        if self.mode != "downsample3d":
            return x
        if stream and phase != PHASE_FIRST:
            y = self.time_conv(torch.cat([self.last, x], dim=2))  # 2m frames -> m
        elif x.shape[2] > 1:
            y = torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)  # 1 + 2m frames -> 1 + m
        else:
            y = x  # a one-frame video: its frame is its latent frame
        if stream:
            self.last.copy_(x[:, :, -1:])
        return y


class Encoder3d(nn.Module):
    """Wan 2.1 ``Encoder3d`` (same module tree and parameter names); ``z_dim`` output channels (2 x 16)."""

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 32,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temperal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
    ):
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downsamples: list[nn.Module] = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    downsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                downsamples.append(DownResample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = nn.Sequential(
            ResidualBlock(out_dim, out_dim, dropout), AttentionBlock(out_dim), ResidualBlock(out_dim, out_dim, dropout)
        )
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))
        self.s_downscale = 2 ** (len(dim_mult) - 1)

    def stateful(self) -> Iterator[tuple[str, nn.Module, int]]:
        """``(name, module, spatial scale relative to the latent)`` of every conv with a time cache and every
        ``downsample3d``, in registration order (the order they run)."""
        scale = self.s_downscale
        for name, mod in self.named_modules():
            if isinstance(mod, DownResample):
                scale //= 2  # its own time conv and everything after run at the lower resolution
                if mod.mode == "downsample3d":
                    yield name, mod, scale
            elif isinstance(mod, CausalConv3d) and mod.time_pad > 0:
                yield name, mod, scale

    def forward(self, x: torch.Tensor, stream: bool = False, phase: int = PHASE_FIRST) -> torch.Tensor:
        x = self.conv1(x, stream)
        for layer in [*self.downsamples, *self.middle]:
            if isinstance(layer, ResidualBlock):
                x = layer(x, stream)
            elif isinstance(layer, DownResample):
                x = layer(x, stream, phase)
            else:
                x = layer(x)
        for layer in self.head:
            x = layer(x, stream) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class WanVAEEncoder(StreamingDecoder):
    """Wan 2.1 VAE encoder (``encoder`` + ``conv1``) with block streaming over preallocated state:
    ``[B, 3, T, H, W]`` frames in [-1, 1] -> ``[B, 16, t, H/8, W/8]`` normalised latents (the mean).

    Args:
        dim: base width (96 for the real Wan 2.1 VAE).
        z_dim: latent channels (16).
        dim_mult, num_res_blocks, attn_scales, temperal_downsample: as Wan (the defaults are Wan 2.1's).
        latents_mean, latents_std: per-channel statistics of the normalisation (Wan 2.1's public values).
    """

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temperal_downsample: Sequence[bool] = (False, True, True),
        latents_mean: Sequence[float] = WAN21_LATENT_MEAN,
        latents_std: Sequence[float] = WAN21_LATENT_STD,
    ):
        super().__init__()
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean / latents_std need {z_dim} values")
        self.dim, self.z_dim = dim, z_dim
        self.encoder = Encoder3d(dim, 2 * z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        std = torch.tensor(latents_std, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
        self.register_buffer(
            "latents_mean", torch.tensor(latents_mean, dtype=torch.float32).view(1, z_dim, 1, 1, 1), persistent=False
        )
        # Wan multiplies by 1 / std rather than dividing: the same rounding
        self.register_buffer("latents_inv_std", 1.0 / std, persistent=False)
        self.t_downscale = 2 ** sum(bool(v) for v in temperal_downsample[: len(dim_mult) - 1])
        self.s_downscale = self.encoder.s_downscale

    # ------------------------------------------------------------------ state
    def _allocate_buffers(self, batch_size, latent_height, latent_width, device, dtype) -> None:
        for _, mod, scale in self.encoder.stateful():
            h, w = latent_height * scale, latent_width * scale
            if isinstance(mod, DownResample):
                mod.allocate_last(batch_size, h, w, device, dtype)
            else:
                mod.allocate_cache(batch_size, h, w, device, dtype)

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """The allocated state by name (``encoder.<layer>.cache``, ``encoder.<resample>.last``)."""
        out = {}
        for name, mod, _ in self.encoder.stateful():
            buf, kind = (mod.last, "last") if isinstance(mod, DownResample) else (mod.cache, "cache")
            if buf is not None:
                out[f"encoder.{name}.{kind}"] = buf
        return out

    def _ensure_state(self, frames: torch.Tensor) -> None:
        b, h, w = frames.shape[0], frames.shape[-2] // self.s_downscale, frames.shape[-1] // self.s_downscale
        key = (b, h, w, frames.device, frames.dtype)
        if self._state_key != key:
            if torch.compiler.is_compiling():
                raise RuntimeError("WanVAEEncoder: call allocate_state() before compiling the block encode")
            self.allocate_state(b, h, w, frames.device, frames.dtype)

    # ------------------------------------------------------------------ encoding
    def frames_per_block(self, num_latent_frames: int, phase: int) -> int:
        """Input frames for ``num_latent_frames`` latents in ``phase``: ``4t - 3`` first, ``4t`` after."""
        n = self.t_downscale * num_latent_frames
        return n - (self.t_downscale - 1) if phase == PHASE_FIRST else n

    def _check(self, frames: torch.Tensor) -> None:
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames [B, 3, T, H, W], got {tuple(frames.shape)}")
        if frames.shape[-2] % self.s_downscale or frames.shape[-1] % self.s_downscale:
            raise ValueError(f"frame size {tuple(frames.shape[-2:])} is not a multiple of {self.s_downscale}")

    def _latents(self, features: torch.Tensor) -> torch.Tensor:
        mu = self.conv1(features)[:, : self.z_dim]  # the log-variance half is not used
        return (mu - self.latents_mean.to(mu.dtype)) * self.latents_inv_std.to(mu.dtype)

    def block_forward(self, frames: torch.Tensor, phase: int) -> torch.Tensor:
        """Encode one block with the state (updated in place); the compile / capture target.

        ``phase`` must be a Python int: ``4t - 3`` frames in phase 0, ``4t`` in phase 1.
        """
        self._check(frames)
        t, k = frames.shape[2], self.t_downscale
        if (phase == PHASE_FIRST and t % k != 1) or (phase != PHASE_FIRST and t % k):
            want = f"{k}t - {k - 1}" if phase == PHASE_FIRST else f"a multiple of {k}"
            raise ValueError(f"a {'first' if phase == PHASE_FIRST else 'later'} block needs {want} frames, got {t}")
        x = frames.to(self.conv1.weight.dtype)
        return self._latents(self.encoder(x, stream=True, phase=phase))

    def encode_block(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode the session's next block: ``4t - 3`` frames the first time, ``4t`` after -> ``t`` latents (the
        base class's streaming step, `decode_block` by its name there)."""
        return self.decode_block(frames)

    def encode_full(self, frames: torch.Tensor) -> torch.Tensor:
        """Non-streaming reference: encode a whole video at once (state untouched)."""
        self._check(frames)
        usable = 1 + self.t_downscale * ((frames.shape[2] - 1) // self.t_downscale)
        x = frames[:, :, :usable].to(self.conv1.weight.dtype)
        return self._latents(self.encoder(x, stream=False))


# ---------------------------------------------------------------------- loading
def load_encoder_state_dict(model: WanVAEEncoder, sd: Mapping[str, torch.Tensor]) -> None:
    """Load the encoder half of Wan VAE weights (``encoder.*``, ``conv1.*``); the decoder half is ignored,
    everything else must match. Raises ``ValueError`` naming missing, unexpected and wrongly shaped keys."""
    load_exact(model, {k: v for k, v in sd.items() if _is_encoder_key(k)}, "Wan VAE encoder")


def load_wan_vae_encoder(
    path: str | os.PathLike,
    *,
    dim: int | None = None,
    z_dim: int = 16,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> WanVAEEncoder:
    """Build a :class:`WanVAEEncoder` and load the encoder half of ``Wan2.1_VAE.pth`` (or .safetensors).

    ``dim`` is read from ``encoder.conv1.weight`` when not given (96 for the real checkpoint).
    """
    sd = read_state_dict(path)
    if dim is None:
        if "encoder.conv1.weight" not in sd:
            raise ValueError(f"{path}: no Wan VAE encoder weights (encoder.conv1.weight)")
        dim = int(sd["encoder.conv1.weight"].shape[0])
    model = WanVAEEncoder(dim=dim, z_dim=z_dim, **kwargs)
    load_encoder_state_dict(model, sd)
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
