"""TAEHV-style tiny causal video decoder (Wan 2.1 latent space), streamed one block at a time.

Architecture
------------
The decoder mirrors the public TAEHV decoder (madebyollin/taehv) so that the decoder half of a real
``taew2_1.pth`` / ``taew2_1.safetensors`` loads unchanged.  It is a flat ``nn.Sequential`` stored as
``self.decoder``, so parameter names are ``decoder.<index>.<...>`` exactly as in the public file::

    0  Clamp                       (tanh(x / 3) * 3, no params)
    1  Conv2d(16 -> c0, 3x3)       decoder.1.weight / decoder.1.bias
    2  ReLU
    3..5   MemBlock(c0, c0)        decoder.3.conv.{0,2,4}.{weight,bias}
    6  Upsample(x2 spatial)
    7  TGrow(c0, 1)                decoder.7.conv.weight   (no time upsampling at this stage)
    8  Conv2d(c0 -> c1, no bias)   decoder.8.weight
    9..11  MemBlock(c1, c1)
    12 Upsample(x2)
    13 TGrow(c1, 2)                decoder.13.conv.weight
    14 Conv2d(c1 -> c2, no bias)
    15..17 MemBlock(c2, c2)
    18 Upsample(x2)
    19 TGrow(c2, 2)                decoder.19.conv.weight
    20 Conv2d(c2 -> c3, no bias)
    21 ReLU
    22 Conv2d(c3 -> 3, 3x3)        decoder.22.weight / decoder.22.bias

with ``(c0, c1, c2, c3) = (256, 128, 64, 64)`` for the real model (tests use tiny widths).  Spatial
upsampling is 8x, temporal upsampling 4x (two TGrow(2) stages).  A ``MemBlock`` mixes each frame with
the *previous* frame of its own input (zeros before the first frame); a ``TGrow(s)`` turns every frame
into ``s`` frames by a 1x1 conv to ``s * C`` channels whose channel groups are emitted in order.

Streaming and state
-------------------
``decode_block(latents)`` decodes a block of ``T`` latent frames (``[B, T, 16, h, w]``, TAEHV's NTCHW
layout) inside one session.  The only temporal memory between blocks is, for every MemBlock, the last
frame of that MemBlock's input from the previous block.  These live in fixed, preallocated buffers
(``MemBlock.memory``, shape ``[B, C, h_k, w_k]`` at that stage's resolution) that are read and then
overwritten in place with ``copy_``; no cache tensor is created per block, so a block decode has fixed
addresses and no host synchronisation and can be ``torch.compile``-d / CUDA-graph captured.

* TGrow ordering needs no cross-block state: a block always holds whole latent frames, and each latent
  frame expands to its own ``t_upscale`` consecutive output frames (first channel group first).
* The frames TAEHV trims at the very start of a video (``frames_to_trim = t_upscale - 1 = 3`` for
  Wan 2.1) are handled by a bounded *phase*, a host-side Python int, not by data-dependent control flow:

  - phase 0 (``PHASE_FIRST``): the first block of a session; the first 3 decoded frames are dropped,
    so ``T`` latent frames give ``4 * T - 3`` frames (3 latents -> 9 frames).
  - phase 1 (``PHASE_STEADY``): every later block; ``T`` latent frames give ``4 * T`` frames
    (3 latents -> 12 frames).

  The phase only changes a static slice (hence the output shape), so a compiled / captured block
  function has at most two variants, one per phase.  The MemBlock "empty memory" at the start of a
  session is simply the zeroed buffers, which ``reset()`` restores.

This matches Wan 2.1's own causal VAE frame count (``1 + 4 * (T_total - 1)`` for ``T_total`` latents).

Value range: TAEHV natively produces RGB in [0, 1] (it clamps to [0, 1]).  Both ``decode_block`` and
``decode_full`` clamp to [0, 1] and then map to [-1, 1] (``2 * x - 1``) so the output range matches the
Wan VAE decoder in :mod:`reactor_graph.models.wan_vae`.

Compile / capture usage: call ``allocate_state(batch, h, w, device, dtype)`` (or run one eager block),
then compile ``block_forward`` (e.g. ``dec.block_forward = torch.compile(dec.block_forward,
fullgraph=True)``); ``decode_block`` passes the current phase to it and advances the phase afterwards,
outside the compiled region.

``decode_full`` is the straightforward non-streaming reference (whole sequence at once, memory by a
zero-padded time shift, trim of the first frames); it never touches the state buffers.  It equals the
public ``TAEHV.decode_video`` mapped to [-1, 1] (checked once with random weights, outside the tests).
Decode under ``torch.no_grad()`` / ``torch.inference_mode()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reactor_graph.models.streaming import PHASE_FIRST, PHASE_STEADY, StreamingDecoder
from reactor_graph.weights import load_exact, read_state_dict

__all__ = [
    "PHASE_FIRST",
    "PHASE_STEADY",
    "TAEHVDecoder",
    "TAEHVEncoder",
    "MemBlock",
    "TPool",
    "TGrow",
    "Clamp",
    "load_taehv",
    "load_taehv_encoder",
    "read_state_dict",
]


DEFAULT_CHANNELS = (256, 128, 64, 64)


def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the incoming latents to about [-3, 3]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3.0) * 3.0


class MemBlock(nn.Module):
    """Residual conv block that sees the current frame and the previous frame of its own input.

    ``memory`` (non-persistent buffer, ``[B, n_in, H, W]``) holds the last input frame of the previous
    block while streaming; it is allocated once and updated in place.
    """

    memory: torch.Tensor | None

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in = n_in
        self.conv = nn.Sequential(
            _conv3x3(n_in * 2, n_out), nn.ReLU(), _conv3x3(n_out, n_out), nn.ReLU(), _conv3x3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()
        self.register_buffer("memory", None, persistent=False)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))

    def previous_frames(self, x: torch.Tensor, batch: int, stream: bool) -> torch.Tensor:
        """For ``x`` of shape ``[B*T, C, H, W]`` (batch-major), the frame before each frame.

        ``stream=True`` takes the frame before the block from ``memory`` and then stores this
        block's last frame there (in place).  ``stream=False`` uses zeros before the first frame.
        """
        xt = x.reshape(batch, -1, *x.shape[1:])
        if stream:
            past = torch.cat([self.memory.unsqueeze(1), xt[:, :-1]], dim=1)
            self.memory.copy_(xt[:, -1])
        else:
            past = F.pad(xt, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]
        return past.reshape(x.shape)


class TGrow(nn.Module):
    """Temporal upsampling: every frame becomes ``stride`` frames (1x1 conv to ``stride * C``)."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class MemBlockState:
    """The streaming state of a TAEHV half: each MemBlock's last input frame, in fixed buffers. A subclass
    names its layer stack (`stack`) and lists its MemBlocks with their scale (`mem_blocks`)."""

    stack = ""

    def _allocate_buffers(self, batch_size, latent_height, latent_width, device, dtype) -> None:
        for _, blk, scale in self.mem_blocks():
            blk.memory = torch.zeros(
                batch_size, blk.n_in, latent_height * scale, latent_width * scale, device=device, dtype=dtype
            )

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """The allocated streaming state, by name (``<stack>.<i>.memory``)."""
        return {f"{self.stack}.{i}.memory": b.memory for i, b, _ in self.mem_blocks() if b.memory is not None}


