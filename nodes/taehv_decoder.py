"""TAEHV tiny causal video decoder (Wan2.1 latent space) as a hot-path node: latents -> RGB frames.

Ports: latents [16, t, h, w] (the DiT's layout) -> frames [T, 3, 8h, 8w] in [-1, 1]. T is 4t - 3 in the first
block of a session (TAEHV trims the first 3 frames of a video) and 4t afterwards: two phases (PHASE_FIRST,
PHASE_STEADY of reactor_graph.models.taehv), each a static program of its own, so each compiled phase key has
fixed shapes while the output length differs between the first and the later blocks.

The decoder's memory between blocks (each MemBlock's last input frame) lives in buffers allocated in `load()` for
the graph's frame size and zeroed in place by `reset()`.

Weights: `random` (PyTorch's default init, seeded), or a local `taew2_1.pth` / `.safetensors` (its decoder half;
stage widths and latent channels are read from the file).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.node import register
from reactor_graph.nodes._causal_decoder import CausalVideoDecoder
from reactor_graph.weights import RANDOM, resolve_weights


@register("taehv_decoder")
class TAEHVDecoderNode(CausalVideoDecoder):
    description = ("TAEHV tiny causal video decoder for Wan2.1 latents: [16, t, h, w] -> [T, 3, 8h, 8w] in [-1, 1]; "
                   "T = 4t-3 in a session's first block, 4t after.")

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        channels: tuple[int, int, int, int] = Field((256, 128, 64, 64), description="stage widths (random weights; "
                                                                                    "a checkpoint sets its own)")
        latent_channels: int = Field(16, ge=1)
        weights: str = Field(RANDOM, description="'random', or a local taew2_1.pth / .safetensors")
        seed: int = Field(0, description="seed of random weights (added to the graph's seed)")

    @property
    def latent_channels(self) -> int:
        return self.params.latent_channels

    def load(self, device, dtype):
        super().load(device, dtype)
        from reactor_graph.models.taehv import TAEHVDecoder, load_taehv

        p = self.params
        if p.weights == RANDOM:
            model = self.random_model(lambda: TAEHVDecoder(p.channels, p.latent_channels))
        else:
            model = load_taehv(resolve_weights(p.weights, self.graph.root, "TAEHV"), device=device, dtype=dtype)
            if model.latent_channels != p.latent_channels:
                raise ValueError(f"the TAEHV weights take {model.latent_channels} latent channels, the graph gives "
                                 f"{p.latent_channels}")
        if model.s_upscale != 8:
            raise ValueError(f"this TAEHV upsamples {model.s_upscale}x, the node expects 8x")
        self.use(model)

    def forward(self, latents):
        # [C, t, h, w] -> TAEHV's [B, t, C, h, w]; frames [B, T, 3, H, W] -> [T, 3, H, W]
        return {"frames": self.model.block_forward(latents.transpose(0, 1)[None], self.phase)[0]}
