"""What the causal video decoder nodes (taehv_decoder, wan_vae_decoder) share: 8x spatial, 4x temporal
upsampling with a shorter first block (4t-3 frames, then 4t), two phases, state in the model's buffers.
Not a node type itself (a leading underscore keeps it out of the registry scan)."""
from __future__ import annotations

import torch

from reactor_graph.models.streaming import PHASE_FIRST, PHASE_STEADY
from reactor_graph.node import Node, Port


class CausalVideoDecoder(Node):
    every_block = True
    accepts_random_weights = True
    latent_channels = 16

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        if graph.height % 8 or graph.width % 8:
            raise ValueError(f"frame size {graph.height}x{graph.width} is not a multiple of the decoder's 8x "
                             f"upsampling")
        self.latent_hw = (graph.height // 8, graph.width // 8)

    def ports(self):
        g, c = self.graph, self.latent_channels
        return ({"latents": Port("tensor", "float", (c, "t", *self.latent_hw), f"latent block [{c}, t, h, w]")},
                {"frames": Port("tensor", "float", ("T", 3, g.height, g.width),
                                "[T, 3, H, W] in [-1, 1]; T = 4t-3 in the first block, 4t after")})

    def num_phases(self) -> int:
        return 2

    def phase_for_block(self, block: int) -> int:
        return PHASE_FIRST if block == 0 else PHASE_STEADY

    def random_model(self, build):
        """`build()` under the node's own seed, leaving the global RNG as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.graph.seed + self.params.seed)
            return build().to(device=self.device, dtype=self.dtype)

    def use(self, model) -> None:
        self.model = model.eval().requires_grad_(False)
        self.model.allocate_state(1, *self.latent_hw, device=self.device, dtype=self.dtype)

    def reset(self):
        self.model.reset()
