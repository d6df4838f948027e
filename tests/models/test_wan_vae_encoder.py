"""Streaming causal Wan 2.1 VAE encoder (reactor_graph.models.wan_vae_encoder): the official state-dict names and
shapes, streamed blocks equal the whole-sequence encode and an independent chunk-by-chunk reference (Wan's own
1, 4, 4, ... chunking, written here from the weights alone), reset, fixed state addresses, checkpoint loading."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reactor_graph.models.wan_vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAEDecoder, load_wan_vae
from reactor_graph.models.wan_vae_encoder import WanVAEEncoder, load_wan_vae_encoder

DIM = 4
HW = (16, 24)  # -> latents 2 x 3

# Wan 2.1's encoder, as its module tree lists it: (kind, in, out) in units of `dim` per downsamples.<i>
DOWN = [("res", 1, 1), ("res", 1, 1), ("down2d", 1, 1), ("res", 1, 2), ("res", 2, 2), ("down3d", 2, 2),
        ("res", 2, 4), ("res", 4, 4), ("down3d", 4, 4), ("res", 4, 4), ("res", 4, 4)]


def expected_keys(d: int) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name, o, i, k):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (o, i, *k), (o,)

    def res(name, i, o):
        keys[f"{name}.residual.0.gamma"] = (i, 1, 1, 1)
        conv(f"{name}.residual.2", o, i, (3, 3, 3))
        keys[f"{name}.residual.3.gamma"] = (o, 1, 1, 1)
        conv(f"{name}.residual.6", o, o, (3, 3, 3))
        if i != o:
            conv(f"{name}.shortcut", o, i, (1, 1, 1))

    conv("encoder.conv1", d, 3, (3, 3, 3))
    for n, (kind, i, o) in enumerate(DOWN):
        name = f"encoder.downsamples.{n}"
        if kind == "res":
            res(name, i * d, o * d)
        else:
            conv(f"{name}.resample.1", o * d, o * d, (3, 3))
            if kind == "down3d":
                conv(f"{name}.time_conv", o * d, o * d, (3, 1, 1))
    res("encoder.middle.0", 4 * d, 4 * d)
    keys["encoder.middle.1.norm.gamma"] = (4 * d, 1, 1)
    conv("encoder.middle.1.to_qkv", 12 * d, 4 * d, (1, 1))
    conv("encoder.middle.1.proj", 4 * d, 4 * d, (1, 1))
    res("encoder.middle.2", 4 * d, 4 * d)
    keys["encoder.head.0.gamma"] = (4 * d, 1, 1, 1)
    conv("encoder.head.2", 32, 4 * d, (3, 3, 3))
    conv("conv1", 32, 32, (1, 1, 1))
    return keys


def random_state_dict(d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint with the official encoder names and shapes (weights of a scale that keeps activations O(1))."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in expected_keys(d).items():
        if k.endswith("gamma"):
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("bias"):
            sd[k] = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            sd[k] = torch.randn(shape, generator=g) * 1.3 / fan_in**0.5
    return sd


def make(d: int = DIM, seed: int = 0) -> WanVAEEncoder:
    enc = WanVAEEncoder(dim=d).eval()
    enc.load_state_dict(random_state_dict(d, seed))
    return enc


def frames(t: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, t, *HW, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------- the reference
def _rms(x, gamma):
    return F.normalize(x, dim=1) * x.shape[1] ** 0.5 * gamma


class ChunkedReference:
    """Wan's encode as its code runs: chunks of 1, 4, 4, ... frames. Each temporal conv of kernel 3 sees the
    previous chunks' last (up to 2) input frames and zero padding for what is missing; each time-halving conv
    sees the previous chunk's last frame, and the first chunk passes it untouched."""

    def __init__(self, sd):
        self.sd, self.mem = sd, {}

    def w(self, name):
        return self.sd[f"{name}.weight"], self.sd[f"{name}.bias"]

    def conv(self, name, x):
        w, b = self.w(name)
        if w.shape[2] == 1:
            return F.conv3d(x, w, b)
        past = self.mem.get(name)
        joined = x if past is None else torch.cat([past, x], dim=2)
        self.mem[name] = joined[:, :, -2:]
        missing = 2 - (0 if past is None else past.shape[2])
        return F.conv3d(F.pad(joined, (1, 1, 1, 1, missing, 0)), w, b)

    def res(self, name, x):
        short = x if f"{name}.shortcut.weight" not in self.sd else self.conv(f"{name}.shortcut", x)
        y = self.conv(f"{name}.residual.2", F.silu(_rms(x, self.sd[f"{name}.residual.0.gamma"])))
        y = self.conv(f"{name}.residual.6", F.silu(_rms(y, self.sd[f"{name}.residual.3.gamma"])))
        return y + short

    def down(self, name, x, temporal):
        w, b = self.w(f"{name}.resample.1")
        y = torch.stack([F.conv2d(F.pad(x[:, :, i], (0, 1, 0, 1)), w, b, stride=2) for i in range(x.shape[2])], 2)
        if not temporal:
            return y
        past = self.mem.get(name)
        self.mem[name] = y[:, :, -1:]
        if past is None:
            return y
        wt, bt = self.w(f"{name}.time_conv")
        return F.conv3d(torch.cat([past, y], dim=2), wt, bt, stride=(2, 1, 1))

    def attn(self, name, x):
        b, c, t, h, w = x.shape
        y = _rms(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), self.sd[f"{name}.norm.gamma"])
        q, k, v = F.conv2d(y, *self.w(f"{name}.to_qkv")).reshape(b * t, 3 * c, h * w).transpose(1, 2).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v  # [bt, hw, c]
        out = F.conv2d(a.transpose(1, 2).reshape(b * t, c, h, w), *self.w(f"{name}.proj"))
        return out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4) + x

    def chunk(self, x):
        x = self.conv("encoder.conv1", x)
        for n, (kind, _, _) in enumerate(DOWN):
            name = f"encoder.downsamples.{n}"
            x = self.res(name, x) if kind == "res" else self.down(name, x, kind == "down3d")
        x = self.attn("encoder.middle.1", self.res("encoder.middle.0", x))
        x = self.res("encoder.middle.2", x)
        return self.conv("encoder.head.2", F.silu(_rms(x, self.sd["encoder.head.0.gamma"])))

    def encode(self, video):
        t = video.shape[2]
        pieces = [video[:, :, :1]] + [video[:, :, s:s + 4] for s in range(1, t - 3, 4)]
        out = torch.cat([self.chunk(p) for p in pieces], dim=2)
        mu = F.conv3d(out, *self.w("conv1"))[:, :16]
        mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1)
        std = torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
        return (mu - mean) / std


