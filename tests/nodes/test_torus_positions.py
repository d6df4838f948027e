"""`positions: torus` on the causal denoiser and `padding: circular` on the latent decoder: a frame rolled
round by whole tokens gives the same picture, rolled, through the KV cache and the decoder; the learnt
positions do not (which is why shapes broke at the demo's edges)."""
import pytest
import torch

from reactor_graph.nodes.causal_denoiser import CausalDiT, Rotary, rope
from reactor_graph.nodes.latent_decoder import TinyDecoder


def _dit(positions: str) -> CausalDiT:
    torch.manual_seed(0)
    dit = CausalDiT(4, 2, (8, 12), 2, 32, 2, 2, 16, positions)
    for blk in dit.blocks:  # random (not adaLN-zero) modulation, so every branch and the attention matter
        torch.nn.init.normal_(blk.modulation.weight, std=0.2)
    return dit.eval()


def _stream(dit: CausalDiT, noises, texts, cache_blocks=2):
    """CausalDenoiser.generate's arithmetic, block by block through a rolling cache of `cache_blocks` blocks."""
    n = dit.frames * dit.tokens_per_frame
    ck = torch.zeros(len(dit.blocks), 1, 2, cache_blocks * n, 16)
    cv = torch.zeros_like(ck)
    outs, cached = [], 0
    for x, text in zip(noises, texts):
        if cached == cache_blocks:
            ck[:, :, :, :-n] = ck[:, :, :, n:].clone()
            cv[:, :, :, :-n] = cv[:, :, :, n:].clone()
            cached -= 1
        m = cached * n
        for s in (1.0, 0.5):
            flow, _, _ = dit(x, torch.full((1,), s), text, cached * dit.frames, ck, cv, m)
            x = x - 0.5 * flow
        _, k, v = dit(x, torch.zeros(1), text, cached * dit.frames, ck, cv, m)
        ck[:, :, :, m:m + n], cv[:, :, :, m:m + n] = k, v
        cached += 1
        outs.append(x)
    return torch.stack(outs)


def _roll(x, dy, dx):  # [..., h, w] rolled round by whole tokens (patch 2)
    return torch.roll(x, shifts=(2 * dy, 2 * dx), dims=(-2, -1))


@torch.no_grad()
def test_a_stream_rolled_round_the_torus_is_the_stream_rolled():
    dit = _dit("torus")
    torch.manual_seed(1)
    noises = [torch.randn(1, 4, 2, 8, 12) for _ in range(4)]  # 4 blocks: the cache fills, then rolls
    texts = [torch.randn(1, 5, 16) for _ in range(4)]
    out = _stream(dit, noises, texts)
    for dy, dx in [(1, 0), (0, 1), (3, 5), (-1, 2)]:
        rolled = _stream(dit, [_roll(x, dy, dx) for x in noises], texts)
        torch.testing.assert_close(rolled, _roll(out, dy, dx), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_learnt_positions_are_not_round_the_torus():
    """The same check fails with the learnt embedding: the test above can tell the two apart."""
    dit = _dit("learnt")
    with torch.no_grad():
        dit.spatial.normal_(std=0.5)
    torch.manual_seed(1)
    noises, texts = [torch.randn(1, 4, 2, 8, 12)], [torch.randn(1, 5, 16)]
    out, rolled = _stream(dit, noises, texts), _stream(dit, [_roll(noises[0], 1, 2)], texts)
    assert (rolled - _roll(out, 1, 2)).abs().max() > 1e-2


def test_torus_positions_have_no_learnt_embedding_and_time_stays_rotary():
    torus, learnt = _dit("torus"), _dit("learnt")
    assert "spatial" not in dict(torus.named_parameters()) and "spatial" in dict(learnt.named_parameters())
    x, pos = torch.randn(1, 2, 2 * 24, 16), torch.arange(2).repeat_interleave(24)
    # The frame index alone (no grid) is the old rope, bit for bit; with a grid, time keeps its own frequencies.
    assert torch.equal(Rotary(16)(x, pos), rope(x, pos))
    ang = Rotary(16, (4, 6)).angles(pos)  # [N, 8]: 4 time, 2 row, 2 column frequencies
    assert ang.shape == (48, 8)
    assert torch.equal(ang[:24, :4], torch.zeros(24, 4)) and torch.all(ang[24:, 0] == 1)
    row, col = torch.arange(48) % 24 // 6, torch.arange(48) % 6
    torch.testing.assert_close(ang[:, 4], row * 2 * torch.pi / 4)
    torch.testing.assert_close(ang[:, 6], col * 2 * torch.pi / 6)
    with pytest.raises(ValueError, match="learnt, torus"):
        CausalDiT(4, 2, (8, 12), 2, 32, 2, 2, 16, "absolute")


@torch.no_grad()
@pytest.mark.parametrize("padding, equivariant", [("circular", True), ("zeros", False)])
def test_the_circular_decoder_draws_a_rolled_latent_rolled(padding, equivariant):
    torch.manual_seed(0)
    dec = TinyDecoder(4, 16, 8, padding).eval()
    z = torch.randn(2, 4, 6, 10)
    got, want = dec(torch.roll(z, (1, 3), (-2, -1))), torch.roll(dec(z), (8, 24), (-2, -1))
    assert torch.allclose(got, want, atol=1e-5) == equivariant