class TAEHVDecoder(MemBlockState, StreamingDecoder):
    """TAEHV decoder for Wan 2.1 latents with block streaming over preallocated state (`StreamingDecoder`):
    ``[B, T, 16, h, w]`` latents -> ``[B, T', 3, 8h, 8w]`` frames in [-1, 1].

    Args:
        channels: widths ``(c0, c1, c2, c3)`` of the four stages; ``(256, 128, 64, 64)`` is the real model.
        latent_channels: latent channels (16 for Wan 2.1).
        decoder_time_upscale: per stage, whether its TGrow doubles time (TAEHV default ``(False, True,
            True)``; 4x overall).
        decoder_space_upscale: per stage, whether it doubles height and width (8x overall).
    """

    stack = "decoder"  # names the state buffers ``decoder.<i>.memory``

    def __init__(
        self,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        latent_channels: int = 16,
        decoder_time_upscale: Sequence[bool] = (False, True, True),
        decoder_space_upscale: Sequence[bool] = (True, True, True),
    ):
        super().__init__()
        c = tuple(int(v) for v in channels)
        if len(c) != 4:
            raise ValueError(f"channels must have 4 entries, got {channels!r}")
        tu = tuple(bool(v) for v in decoder_time_upscale)
        su = tuple(bool(v) for v in decoder_space_upscale)
        if len(tu) != 3 or len(su) != 3:
            raise ValueError("decoder_time_upscale and decoder_space_upscale need 3 entries each")
        self.channels = c
        self.latent_channels = int(latent_channels)
        self.image_channels = 3

        layers: list[nn.Module] = [Clamp(), _conv3x3(self.latent_channels, c[0]), nn.ReLU()]
        for stage in range(3):
            n, n_next = c[stage], c[stage + 1]
            layers += [MemBlock(n, n), MemBlock(n, n), MemBlock(n, n)]
            layers += [nn.Upsample(scale_factor=2 if su[stage] else 1), TGrow(n, 2 if tu[stage] else 1)]
            layers += [_conv3x3(n, n_next, bias=False)]
        layers += [nn.ReLU(), _conv3x3(c[3], self.image_channels)]
        self.decoder = nn.Sequential(*layers)

        self.t_upscale = 2 ** sum(tu)
        self.s_upscale = 2 ** sum(su)
        self.frames_to_trim = self.t_upscale - 1

    # ------------------------------------------------------------------ state
    def mem_blocks(self) -> list[tuple[int, MemBlock, int]]:
        """``(index, block, spatial scale relative to the latent)`` for every MemBlock, in order."""
        out, scale = [], 1
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, nn.Upsample):
                scale *= int(layer.scale_factor)
            elif isinstance(layer, MemBlock):
                out.append((i, layer, scale))
        return out

    # ------------------------------------------------------------------ decoding
    def frames_per_block(self, num_latent_frames: int, phase: int) -> int:
        """Output frames for a block of ``num_latent_frames`` latents in ``phase`` (4T-3, then 4T)."""
        n = self.t_upscale * num_latent_frames
        return n - self.frames_to_trim if phase == PHASE_FIRST else n

    def _run(self, latents: torch.Tensor, stream: bool) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"expected latents [B, T, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        b = latents.shape[0]
        x = latents.reshape(-1, *latents.shape[2:])
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                x = layer(x, layer.previous_frames(x, b, stream))
            else:
                x = layer(x)
        return x.view(b, -1, *x.shape[1:])

    @staticmethod
    def _to_signed(frames: torch.Tensor) -> torch.Tensor:
        return frames.clamp(0.0, 1.0) * 2.0 - 1.0

    def block_forward(self, latents: torch.Tensor, phase: int) -> torch.Tensor:
        """Decode one block with the current state (updated in place); the compile / capture target.

        ``phase`` must be a Python int (0 or 1); it only selects a static output slice.
        """
        frames = self._run(latents, stream=True)
        if phase == PHASE_FIRST:
            frames = frames[:, self.frames_to_trim :]
        return self._to_signed(frames)

    def decode_full(self, latents: torch.Tensor) -> torch.Tensor:
        """Non-streaming reference: decode a whole latent video at once (state untouched)."""
        frames = self._run(latents, stream=False)
        return self._to_signed(frames[:, self.frames_to_trim :])


