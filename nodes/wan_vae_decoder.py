"""Wan2.1 causal VAE decoder as a hot-path node: latents -> RGB frames, streamed block by block.

Ports: latents [16, t, h, w] (normalised diffusion latents, the DiT's output) -> frames [T, 3, 8h, 8w] in [-1, 1].
T is 4t - 3 in the first block of a session (the first latent frame decodes to one frame) and 4t afterwards: two
phases (PHASE_FIRST, PHASE_STEADY of reactor_graph.models.wan_vae), each a static program.

The causal convolutions' caches (the last 2 input frames of every temporal conv) are allocated in `load()` for the
graph's frame size and zeroed in place by `reset()`.

Heavier than TAEHV (a full 3D-conv decoder at 480x832) but the reference quality. Weights: `random` (PyTorch's
default init, seeded), or a local `Wan2.1_VAE.pth` / `.safetensors` (its decoder half).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.node import register
from reactor_graph.nodes._causal_decoder import CausalVideoDecoder
from reactor_graph.weights import RANDOM, resolve_weights


@register("wan_vae_decoder")
class WanVAEDecoderNode(CausalVideoDecoder):
    description = ("Wan2.1 causal VAE decoder, streamed over fixed caches: [16, t, h, w] -> [T, 3, 8h, 8w] in "
                   "[-1, 1]; T = 4t-3 in a session's first block, 4t after.")

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        dim: int = Field(96, ge=4, description="base width (96 for Wan2.1; random weights, a checkpoint sets its "
                                               "own)")
        weights: str = Field(RANDOM, description="'random', or a local Wan2.1_VAE.pth / .safetensors")
        seed: int = Field(0, description="seed of random weights (added to the graph's seed)")

    def load(self, device, dtype):
        super().load(device, dtype)
        from reactor_graph.models.wan_vae import WanVAEDecoder, load_wan_vae

        p = self.params
        if p.weights == RANDOM:
            model = self.random_model(lambda: WanVAEDecoder(dim=p.dim))
        else:
            model = load_wan_vae(resolve_weights(p.weights, self.graph.root, "Wan VAE"), device=device, dtype=dtype)
        self.use(model)

    def forward(self, latents):
        # [C, t, h, w] -> [1, C, t, h, w]; frames [1, 3, T, H, W] -> [T, 3, H, W] (a view; emit takes any strides)
        return {"frames": self.model.block_forward(latents[None], self.phase)[0].transpose(0, 1)}
