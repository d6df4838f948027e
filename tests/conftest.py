import os
import textwrap

os.environ["COLUMNS"] = "200"  # rich wraps at the terminal width; keep messages on one line
if "REACTOR_GRAPH_CACHE_DIR" not in os.environ:  # compile caches of the tests stay out of the user's home
    import tempfile

    os.environ["REACTOR_GRAPH_CACHE_DIR"] = tempfile.mkdtemp(prefix="rg-compile-cache-")

import threading
import time

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from reactor_graph.node import Node, Port, register

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


# -- node types for swap tests (registered once for the whole run) --------------------------------------
@register("test_const_cond")
class ConstCond(Node):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        value: float = 0.5
        tokens: int = 4
        dim: int = 8

    inputs = {"text": Port("str")}

    def ports(self):
        return dict(self.inputs), {"embeds": Port("tensor", "float", (self.params.tokens, self.params.dim))}

    def forward(self, text):
        return {"embeds": torch.full((self.params.tokens, self.params.dim), self.params.value, device=self.device,
                                     dtype=self.dtype)}


@register("test_paint")
class Paint(Node):
    """Frames whose grey level follows the mean of the condition; a block counter makes each block distinct."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        gain: float = 1.0
        seconds: float = 0.0

    inputs = {"embeds": Port("tensor", "float", ("L", "D"))}
    every_block = True
    started = threading.Event()

    def ports(self):
        g = self.graph
        return dict(self.inputs), {"frames": Port("tensor", "float", (2, 3, g.height, g.width))}

    def load(self, device, dtype):
        super().load(device, dtype)
        self.count = torch.zeros((), device=device)

    def reset(self):
        self.count.zero_()

    def forward(self, embeds):
        if self.params.seconds:
            Paint.started.set()
            time.sleep(self.params.seconds)
        self.count += 1
        level = torch.tanh(self.params.gain * embeds.float().mean() * 4 + 0.05 * self.count)
        return {"frames": level.expand(2, 3, self.graph.height, self.graph.width).to(self.dtype)}


SWAP_GRAPH = """\
reactor-graph: 1
name: swaps
size: [16, 16]
device: cpu
slots:
  prompt: {type: str, default: "a red circle"}
commands:
  use_const: {swap: {cond: const}}
  use_text: {swap: {cond: cond}}
  flip: {swap: {paint: paint_neg}}
nodes:
  cond: {type: text_encoder, params: {dim: 8, max_tokens: 4, heads: 2, layers: 1}, in: {text: $slots.prompt}}
  paint: {type: test_paint, params: {seconds: SECONDS}, in: {embeds: cond.embeds}}
  out: {type: emit, in: {frames: paint.frames}}
alternatives:
  const: {type: test_const_cond, params: {value: 0.5}, in: {text: $slots.prompt}}
  wide: {type: text_encoder, params: {dim: 16, max_tokens: 4, heads: 2, layers: 1}, in: {text: $slots.prompt}}
  paint_neg: {type: test_paint, params: {gain: -1.0}, in: {embeds: cond.embeds}}
"""



Paint.GRAPH = SWAP_GRAPH


def pytest_sessionfinish(session, exitstatus):
    """No thread of the project outlives the suite: every session, command worker and model thread is
    joined by whoever started it (a short grace for threads that are ending)."""
    deadline = time.monotonic() + 3.0
    while True:
        ours = [t.name for t in threading.enumerate() if t.name.startswith("reactor-") and t.is_alive()]
        if not ours or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if ours:
        print(f"\nthreads of the project still alive after the suite: {', '.join(sorted(ours))}")
        session.exitstatus = 1