# ---------------------------------------------------------------------- loading
def _infer_channels(sd: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int] | None:
    keys = ("decoder.1.weight", "decoder.8.weight", "decoder.14.weight", "decoder.20.weight")
    if not all(k in sd for k in keys):
        return None
    channels = tuple(int(sd[k].shape[0]) for k in keys)
    return channels, int(sd["decoder.1.weight"].shape[1])


def load_decoder_state_dict(model: TAEHVDecoder, sd: Mapping[str, torch.Tensor]) -> None:
    """Load TAEHV weights into ``model``: ``encoder.*`` keys are ignored, anything else must match.

    TGrow weights wider than the model's (a checkpoint trained with time upsampling at a stage the
    model disables) keep their last-timestep output channels, as TAEHV does.  Raises ``ValueError``
    naming the missing, unexpected and wrongly shaped keys on mismatch.
    """
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in sd and sd[key].shape[0] > own[key].shape[0]:
            sd[key] = sd[key][-own[key].shape[0] :]
    load_exact(model, sd, "TAEHV")


def load_taehv(
    path: str | os.PathLike,
    *,
    channels: Sequence[int] | None = None,
    latent_channels: int | None = None,
    decoder_time_upscale: Sequence[bool] = (False, True, True),
    decoder_space_upscale: Sequence[bool] = (True, True, True),
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TAEHVDecoder:
    """Build a :class:`TAEHVDecoder` and load a TAEHV checkpoint (``taew2_1.pth`` / ``.safetensors``).

    Stage widths and latent channels are read from the checkpoint unless given.
    """
    sd = read_state_dict(path)
    inferred = _infer_channels(sd)
    if channels is None:
        channels = inferred[0] if inferred else DEFAULT_CHANNELS
    if latent_channels is None:
        latent_channels = inferred[1] if inferred else 16
    model = TAEHVDecoder(channels, latent_channels, decoder_time_upscale, decoder_space_upscale)
    load_decoder_state_dict(model, sd)
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


# ---------------------------------------------------------------------- encoder
class TPool(nn.Module):
    """Temporal downsampling: every ``stride`` consecutive frames become one (channels stacked, 1x1 conv)."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))


class TAEHVEncoder(MemBlockState, StreamingDecoder):
    """TAEHV encoder (Wan 2.1 latent space), streamed a block at a time over preallocated state:
    ``[B, T, 3, H, W]`` frames in [-1, 1] -> ``[B, T / 4, 16, H / 8, W / 8]`` latents.

    The layers are the public TAEHV encoder's, as a flat ``nn.Sequential`` named ``self.encoder`` so that the
    ``encoder.*`` half of ``taew2_1.pth`` loads unchanged::

        0  Conv2d(3 -> w, 3x3)            encoder.0.weight / bias
        1  ReLU
        2  TPool(w, 2)                    encoder.2.conv.weight      [w, 2w, 1, 1]
        3  Conv2d(w -> w, 3x3, stride 2, no bias)
        4..6   MemBlock(w, w)             encoder.4.conv.{0,2,4}.{weight,bias}
        7  TPool(w, 2)
        8  Conv2d(stride 2, no bias)
        9..11  MemBlock(w, w)
        12 TPool(w, 1)                    (no time downsampling at the last stage)
        13 Conv2d(stride 2, no bias)
        14..16 MemBlock(w, w)
        17 Conv2d(w -> 16, 3x3)           encoder.17.weight / bias

    with ``w = 64`` for the real model (tests use tiny widths). 8x spatial, 4x temporal downsampling.

    Streaming: a block holds a multiple of ``t_downscale`` (4) frames, so every TPool group lies inside one
    block and TPool needs no state; the only memory between blocks is each MemBlock's last input frame, kept in
    fixed buffers (``[B, w, H / 2^k, W / 2^k]``) updated in place, as in :class:`TAEHVDecoder`. There is one
    phase (every block gives ``T / 4`` latents); ``phase`` is accepted and ignored so the streaming API is the
    decoder's. ``encode_full`` is the whole-sequence reference (zero memory before the first frame, the end
    padded with copies of the last frame to a multiple of 4, as TAEHV's ``encode_video``).

    Value range: the input is in [-1, 1] (the decoders' output range) and mapped to TAEHV's [0, 1] inside.
    """

    stack = "encoder"  # names the state buffers ``encoder.<i>.memory``

    def __init__(
        self,
        width: int = 64,
        latent_channels: int = 16,
        encoder_time_downscale: Sequence[bool] = (True, True, False),
    ):
        super().__init__()
        td = tuple(bool(v) for v in encoder_time_downscale)
        if len(td) != 3:
            raise ValueError("encoder_time_downscale needs 3 entries")
        w = int(width)
        self.width = w
        self.latent_channels = int(latent_channels)
        self.image_channels = 3
        layers: list[nn.Module] = [_conv3x3(self.image_channels, w), nn.ReLU()]
        for stage in range(3):
            layers += [TPool(w, 2 if td[stage] else 1), nn.Conv2d(w, w, 3, stride=2, padding=1, bias=False)]
            layers += [MemBlock(w, w), MemBlock(w, w), MemBlock(w, w)]
        layers += [_conv3x3(w, self.latent_channels)]
        self.encoder = nn.Sequential(*layers)
        self.t_downscale = 2 ** sum(td)
        self.s_downscale = 8

    # ------------------------------------------------------------------ state
    def mem_blocks(self) -> list[tuple[int, MemBlock, int]]:
        """``(index, block, spatial scale relative to the latent)`` for every MemBlock, in order."""
        out, scale = [], self.s_downscale
        for i, layer in enumerate(self.encoder):
            if isinstance(layer, nn.Conv2d) and layer.stride == (2, 2):
                scale //= 2
            elif isinstance(layer, MemBlock):
                out.append((i, layer, scale))
        return out

    def _ensure_state(self, frames: torch.Tensor) -> None:
        b, h, w = frames.shape[0], frames.shape[-2] // 8, frames.shape[-1] // 8
        key = (b, h, w, frames.device, frames.dtype)
        if self._state_key != key:
            if torch.compiler.is_compiling():
                raise RuntimeError("TAEHVEncoder: call allocate_state() before compiling the block encode")
            self.allocate_state(b, h, w, frames.device, frames.dtype)

    # ------------------------------------------------------------------ encoding
    def _run(self, frames: torch.Tensor, stream: bool) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[2] != self.image_channels:
            raise ValueError(f"expected frames [B, T, 3, H, W], got {tuple(frames.shape)}")
        if frames.shape[-2] % 8 or frames.shape[-1] % 8:
            raise ValueError(f"frame size {tuple(frames.shape[-2:])} is not a multiple of 8")
        b = frames.shape[0]
        x = (frames.reshape(-1, *frames.shape[2:]) * 0.5 + 0.5).to(self.encoder[0].weight.dtype)
        for layer in self.encoder:
            if isinstance(layer, MemBlock):
                x = layer(x, layer.previous_frames(x, b, stream))
            else:
                x = layer(x)
        return x.view(b, -1, *x.shape[1:])

    def block_forward(self, frames: torch.Tensor, phase: int = PHASE_STEADY) -> torch.Tensor:
        """Encode one block (``T`` a multiple of ``t_downscale``) with the state, updated in place."""
        if frames.shape[1] % self.t_downscale:
            raise ValueError(f"a streamed block needs a multiple of {self.t_downscale} frames, got {frames.shape[1]}")
        return self._run(frames, stream=True)

    def encode_block(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode the session's next block of frames -> ``T / t_downscale`` latents (the base class's streaming
        step, `decode_block` by its name there)."""
        return self.decode_block(frames)

    def encode_full(self, frames: torch.Tensor) -> torch.Tensor:
        """Non-streaming reference: encode a whole video at once (state untouched)."""
        n_pad = -frames.shape[1] % self.t_downscale
        if n_pad:
            frames = torch.cat([frames, frames[:, -1:].expand(-1, n_pad, -1, -1, -1)], dim=1)
        return self._run(frames, stream=False)


def load_encoder_state_dict(model: TAEHVEncoder, sd: Mapping[str, torch.Tensor]) -> None:
    """Load the ``encoder.*`` half of a TAEHV checkpoint (``decoder.*`` keys ignored; the rest must match)."""
    load_exact(model, {k: v for k, v in sd.items() if not k.startswith("decoder.")}, "TAEHV encoder")


def load_taehv_encoder(
    path: str | os.PathLike,
    *,
    encoder_time_downscale: Sequence[bool] = (True, True, False),
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TAEHVEncoder:
    """Build a :class:`TAEHVEncoder` from a TAEHV checkpoint (width and latent channels read from the file)."""
    sd = read_state_dict(path)
    if "encoder.0.weight" not in sd or "encoder.17.weight" not in sd:
        raise ValueError(f"{path}: no TAEHV encoder weights (encoder.0.weight, encoder.17.weight)")
    model = TAEHVEncoder(int(sd["encoder.0.weight"].shape[0]), int(sd["encoder.17.weight"].shape[0]),
                         encoder_time_downscale)
    load_encoder_state_dict(model, sd)
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
