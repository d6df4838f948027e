"""Video-to-video: the optional `input` latents + `strength` (SDEdit) of causal_denoiser and wan_causal_dit (no
input: the text-to-video path, bit for bit), the taehv_encoder node, and graphs/streamdiffusion_v2.yaml (camera ->
TAEHV encode -> Wan DiT with strength -> TAEHV decode -> emit) streaming at toy size with random weights."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reactor_graph.inputs import to_yuv420p
from reactor_graph.node import GraphInfo, Node, Port, register
from reactor_graph.plan import load_plan

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
CPU, F32 = torch.device("cpu"), torch.float32
G = GraphInfo(height=64, width=64, fps=16)


def denoiser(**kw):
    from reactor_graph.nodes.causal_denoiser import CausalDenoiser

    p = CausalDenoiser.Params(latent_channels=4, frames_per_block=2, latent_size=(8, 8), dim=32, layers=2, heads=2,
                              text_dim=16, steps=4, cache_blocks=2, **kw)
    n = CausalDenoiser("denoise", p, G)
    n.load(CPU, F32)
    return n, (torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), (4, 2, 8, 8))


def wan(**kw):
    from reactor_graph.nodes.wan_causal_dit import WanCausalDiT

    p = WanCausalDiT.Params(config="tiny", frames_per_block=3, latent_size=(8, 8), steps=4, max_frames=6,
                            rolling=True, **kw)
    n = WanCausalDiT("dit", p, G)
    n.load(CPU, F32)
    return n, (torch.randn(6, 32, generator=torch.Generator().manual_seed(0)), (16, 12, 8, 8))


MAKERS = {"causal_denoiser": denoiser, "wan_causal_dit": wan}


def stream(node, cond, noise_shape, blocks=3, inputs=None, seed=1):
    """Run `blocks` blocks through the node's phases; fixed noise per block; `inputs[b]` the input latents."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for b in range(blocks):
            node.phase = node.phase_for_block(b)
            noise = torch.randn(*noise_shape, generator=g)
            kw = {} if inputs is None else {"input": inputs[b]}
            out.append(node.forward(cond, noise, **kw)["latents"].clone())
    return out


def latents_like(node, seed=7, blocks=3):
    shape = node.ports()[1]["latents"].shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(blocks)]


