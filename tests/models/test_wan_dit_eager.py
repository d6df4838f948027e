"""The DiT's eager fast paths (fewer float32 temporaries and cast kernels: reactor_graph/models/wan_dit.py
apply_rope, WanRMSNorm, _modulate, _gate) give bitwise the numbers of the plain float32 formulas they replace (the
forms kept for torch.compile), on the CPU and on CUDA."""
from __future__ import annotations

import pytest
import torch

from reactor_graph.models.wan_dit import WanRMSNorm, _gate, _modulate, apply_rope

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def _x(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_apply_rope_is_the_float32_rotation_rounded_once(device, dtype):
    x = _x((2, 35, 3, 22), dtype, device, 0)  # [B, N, H, D], odd token count, D/2 = 11
    ang = _x((35, 11), torch.float32, device, 1)
    cos, sin = ang.cos(), ang.sin()
    xf = x.float().unflatten(-1, (-1, 2))
    c, s = cos[:, None], sin[:, None]
    want = torch.stack((xf[..., 0] * c - xf[..., 1] * s, xf[..., 0] * s + xf[..., 1] * c), -1).flatten(-2).to(dtype)
    got = apply_rope(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    assert torch.equal(got, want)
    assert not torch.equal(got, x)  # it did rotate


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_rounds_the_float32_product_once(device, dtype):
    norm = WanRMSNorm(40).to(device)
    with torch.no_grad():
        norm.weight.copy_(_x((40,), torch.float32, device, 2))
    norm = norm.to(dtype)
    x = _x((2, 17, 40), dtype, device, 3)
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype) * norm.weight
    got = norm(x)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_modulate_in_a_narrower_dtype_and_gate_without_a_cast(device, dtype):
    b, f, per, d = 2, 3, 5, 24
    x = _x((b, f * per, d), torch.float32, device, 4)
    shift, scale, gate = (_x((b, f, 1, d), torch.float32, device, i) for i in (5, 6, 7))
    want = (x.view(b, f, per, d) * (1 + scale) + shift).view(b, f * per, d)
    assert torch.equal(_modulate(x, shift, scale, f), want)
    got = _modulate(x, shift, scale, f, dtype)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    y = _x((b, f * per, d), dtype, device, 8)
    g = _gate(y, gate, f)
    assert g.dtype == torch.float32
    assert torch.equal(g, (y.float().view(b, f, per, d) * gate).view(b, f * per, d))


def test_with_autograd_recording_the_plain_forms_run_and_agree():
    x = _x((1, 6, 2, 8), torch.float32, "cpu", 9).requires_grad_(True)
    ang = _x((6, 4), torch.float32, "cpu", 10)
    out = apply_rope(x, ang.cos(), ang.sin())
    with torch.no_grad():
        assert torch.equal(out, apply_rope(x, ang.cos(), ang.sin()))
    out.square().sum().backward()
    # a rotation keeps norms: d/dx |R x|^2 = 2 x
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-5, atol=1e-5)
