"""Streaming causal video decoders: TAEHV (reactor_graph.models.taehv) and Wan 2.1 VAE (wan_vae).

Tiny float32 configs on CPU.  Latent layouts: TAEHV takes [B, T, 16, h, w] and returns
[B, T', 3, 8h, 8w]; the Wan VAE takes [B, 16, T, h, w] and returns [B, 3, T', 8h, 8w].
"""

from __future__ import annotations

import pytest
import torch

from reactor_graph.models.taehv import TAEHVDecoder, load_taehv
from reactor_graph.models.wan_vae import WanVAEDecoder, load_wan_vae

TINY_TAEHV = (16, 8, 8, 8)
TINY_WAN_DIM = 8
H, W = 2, 3  # latent size -> 16x24 frames


def _seeded(mod: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Random weights of a scale that keeps the tiny decoders' outputs mostly inside the clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * gain / fan_in**0.5)
    return mod.eval()


def make_taehv() -> TAEHVDecoder:
    dec = _seeded(TAEHVDecoder(channels=TINY_TAEHV), gain=0.7)
    with torch.no_grad():
        dec.decoder[22].bias.fill_(0.5)  # centre the [0, 1] output
    return dec


def make_wan() -> WanVAEDecoder:
    return _seeded(WanVAEDecoder(dim=TINY_WAN_DIM))


class Case:
    """Adapts the two decoders' layouts so tests can be shared."""

    def __init__(self, name: str):
        self.name = name
        self.time_dim = 1 if name == "taehv" else 2  # of latents and of frames

    def make(self):
        return make_taehv() if self.name == "taehv" else make_wan()

    def latents(self, t: int, batch: int = 1, seed: int = 1, hw=(H, W)) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        shape = (batch, t, 16, *hw) if self.name == "taehv" else (batch, 16, t, *hw)
        return torch.randn(shape, generator=g)

    def split(self, z: torch.Tensor, sizes) -> list[torch.Tensor]:
        return list(torch.split(z, list(sizes), dim=self.time_dim))

    def cat(self, frames: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(frames, dim=self.time_dim)


CASES = [Case("taehv"), Case("wan")]
IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("sizes,batch", [((3, 3, 1), 1), ((1, 2, 1), 2)], ids=["3-3-1", "1-2-1_b2"])
@torch.no_grad()
def test_streaming_equals_whole_sequence(case: Case, sizes, batch):
    dec = case.make()
    z = case.latents(sum(sizes), batch=batch)
    full = dec.decode_full(z)
    streamed = case.cat([dec.decode_block(b) for b in case.split(z, sizes)])
    assert streamed.shape == full.shape
    assert full.shape[case.time_dim] == 4 * sum(sizes) - 3
    torch.testing.assert_close(streamed, full, atol=1e-4, rtol=0)
    # non-trivial outputs (not all clamped / constant)
    assert full.std() > 1e-3
    assert ((full > -1) & (full < 1)).float().mean() > 0.5


@pytest.mark.parametrize("case", CASES, ids=IDS)
@torch.no_grad()
def test_reset_reproduces_session(case: Case):
    dec = case.make()
    blocks = case.split(case.latents(5), (2, 3))
    first = [dec.decode_block(b) for b in blocks]
    dec.reset()
    assert dec.phase == 0
    assert all(bool((b == 0).all()) for b in dec.state_buffers().values())
    second = [dec.decode_block(b) for b in blocks]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # carrying on without a reset gives different frames for the same block (history is used)
    again = dec.decode_block(blocks[1])
    assert again.shape == second[1].shape and not torch.allclose(again, second[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@torch.no_grad()
def test_state_buffers_fixed_addresses(case: Case):
    dec = case.make()
    dec.allocate_state(1, H, W)
    bufs = dec.state_buffers()
    n_expected = 9 if case.name == "taehv" else 32
    assert len(bufs) == n_expected
    ptrs = {k: v.data_ptr() for k, v in bufs.items()}
    z = case.latents(6)
    history = []
    for blk in case.split(z, (2, 2, 2)):
        dec.decode_block(blk)
        now = dec.state_buffers()
        assert {k: v.data_ptr() for k, v in now.items()} == ptrs
        history.append({k: v.clone() for k, v in now.items()})
    # buffers hold data and change from block to block
    assert all(v.abs().sum() > 0 for v in history[-1].values())
    assert any(not torch.equal(history[0][k], history[1][k]) for k in ptrs)
    dec.reset()
    assert {k: v.data_ptr() for k, v in dec.state_buffers().items()} == ptrs
    # state is not part of the state dict
    assert not any(k.endswith((".memory", ".cache")) for k in dec.state_dict())
    # a different latent size re-allocates (and starts a new session: first-block frame count)
    dec.decode_block(z)
    other = case.latents(2, hw=(3, 2))
    out = dec.decode_block(other)
    assert out.shape[case.time_dim] == 5 and out.shape[-2:] == (24, 16)
    assert {k: tuple(v.shape[-2:]) for k, v in dec.state_buffers().items()} != {
        k: tuple(v.shape[-2:]) for k, v in bufs.items()
    }


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("t", [1, 2, 3])
@torch.no_grad()
def test_frame_counts_per_block(case: Case, t: int):
    dec = case.make()
    z = case.latents(2 * t)
    a, b = case.split(z, (t, t))
    out0 = dec.decode_block(a)
    out1 = dec.decode_block(b)
    assert out0.shape[case.time_dim] == 4 * t - 3 == dec.frames_per_block(t, 0)
    assert out1.shape[case.time_dim] == 4 * t == dec.frames_per_block(t, 1)
    assert out0.shape[-2:] == (8 * H, 8 * W)
    channel_dim = 2 if case.name == "taehv" else 1
    assert out0.shape[channel_dim] == 3
    assert out0.min() >= -1 and out0.max() <= 1


def test_documented_counts_three_latents():
    for dec in (make_taehv(), make_wan()):
        assert (dec.frames_per_block(3, 0), dec.frames_per_block(3, 1)) == (9, 12)


# ----------------------------------------------------------------------------- parameter names
def _taehv_expected_keys() -> set[str]:
    keys = {"decoder.1.weight", "decoder.1.bias", "decoder.22.weight", "decoder.22.bias"}
    for i in (3, 4, 5, 9, 10, 11, 15, 16, 17):
        keys |= {f"decoder.{i}.conv.{j}.{p}" for j in (0, 2, 4) for p in ("weight", "bias")}
    keys |= {f"decoder.{i}.conv.weight" for i in (7, 13, 19)}
    keys |= {f"decoder.{i}.weight" for i in (8, 14, 20)}
    return keys


def test_taehv_public_names_and_shapes():
    with torch.device("meta"):
        sd = TAEHVDecoder().state_dict()
    assert set(sd) == _taehv_expected_keys()
    shapes = {
        "decoder.1.weight": (256, 16, 3, 3),
        "decoder.3.conv.0.weight": (256, 512, 3, 3),
        "decoder.7.conv.weight": (256, 256, 1, 1),
        "decoder.8.weight": (128, 256, 3, 3),
        "decoder.13.conv.weight": (256, 128, 1, 1),
        "decoder.15.conv.4.weight": (64, 64, 3, 3),
        "decoder.19.conv.weight": (128, 64, 1, 1),
        "decoder.22.weight": (3, 64, 3, 3),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k


def test_wan_public_names_and_shapes():
    with torch.device("meta"):
        sd = WanVAEDecoder().state_dict()
    assert len(sd) == 108
    shapes = {
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.conv1.bias": (384,),
        "decoder.middle.0.residual.0.gamma": (384, 1, 1, 1),
        "decoder.middle.0.residual.2.weight": (384, 384, 3, 3, 3),
        "decoder.middle.1.norm.gamma": (384, 1, 1),
        "decoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "decoder.middle.1.proj.weight": (384, 384, 1, 1),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
        "decoder.head.0.gamma": (96, 1, 1, 1),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
        "decoder.head.2.bias": (3,),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert "decoder.upsamples.11.time_conv.weight" not in sd  # upsample2d has no time conv
    assert not any(k.startswith(("encoder.", "conv1.")) for k in sd)


# ----------------------------------------------------------------------------- loading
def _save(sd: dict, path) -> None:
    sd = {k: v.contiguous() for k, v in sd.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@torch.no_grad()
def test_wan_load_round_trip_and_mismatch(tmp_path, suffix):
    src = make_wan()
    sd = dict(src.state_dict())
    sd["encoder.conv1.weight"] = torch.zeros(2, 3)  # encoder half is ignored
    sd["conv1.weight"] = torch.zeros(32, 32, 1, 1, 1)
    path = tmp_path / f"wan{suffix}"
    _save(sd, path)
    loaded = load_wan_vae(path)  # dim inferred from decoder.head.0.gamma
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    z = Case("wan").latents(2)
    torch.testing.assert_close(loaded.decode_full(z), src.decode_full(z), atol=0, rtol=0)

    bad = dict(sd)
    del bad["decoder.head.2.bias"]
    bad["decoder.bogus.weight"] = torch.zeros(1)
    bad["decoder.conv1.bias"] = torch.zeros(5)
    bad_path = tmp_path / f"bad{suffix}"
    _save(bad, bad_path)
    with pytest.raises(ValueError) as err:
        load_wan_vae(bad_path, dim=TINY_WAN_DIM)
    msg = str(err.value)
    assert "missing keys ['decoder.head.2.bias']" in msg
    assert "unexpected keys ['decoder.bogus.weight']" in msg
    assert "decoder.conv1.bias" in msg and "shape" in msg
    assert "encoder." not in msg and "'conv1.weight'" not in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@torch.no_grad()
def test_taehv_load_round_trip_and_mismatch(tmp_path, suffix):
    src = make_taehv()
    sd = dict(src.state_dict())
    sd["encoder.0.weight"] = torch.zeros(4, 3, 3, 3)  # encoder half is ignored
    path = tmp_path / f"taew{suffix}"
    _save(sd, path)
    loaded = load_taehv(path)  # widths inferred from the checkpoint
    assert loaded.channels == TINY_TAEHV
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    z = Case("taehv").latents(2)
    torch.testing.assert_close(loaded.decode_full(z), src.decode_full(z), atol=0, rtol=0)

    bad = dict(sd)
    del bad["decoder.22.bias"]
    bad["decoder.23.weight"] = torch.zeros(1)
    bad_path = tmp_path / f"bad{suffix}"
    _save(bad, bad_path)
    with pytest.raises(ValueError) as err:
        load_taehv(bad_path)
    msg = str(err.value)
    assert "missing keys ['decoder.22.bias']" in msg
    assert "unexpected keys ['decoder.23.weight']" in msg
    assert "encoder." not in msg


@torch.no_grad()
def test_taehv_wider_tgrow_checkpoint_is_sliced(tmp_path):
    # A checkpoint whose first TGrow doubles time loads into a model where that stage does not:
    # the last-timestep output channels are kept (as public TAEHV does).
    wide = _seeded(TAEHVDecoder(TINY_TAEHV, decoder_time_upscale=(True, True, True)), gain=0.7)
    path = tmp_path / "wide.safetensors"
    _save(dict(wide.state_dict()), path)
    narrow = load_taehv(path, decoder_time_upscale=(False, True, True))
    w = wide.state_dict()["decoder.7.conv.weight"]
    assert torch.equal(narrow.state_dict()["decoder.7.conv.weight"], w[-TINY_TAEHV[0] :])


# ----------------------------------------------------------------------------- compile
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
@torch.no_grad()
def test_block_forward_compiles_fullgraph(case: Case):
    """The block decode traces as one graph per phase; state is updated in place at fixed addresses."""
    ref, dec = case.make(), case.make()
    dec.load_state_dict(ref.state_dict())
    blocks = case.split(case.latents(6), (2, 2, 2))
    expected = [ref.decode_block(b) for b in blocks]
    dec.allocate_state(1, H, W)
    ptrs = {k: v.data_ptr() for k, v in dec.state_buffers().items()}
    dec.block_forward = torch.compile(dec.block_forward, fullgraph=True, backend="aot_eager")
    got = [dec.decode_block(b) for b in blocks]
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert {k: v.data_ptr() for k, v in dec.state_buffers().items()} == ptrs
    for k, v in ref.state_buffers().items():
        torch.testing.assert_close(dec.state_buffers()[k], v, atol=1e-5, rtol=0)

