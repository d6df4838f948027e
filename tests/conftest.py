import os
import textwrap

os.environ["COLUMNS"] = "200"  # rich wraps at the terminal width; keep messages on one line

import pytest
import torch

torch.set_num_threads(2)

TINY = """\
reactor-graph: 1
name: tiny
fps: 16
size: [32, 32]
device: cpu
slots:
  prompt: {type: str, default: "a red circle"}
  seed: {type: int, default: 0}
commands:
  set_prompt:
    description: Change the prompt
    params:
      prompt: {type: str, min_length: 1, max_length: 50}
    set: {prompt: $prompt}
nodes:
  cond:
    type: text_encoder
    params: {dim: 16, max_tokens: 8, heads: 2}
    in: {text: $slots.prompt}
  noise:
    type: noise
    params: {shape: [4, 2, 4, 4]}
    in: {seed: $slots.seed}
  denoise:
    type: causal_denoiser
    params: {latent_channels: 4, frames_per_block: 2, latent_size: [4, 4], dim: 32, layers: 1, heads: 2,
             text_dim: 16, steps: 2, cache_blocks: 2}
    in: {cond: cond.embeds, noise: noise.noise}
  decode:
    type: latent_decoder
    params: {latent_channels: 4, width: 16, upsample: 8}
    in: {latents: denoise.latents}
  out:
    type: emit
    in: {frames: decode.frames}
"""


@pytest.fixture
def tiny_yaml():
    return TINY


@pytest.fixture
def write_graph(tmp_path):
    def write(text: str, name: str = "graph.yaml"):
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p

    return write


@pytest.fixture
def tiny_engine(write_graph):
    from reactor_graph.loop import Engine
    from reactor_graph.plan import load_plan

    def make(text: str = TINY, **kw):
        return Engine(load_plan(write_graph(text)), **kw).load()

    return make
