"""What the streaming video decoders (TAEHV, the Wan VAE) share.

A session's first block decodes to fewer frames (4T - 3, the causal video's first frame) than the later ones
(4T); which one a call is is its *phase*, a Python int, so each is one static program to compile and capture.
The per-layer streaming state (previous frames, causal-conv caches) lives in buffers allocated once for a batch
and latent size and only ever updated in place, so their addresses survive a CUDA-graph capture.

A subclass builds its layers, then provides `_allocate_buffers`, `state_buffers` and `block_forward`.
"""
from __future__ import annotations

import torch
from torch import nn

PHASE_FIRST = 0
PHASE_STEADY = 1


class StreamingDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.phase = PHASE_FIRST
        self._state_key: tuple | None = None

    # -- what a decoder provides
    def _allocate_buffers(self, batch_size: int, latent_height: int, latent_width: int, device: torch.device,
                          dtype: torch.dtype) -> None:
        raise NotImplementedError

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """The allocated streaming state, by name."""
        raise NotImplementedError

    def block_forward(self, latents: torch.Tensor, phase: int) -> torch.Tensor:
        """Decode one block with the state (updated in place); the compile / capture target."""
        raise NotImplementedError

    # -- state
    def allocate_state(self, batch_size: int, latent_height: int, latent_width: int,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate zeroed state buffers for this batch and latent size and start a new session."""
        p = next(self.parameters())
        # normalised ("cuda" -> "cuda:0") so the key matches the latents' device in _ensure_state
        device = torch.empty(0, device=p.device if device is None else device).device
        dtype = p.dtype if dtype is None else dtype
        self._allocate_buffers(batch_size, latent_height, latent_width, device, dtype)
        self._state_key = (batch_size, latent_height, latent_width, device, dtype)
        self.phase = PHASE_FIRST

    def reset(self) -> None:
        """Start a new session: zero every state buffer in place (addresses kept), phase back to 0."""
        with torch.no_grad():
            for buf in self.state_buffers().values():
                buf.zero_()
        self.phase = PHASE_FIRST

    def _ensure_state(self, latents: torch.Tensor) -> None:
        b, h, w = latents.shape[0], latents.shape[-2], latents.shape[-1]
        key = (b, h, w, latents.device, latents.dtype)
        if self._state_key != key:
            if torch.compiler.is_compiling():
                raise RuntimeError(f"{type(self).__name__}: call allocate_state() before compiling the block decode")
            self.allocate_state(b, h, w, latents.device, latents.dtype)

    # -- decoding
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the session's next block (layout: the decoder's) -> frames in [-1, 1]: ``4T - 3`` of them in
        the first block of a session, ``4T`` afterwards."""
        self._ensure_state(latents)
        out = self.block_forward(latents, self.phase)
        self.phase = PHASE_STEADY
        return out

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_block(latents)