# ------------------------------------------------------------------------------------------------ tests
def test_official_names_and_shapes():
    with torch.device("meta"):
        sd = WanVAEEncoder().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_keys(96)
    assert tuple(sd["encoder.conv1.weight"].shape) == (96, 3, 3, 3, 3)
    assert tuple(sd["encoder.downsamples.8.time_conv.weight"].shape) == (384, 384, 3, 1, 1)


@torch.no_grad()
def test_whole_sequence_equals_the_chunked_reference():
    enc = make()
    for t in (1, 5, 13, 15):  # 15: frames past the last whole chunk are dropped, as Wan does
        x = frames(t)
        ref = ChunkedReference(random_state_dict(DIM)).encode(x)
        got = enc.encode_full(x)
        assert got.shape == (1, 16, 1 + (t - 1) // 4, 2, 3) == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks,batch", [((5, 4, 8), 1), ((9, 8), 2), ((1, 4, 4, 4), 1), ((13,), 1)])
@torch.no_grad()
def test_streamed_blocks_equal_the_whole_sequence(blocks, batch):
    enc = make()
    x = frames(sum(blocks), batch)
    ref = enc.encode_full(x)
    out, start = [], 0
    for n in blocks:
        out.append(enc.encode_block(x[:, :, start:start + n]))
        start += n
    got = torch.cat(out, dim=2)
    assert got.shape == ref.shape == (batch, 16, 1 + (sum(blocks) - 1) // 4, 2, 3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if len(blocks) > 1:  # the carried state matters: the last block on a fresh state differs
        fresh = make()
        fresh.encode_block(x[:, :, :1])  # past the first phase, with no history
        alone = fresh.encode_block(x[:, :, -blocks[-1]:])
        assert (alone - out[-1]).abs().max() > 1e-2


@torch.no_grad()
def test_reset_and_fixed_addresses():
    enc = make()
    x = frames(13)
    a = [enc.encode_block(x[:, :, :5]), enc.encode_block(x[:, :, 5:])]
    ptrs = {k: v.data_ptr() for k, v in enc.state_buffers().items()}
    assert len(ptrs) == 22 + 2  # 22 causal convs with a time kernel, 2 time-halving resamples
    assert tuple(enc.state_buffers()["encoder.conv1.cache"].shape) == (1, 3, 2, 16, 24)
    assert tuple(enc.state_buffers()["encoder.downsamples.5.last"].shape) == (1, 2 * DIM, 1, 4, 6)  # at 1/4
    assert tuple(enc.state_buffers()["encoder.downsamples.8.last"].shape) == (1, 4 * DIM, 1, 2, 3)  # at 1/8
    enc.reset()
    b = [enc.encode_block(x[:, :, :5]), enc.encode_block(x[:, :, 5:])]
    assert {k: v.data_ptr() for k, v in enc.state_buffers().items()} == ptrs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_block_frame_counts():
    enc = make()
    assert [enc.frames_per_block(3, ph) for ph in (0, 1)] == [9, 12]
    with torch.no_grad(), pytest.raises(ValueError, match="4t - 3"):
        enc.encode_block(frames(8))
    with torch.no_grad():
        enc.encode_block(frames(5))
        with pytest.raises(ValueError, match="multiple of 4"):
            enc.encode_block(frames(5))
    with pytest.raises(ValueError, match="multiple of 8"):
        enc.encode_full(torch.zeros(1, 3, 1, 12, 16))


def _save(sd, path):
    sd = {k: v.contiguous() for k, v in sd.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@torch.no_grad()
def test_loads_an_official_checkpoint_both_halves(tmp_path, suffix):
    enc_sd = random_state_dict(DIM)
    torch.manual_seed(0)
    dec_sd = WanVAEDecoder(dim=DIM).state_dict()  # decoder.* and conv2.*
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    _save({**enc_sd, **dec_sd}, path)
    enc = load_wan_vae_encoder(path)  # the width from encoder.conv1.weight
    assert enc.dim == DIM
    x = frames(9)
    torch.testing.assert_close(enc.encode_full(x), ChunkedReference(enc_sd).encode(x), rtol=1e-5, atol=1e-5)
    assert load_wan_vae(path).decoder.head[2].weight.shape == (3, DIM, 3, 3, 3)  # the same file decodes
    bad = {k: v for k, v in enc_sd.items() if k != "encoder.downsamples.5.time_conv.bias"}
    bad["encoder.head.2.bias"] = torch.zeros(31)
    _save(bad, tmp_path / f"bad{suffix}")
    with pytest.raises(ValueError) as err:
        load_wan_vae_encoder(tmp_path / f"bad{suffix}")
    msg = str(err.value)
    assert "missing keys ['encoder.downsamples.5.time_conv.bias']" in msg and "encoder.head.2.bias" in msg
    _save(dec_sd, tmp_path / f"decoder_only{suffix}")
    with pytest.raises(ValueError, match="no Wan VAE encoder weights"):
        load_wan_vae_encoder(tmp_path / f"decoder_only{suffix}")


@pytest.mark.slow
@torch.no_grad()
def test_block_forward_compiles_fullgraph():
    """One graph per phase; the state is updated in place at fixed addresses, as CUDA-graph capture needs."""
    ref, enc = make(), make()
    x = frames(21)
    blocks = [x[:, :, :9], x[:, :, 9:17], x[:, :, 17:21]]
    expected = [ref.encode_block(b) for b in blocks]
    enc.allocate_state(1, 2, 3)
    ptrs = {k: v.data_ptr() for k, v in enc.state_buffers().items()}
    compiles = []

    def backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    enc.block_forward = torch.compile(enc.block_forward, fullgraph=True, backend=backend)
    got = [enc.encode_block(b) for b in blocks]
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert {k: v.data_ptr() for k, v in enc.state_buffers().items()} == ptrs
    assert len(compiles) == 3  # phase 0; phase 1 at 8 frames and at 4: one graph each, none again
    enc.reset()
    enc.encode_block(blocks[0])
    enc.encode_block(blocks[1])
    assert len(compiles) == 3
