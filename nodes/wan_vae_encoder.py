"""Wan2.1 causal VAE encoder as a hot-path node: RGB frames -> latents, streamed block by block.

Ports: frames [T, 3, H, W] in [-1, 1] (a video slot's pictures, e.g. through `video_in`) -> latents
[16, T/4, H/8, W/8] (normalised, the DiT's layout). T must be a multiple of 4 (the video slot's `frames`, e.g. 12
for 3 latent frames a block).

Two phases, as Wan encodes a video (1 frame, then chunks of 4): a session's first block takes the newest 4t - 3
of its T = 4t frames (the oldest 3 are dropped: a causal video starts with a lone frame), every later block all 4t;
both give t latent frames, so the output shape never changes. The causal convolutions' carried frames live in
buffers allocated in `load()` for the frame size and zeroed in place by `reset()`.

Heavier than TAEHV (full-resolution 3D convolutions) but the latents of the VAE the DiT was trained on.

Compilation: `compile: regional` (default). The engine traces and compiles the hot path once per phase key (a Wan
DiT's KV cache has 8); traced with it, this encoder's convolutions would be compiled again for every key. Instead
the node compiles the model's block encode itself (`compile_regions`, the engine's compile function: one graph per
encoder phase, 2 in all) and hides it from the engine's trace (`not_traced`: torch.compiler.disable once a compile is set up, one graph break); a
captured CUDA graph still holds the whole block. `compile: whole` lets the engine trace it like any node.
Weights: `random` (PyTorch's default init, seeded), or a local `Wan2.1_VAE.pth` / `.safetensors` (its encoder half;
the width is read from the file).
"""
from __future__ import annotations

import torch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.models.streaming import PHASE_FIRST, PHASE_STEADY
from reactor_graph.node import Node, Port, register
from reactor_graph.untraced import not_traced
from reactor_graph.weights import RANDOM, resolve_weights


@register("wan_vae_encoder")
class WanVAEEncoderNode(Node):
    description = ("Wan2.1 causal VAE encoder, streamed over fixed caches: [T, 3, H, W] in [-1, 1] -> "
                   "[16, T/4, H/8, W/8]; T a multiple of 4 (a session's first block uses its newest T-3).")
    every_block = True
    accepts_random_weights = True
    latent_channels = 16

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        dim: int = Field(96, ge=1, description="base width (96 for Wan2.1; random weights, a checkpoint sets its "
                                               "own)")
        size: tuple[int, int] | None = Field(None, description="[H, W] of the frames in (default: the graph's)")
        weights: str = Field(RANDOM, description="'random', or a local Wan2.1_VAE.pth / .safetensors")
        seed: int = Field(0, description="seed of random weights (added to the graph's seed)")
        compile: Literal["regional", "whole"] = Field(
            "regional", description="how compiled engine modes compile it (see the module docstring)")

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        self._encode = None  # the compiled block encode (compile_regions)
        self.size = tuple(params.size) if params.size else (graph.height, graph.width)
        if self.size[0] % 8 or self.size[1] % 8:
            raise ValueError(f"frame size {self.size[0]}x{self.size[1]} is not a multiple of the encoder's 8x "
                             f"downsampling")
        self.latent_hw = (self.size[0] // 8, self.size[1] // 8)

    def ports(self):
        c = self.latent_channels
        return ({"frames": Port("tensor", "float", ("T", 3, *self.size), "[T, 3, H, W] in [-1, 1], T = 4t")},
                {"latents": Port("tensor", "float", (c, "t", *self.latent_hw), f"latent block [{c}, T/4, h, w]")})

    def num_phases(self) -> int:
        return 2

    def phase_for_block(self, block: int) -> int:
        return PHASE_FIRST if block == 0 else PHASE_STEADY

    def load(self, device, dtype):
        super().load(device, dtype)
        from reactor_graph.models.wan_vae_encoder import WanVAEEncoder, load_wan_vae_encoder

        p = self.params
        if p.weights == RANDOM:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.graph.seed + p.seed)
                model = WanVAEEncoder(dim=p.dim).to(device=device, dtype=dtype)
        else:
            model = load_wan_vae_encoder(resolve_weights(p.weights, self.graph.root, "Wan VAE"), device=device,
                                         dtype=dtype)
        self.model = model.eval().requires_grad_(False)
        self.model.allocate_state(1, *self.latent_hw, device=device, dtype=dtype)

    def reset(self):
        self.model.reset()

    def compile_regions(self, compile) -> None:
        if self.params.compile == "regional" and self._encode is None:
            self._encode = compile(self.model.block_forward)  # `phase` is an int: one graph per phase

    @not_traced
    def _regional(self, x, phase: int):
        return self._encode(x, phase)

    def forward(self, frames):
        t, k = frames.shape[0], self.model.t_downscale
        if t % k:
            raise ValueError(f"wan_vae_encoder '{self.name}': {t} frames a block, not a multiple of {k} (set the "
                             f"video slot's frames)")
        if self.phase == PHASE_FIRST:
            frames = frames[k - 1:]  # the newest 4t - 3: Wan's first chunk is one frame
        x = frames.to(self.dtype).transpose(0, 1)[None]  # [T, 3, H, W] -> Wan's [1, 3, T, H, W]
        if self._encode is not None and torch.compiler.is_compiling():
            return {"latents": self._regional(x, self.phase)[0]}  # [1, 16, t, h, w] -> [16, t, h, w]
        return {"latents": self.model.block_forward(x, self.phase)[0]}