@pytest.mark.parametrize("kind", list(MAKERS))
def test_input_is_optional_and_without_it_strength_changes_nothing(kind):
    a, (cond, ns) = MAKERS[kind]()
    b, _ = MAKERS[kind](strength=0.3)
    assert a.ports()[0]["input"].optional
    for x, y in zip(stream(a, cond, ns), stream(b, cond, ns), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_strength_one_starts_from_pure_noise(kind):
    a, (cond, ns) = MAKERS[kind]()
    b, _ = MAKERS[kind]()
    inp = latents_like(a)
    for x, y in zip(stream(a, cond, ns), stream(b, cond, ns, inputs=inp), strict=True):
        assert torch.equal(x, y)  # (1 - 1) * input + 1 * noise: the input is not seen


@pytest.mark.parametrize("kind", list(MAKERS))
def test_lower_strength_stays_closer_to_the_input(kind):
    lo, (cond, ns) = MAKERS[kind](strength=0.05)
    hi, _ = MAKERS[kind](strength=0.9)
    inp = latents_like(lo)
    near = stream(lo, cond, ns, inputs=inp)
    far = stream(hi, cond, ns, inputs=inp)
    for i, n, f in zip(inp, near, far, strict=True):
        assert (n - i).norm() < 0.5 * (f - i).norm()
    lo2, _ = MAKERS[kind](strength=0.05)
    other = stream(lo2, cond, ns, inputs=latents_like(lo, seed=8))
    assert all(not torch.allclose(x, y) for x, y in zip(near, other))  # the output follows the input


def v2v_tiny(write_graph) -> Path:
    text = (GRAPHS / "streamdiffusion_v2.yaml").read_text()
    for old, new in {
        "size: [480, 832]            #": "size: [64, 64]            #",
        "dtype: bfloat16": "dtype: float32",
        "camera: {type: video, size: [480, 832]": "camera: {type: video, size: [64, 64]",
        "params: {size: [480, 832]}": "params: {size: [64, 64]}",
        "type: umt5_encoder\n    params: {config: umt5-xxl, weights: random, max_tokens: 512}":
            "type: text_encoder\n    params: {dim: 32, max_tokens: 8, heads: 2}",
        "params: {weights: random}\n    in: {frames: rgb.rgb}": "params: {width: 8, weights: random}\n"
                                                               "    in: {frames: rgb.rgb}",
        "shape: [16, 12, 60, 104]": "shape: [16, 12, 8, 8]",
        "config: 1.3b": "config: tiny",
        "latent_size: [60, 104]": "latent_size: [8, 8]",
        "max_frames: 21": "max_frames: 9",
        "strength: {type: float, default: 0.7,": "strength: {type: float, default: 0.05,",
        "params: {weights: random}\n    in: {latents: dit.latents}": "params: {channels: [16, 8, 8, 8], weights: "
                                                                    "random}\n    in: {latents: dit.latents}",
        "params: {dim: 96, weights: random}": "params: {dim: 4, weights: random}",
    }.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return write_graph(text)


def test_shipped_graph_validates_at_full_size():
    from typer.testing import CliRunner

    from reactor_graph.cli import app
    from reactor_graph.plan import outputs_mismatch

    plan = load_plan(GRAPHS / "streamdiffusion_v2.yaml")
    assert list(plan.hot) == ["noise", "encode", "dit", "decode", "out"] and "rgb" in plan.on_change
    enc, dit = plan.nodes["encode"], plan.nodes["dit"]
    assert enc.ports()[1]["latents"].shape == (16, "t", 60, 104)
    assert plan.bindings["dit"]["strength"].name == "strength" and plan.slots["strength"].default == 0.7  # live
    # the Wan VAE encoder is a declared alternative of `encode`, swapped in by a command
    wan = plan.alternatives["encode_wan_vae"]
    assert wan.type_name == "wan_vae_encoder" and outputs_mismatch(enc, wan) is None
    assert plan.commands["use_wan_vae_encoder"].spec.swap == {"encode": "encode_wan_vae"}
    res = CliRunner().invoke(app, ["validate", str(GRAPHS / "streamdiffusion_v2.yaml")])
    assert res.exit_code == 0 and "6 commands" in res.output, res.output


def test_wan_vae_encoder_node_streams_like_wan():
    """A session's first block encodes the newest 4t - 3 of its 4t frames; with the next block's 4t frames the two
    give what Wan's whole-sequence encode gives for the frames used."""
    from reactor_graph.nodes.wan_vae_encoder import WanVAEEncoderNode

    node = WanVAEEncoderNode("enc", WanVAEEncoderNode.Params(dim=4), G)
    node.load(CPU, F32)
    assert node.ports()[1]["latents"].shape == (16, "t", 8, 8) and node.num_phases() == 2
    g = torch.Generator().manual_seed(3)
    clip = torch.rand(24, 3, 64, 64, generator=g) * 2 - 1  # [T, 3, H, W] in [-1, 1], two blocks of 12
    with torch.no_grad():
        out = []
        for b in (0, 1):
            node.phase = node.phase_for_block(b)
            out.append(node.forward(clip[12 * b:12 * b + 12])["latents"].clone())
        assert [o.shape for o in out] == [(16, 3, 8, 8)] * 2
        ref = node.model.encode_full(clip[3:].transpose(0, 1)[None])[0]  # the oldest 3 frames dropped
        torch.testing.assert_close(torch.cat(out, dim=1), ref, rtol=1e-5, atol=1e-5)
        node.reset()
        node.phase = node.phase_for_block(0)
        torch.testing.assert_close(node.forward(clip[:12])["latents"], out[0], rtol=0, atol=0)
        with pytest.raises(ValueError, match="multiple of 4"):
            node.forward(clip[:10])


def _camera(level: int) -> np.ndarray:
    img = np.full((64, 64, 3), level, np.uint8)
    img[8:40, 16:48] = 255 - level
    return to_yuv420p(av.VideoFrame.from_ndarray(img, format="rgb24"), 64, 64)


def _record_dit(engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dit, log = engine.nodes["dit"], []
    plain = dit.forward

    def logged(cond, noise, input=None):
        out = plain(cond, noise, input)
        log.append((input.clone(), out["latents"].clone()))
        return out

    dit.forward = logged
    return log


def test_tiny_v2v_graph_streams_and_follows_the_camera(write_graph):
    from reactor_graph.loop import open_engine

    path = str(v2v_tiny(write_graph))
    dark, lit = open_engine(path, device="cpu"), open_engine(path, device="cpu")
    assert lit.inputs.tracks() == ["camera"]
    seen = {"dark": _record_dit(dark), "lit": _record_dit(lit)}
    a, b = [dark.run_block(0)["video"]], [lit.run_block(0)["video"]]
    for k in (1, 2):  # the camera from block 1 on (12 frames a block), fed just before each block: frames older
        a.append(dark.run_block(k)["video"])  # than the slot's stale limit (1 s, a loaded machine) read as none
        for _ in range(12):
            lit.inputs.feed("camera", _camera(230))
        b.append(lit.run_block(k)["video"])
    assert [v.shape[0] for v in a] == [9, 12, 12] == [v.shape[0] for v in b]
    assert tuple(a[0].shape[1:]) == (96, 64)  # yuv420p [T, H*3/2, W]
    assert np.array_equal(a[0], b[0])
    (d_in, d_out), (l_in, l_out) = seen["dark"][0], seen["lit"][0]
    assert torch.equal(d_in, l_in) and torch.equal(d_out, l_out)  # block 0: both black
    # From block 1 the camera's latents reach the DiT and change what it makes. (Default-initialised random
    # TAEHV halves attenuate their input, so at toy size the difference is small and may not survive the
    # decoder's uint8 output; with real weights it is the picture.)
    for k in (1, 2):
        (d_in, d_out), (l_in, l_out) = seen["dark"][k], seen["lit"][k]
        assert d_in.shape == (16, 3, 8, 8) and (d_in - l_in).abs().max() > 1e-4
        assert (d_out - l_out).abs().max() > 1e-4


@pytest.mark.slow  # compiles the tiny DiT's regions and the whole hot path
@pytest.mark.parametrize("encoder", ["taehv", "wan_vae"])
def test_tiny_v2v_compiled_equals_eager_without_recompiles(write_graph, encoder):
    from reactor_graph.compile import CompiledHotPath
    from reactor_graph.loop import Engine

    path = v2v_tiny(write_graph)
    if encoder == "wan_vae":  # the alternative as the declared encoder: its own regions, 2 phases
        text = path.read_text()
        old = "type: taehv_encoder\n    params: {width: 8, weights: random}"
        assert text.count(old) == 1
        path = write_graph(text.replace(old, "type: wan_vae_encoder\n    params: {dim: 4, weights: random}"),
                           "wan_vae.yaml")

    def go(engine):
        out = [engine.run_block(0)["video"]]
        for k in (1, 2, 3):  # block 3 rolls the cache
            if k == 2:
                engine.slots.write("strength", 0.5)  # what set_strength does at the block boundary
            for _ in range(12):
                engine.inputs.feed("camera", _camera(60 * k))
            out.append(engine.run_block(k)["video"])
        return out

    eager = go(Engine(load_plan(path), device="cpu").load())
    engine = Engine(load_plan(path), device="cpu", compile="compile", compile_backend="aot_eager").load()
    ex = engine.executor
    assert isinstance(ex, CompiledHotPath)
    at_start, regions = dict(ex.compiles), engine.nodes["encode"].region_compiles
    assert regions == (2 if encoder == "wan_vae" else 0)
    compiled = go(engine)
    assert ex.recompiles == 0 and ex.compiles == at_start and engine.nodes["encode"].region_compiles == regions
    for a, b in zip(eager, compiled, strict=True):
        assert a.shape == b.shape and (a.to(torch.int16) - b.to(torch.int16)).abs().max() <= 1


def test_tiny_v2v_swaps_to_the_wan_vae_encoder(write_graph):
    from reactor_graph.loop import open_engine

    engine = open_engine(str(v2v_tiny(write_graph)), device="cpu")
    dit_inputs = _record_dit(engine)
    alt = engine.plan.alternatives["encode_wan_vae"]
    encoded = []
    plain = alt.forward
    alt.forward = lambda frames: encoded.append(plain(frames)) or encoded[-1]

    def camera(block):
        if block == 1:
            engine.submit("use_wan_vae_encoder")  # applied at this block's boundary
        for _ in range(12):
            engine.inputs.feed("camera", _camera(40 + 60 * block))

    videos = []
    engine.run_session(lambda b: videos.append((b, engine.nodes["encode"])), max_blocks=4, before_block=camera)
    assert [enc.name for _, enc in videos] == ["encode"] + ["encode_wan_vae"] * 3  # the swap lands at block 1
    assert engine.nodes["encode"] is engine.plan.nodes["encode"]  # a session's swaps end with it
    assert len(encoded) == 3 and [b.frames for b, _ in videos] == [9, 12, 12, 12]  # eager: no restart, no recapture
    for (inp, _), enc in zip(dit_inputs[1:], encoded, strict=True):
        assert torch.equal(inp, enc["latents"])
    assert not torch.allclose(encoded[1]["latents"], encoded[2]["latents"])  # it follows the camera


# ------------------------------------------------------------------------------------------ live strength
def stream_live(node, cond, noise_shape, inputs, strengths, seed=1):
    """`stream` with the `strength` port: node.prepare(strength=...) (the engine's host half) before each block."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for b, s in enumerate(strengths):
            node.phase = node.phase_for_block(b)
            node.prepare(**({} if s is None else {"strength": s}))
            noise = torch.randn(*noise_shape, generator=g)
            out.append(node.forward(cond, noise, input=inputs[b])["latents"].clone())
    return out


@pytest.mark.parametrize("kind", list(MAKERS))
def test_strength_is_live_from_the_next_block(kind):
    """A new strength through the port applies from the next block, as if the node had been built with it there
    (same schedule values: bit for bit), and changes what comes out; the param is the value while unbound."""
    a, (cond, ns) = MAKERS[kind](strength=0.05)
    b, _ = MAKERS[kind](strength=0.9)
    fixed, _ = MAKERS[kind](strength=0.05)
    inp = latents_like(a, blocks=4)
    switched = stream_live(a, cond, ns, inp, [None, None, 0.9, 0.9])
    mirrored = stream_live(b, cond, ns, inp, [0.05, 0.05, None, None])
    static = stream(fixed, cond, ns, blocks=4, inputs=inp)
    for x, y in zip(switched, mirrored, strict=True):
        assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(switched[:2], static[:2]))
    for k in (2, 3):  # farther from the input at the higher strength
        assert (switched[k] - inp[k]).norm() > 2 * (static[k] - inp[k]).norm()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        a.check_input("strength", 1.5)
    assert a.check_input("strength", 0.5) is None


TINY_V2V_DENOISER = """\
reactor-graph: 1
name: v2v-denoiser
size: [32, 32]
fps: 16
device: cpu
slots:
  prompt: {type: str, default: "a red circle"}
  strength: {type: float, default: 0.3}
  camera: {type: video, size: [32, 32], frames: 8}
commands:
  set_strength:
    params: {strength: {type: float, ge: 0.01, le: 1}}
    set: {strength: $strength}
nodes:
  cond:
    type: text_encoder
    params: {dim: 16, max_tokens: 8, heads: 2}
    in: {text: $slots.prompt}
  rgb:
    type: video_in
    params: {size: [4, 4]}
    in: {frames: $slots.camera}
  encode:
    type: test_frames_as_latents
    in: {frames: rgb.rgb}
  noise:
    type: noise
    params: {shape: [16, 2, 4, 4]}
  denoise:
    type: causal_denoiser
    params: {latent_channels: 16, frames_per_block: 2, latent_size: [4, 4], dim: 32, layers: 1, heads: 2,
             text_dim: 16, steps: 2, cache_blocks: 1}
    in: {cond: cond.embeds, noise: noise.noise, input: encode.latents, strength: $slots.strength}
  show:
    type: test_show_latents
    in: {latents: denoise.latents}
  out:
    type: emit
    params: {format: rgb24}
    in: {frames: show.frames}
"""


@register("test_frames_as_latents")
class FramesAsLatents(Node):
    """Camera pictures [8, 3, 4, 4] as a latent block [16, 2, 4, 4] (4 frames' channels stacked, then repeated):
    an input that follows the camera, cheap to compile."""

    every_block = True

    def ports(self):
        return ({"frames": Port("tensor", "float", (8, 3, 4, 4))},
                {"latents": Port("tensor", "float", (16, 2, 4, 4))})

    def forward(self, frames):
        x = frames.reshape(2, 12, 4, 4)
        return {"latents": torch.cat([x, x[:, :4]], dim=1).transpose(0, 1)}


@register("test_show_latents")
class ShowLatents(Node):
    """The first 3 latent channels as the picture (8x nearest): the denoiser's output, unattenuated, in the stream
    (a random latent_decoder would flatten the difference the test looks for)."""

    every_block = True

    def ports(self):
        return ({"latents": Port("tensor", "float", (16, "t", 4, 4))},
                {"frames": Port("tensor", "float", ("t", 3, 32, 32))})

    def forward(self, latents):
        x = F.interpolate(latents[:3].transpose(0, 1), scale_factor=8, mode="nearest")
        return {"frames": torch.tanh(0.5 * x)}


def _camera32(level: int) -> np.ndarray:
    img = np.full((32, 32, 3), level, np.uint8)
    img[4:20, 8:24] = 255 - level
    return to_yuv420p(av.VideoFrame.from_ndarray(img, format="rgb24"), 32, 32)


def _session(engine, switch_at: int | None, blocks: int = 5) -> list[np.ndarray]:
    """A session with the camera fed before each block and set_strength(0.9) submitted at `switch_at`."""
    def before(k):
        if k == switch_at:
            engine.submit("set_strength", {"strength": 0.9})
        for _ in range(8):
            engine.inputs.feed("camera", _camera32(30 * k))

    out = []
    engine.run_session(lambda b: out.append(b.video().copy()), max_blocks=blocks, before_block=before)
    return out


@pytest.mark.slow  # compiles the hot path (aot_eager)
def test_compiled_strength_command_changes_the_next_block_without_a_recompile(write_graph):
    from reactor_graph.compile import CompiledHotPath
    from reactor_graph.errors import CommandError
    from reactor_graph.loop import Engine

    path = write_graph(TINY_V2V_DENOISER)
    eager = Engine(load_plan(path), device="cpu").load()
    engine = Engine(load_plan(path), device="cpu", compile="compile", compile_backend="aot_eager").load()
    ex = engine.executor
    assert isinstance(ex, CompiledHotPath) and "denoise" in ex.captured  # the denoiser is in the compiled part
    at_start = dict(ex.compiles)
    steady = _session(engine, None)
    switched = _session(engine, 2)
    assert ex.recompiles == 0 and ex.compiles == at_start
    assert all(np.array_equal(a, b) for a, b in zip(steady[:2], switched[:2]))
    assert all(np.abs(a.astype(int) - b.astype(int)).max() > 20 for a, b in zip(steady[2:], switched[2:]))
    for a, b in zip(_session(eager, 2), switched, strict=True):  # and it is the new strength's output
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    with pytest.raises(CommandError):
        engine.submit("set_strength", {"strength": 0})
