"""Streaming causal TAEHV encoder (reactor_graph.models.taehv.TAEHVEncoder): the public state-dict names and
shapes, block streaming equals the whole-sequence reference, reset, fixed state addresses, checkpoint loading."""
from __future__ import annotations

import pytest
import torch

from reactor_graph.models.taehv import TAEHVDecoder, TAEHVEncoder, load_taehv, load_taehv_encoder


def make(width: int = 8, seed: int = 0) -> TAEHVEncoder:
    torch.manual_seed(seed)
    enc = TAEHVEncoder(width).eval()
    with torch.no_grad():  # MemBlock weights scaled up so the memory path matters in the comparison
        for p in enc.parameters():
            p.mul_(1.5)
    return enc


def frames(t: int, batch: int = 1, hw=(16, 24), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, t, 3, *hw, generator=g) * 2 - 1


def expected_keys(w: int = 8, z: int = 16) -> dict[str, tuple[int, ...]]:
    keys = {"encoder.0.weight": (w, 3, 3, 3), "encoder.0.bias": (w,),
            "encoder.17.weight": (z, w, 3, 3), "encoder.17.bias": (z,)}
    for pool, stride in ((2, 2), (7, 2), (12, 1)):
        keys[f"encoder.{pool}.conv.weight"] = (w, w * stride, 1, 1)
        keys[f"encoder.{pool + 1}.weight"] = (w, w, 3, 3)
        for m in range(pool + 2, pool + 5):
            keys[f"encoder.{m}.conv.0.weight"] = (w, 2 * w, 3, 3)
            keys[f"encoder.{m}.conv.2.weight"] = (w, w, 3, 3)
            keys[f"encoder.{m}.conv.4.weight"] = (w, w, 3, 3)
            for c in (0, 2, 4):
                keys[f"encoder.{m}.conv.{c}.bias"] = (w,)
    return keys


def test_public_names_and_shapes():
    sd = TAEHVEncoder(64).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_keys(64)


@pytest.mark.parametrize("blocks,batch", [((4, 4, 4), 1), ((12, 8), 2), ((4,), 1)])
def test_streaming_equals_whole_sequence(blocks, batch):
    enc = make()
    x = frames(sum(blocks), batch)
    with torch.no_grad():
        ref = enc.encode_full(x)
        out, start = [], 0
        for n in blocks:
            out.append(enc.encode_block(x[:, start:start + n]))
            start += n
    got = torch.cat(out, dim=1)
    assert got.shape == (batch, sum(blocks) // 4, 16, 2, 3) == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the memory matters: a block encoded on its own (fresh state) differs from the streamed one
    with torch.no_grad():
        enc.reset()
        alone = enc.encode_block(x[:, -blocks[-1]:])
    if len(blocks) > 1:
        assert (alone - got[:, -alone.shape[1]:]).abs().max() > 1e-3


def test_full_pads_the_end_like_taehv():
    enc = make()
    x = frames(6)
    with torch.no_grad():
        padded = torch.cat([x, x[:, -1:], x[:, -1:]], dim=1)
        torch.testing.assert_close(enc.encode_full(x), enc.encode_full(padded))


def test_reset_and_fixed_addresses():
    enc = make()
    x = frames(8)
    with torch.no_grad():
        a = enc.encode_block(x)
        ptrs = {k: v.data_ptr() for k, v in enc.state_buffers().items()}
        assert len(ptrs) == 9
        enc.encode_block(x)
        enc.reset()
        b = enc.encode_block(x)
    assert {k: v.data_ptr() for k, v in enc.state_buffers().items()} == ptrs
    torch.testing.assert_close(a, b)


def test_block_must_be_whole_latent_frames():
    with pytest.raises(ValueError, match="multiple of 4"):
        make().encode_block(frames(6))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_one_checkpoint_both_halves(tmp_path, suffix):
    enc = make()
    torch.manual_seed(3)
    dec = TAEHVDecoder((16, 8, 8, 8))
    sd = {**enc.state_dict(), **dec.state_dict()}  # a whole TAEHV checkpoint: encoder.* and decoder.*
    path = tmp_path / f"taew{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_taehv_encoder(path)
    assert loaded.width == 8
    x = frames(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_full(x), enc.encode_full(x))
    load_taehv(path)  # the decoder half still loads from the same file
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in enc.state_dict().items() if k != "encoder.5.conv.2.bias"}, bad)
    with pytest.raises(ValueError, match="encoder.5.conv.2.bias"):
        load_taehv_encoder(bad)
