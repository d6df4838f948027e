"""kernels/fp8_head_quant.py: the Triton kernels (through Triton's interpreter on the CPU, storing e4m3 values in
float32: the interpreter's float8 cast is not trustworthy) against the torch references, bit for bit, on awkward
sizes and strides; the references' own properties; on a GPU, the compiled kernels with a real e4m3 cast."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

Q = importlib.import_module("reactor_graph.kernels.fp8_head_quant")

REPO = Path(__file__).resolve().parents[2]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
E4M3 = torch.float8_e4m3fn
# (B, L, H, D): single elements, lengths that are no multiple of the token block (64), odd head counts and widths
SHAPES = [(1, 1, 1, 1), (2, 7, 3, 5), (1, 130, 2, 16), (3, 65, 1, 130), (1, 200, 12, 128)]

_MODES = {}


def _interpreted():
    """The module with its kernels decorated by Triton's interpreter (TRITON_INTERPRET=1 for that import only)."""
    if Q._INTERPRET:
        return Q
    if "interp" not in _MODES:
        name = "_fp8_head_quant_interpreted"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "1")
            spec = importlib.util.spec_from_file_location(name, REPO / "kernels" / "fp8_head_quant.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # triton.jit looks the module up
            spec.loader.exec_module(mod)
        _MODES["interp"] = mod
    return _MODES["interp"]


@pytest.fixture
def interp():
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    mod = _interpreted()
    assert mod.backend_for(torch.zeros(1)) == "triton-interpret"
    return mod


def _x(shape, dtype=torch.float32, seed=0, spread=True):
    """Random [B, L, H, D] whose heads differ by orders of magnitude; as a strided view into a larger buffer
    (padded in L, H and D), as the cache hands slots over."""
    b, l, h, d = shape
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, l + 3, h + 1, d + 2, generator=g)
    if spread:
        base = base * torch.logspace(-3, 3, h + 1)[None, None, :, None]
    return base.to(dtype)[:, 2:2 + l, 1:, 1:1 + d]


def _awkward_amaxes():
    """amaxes on and around every boundary of the power-of-two rule: 448 * 2^k, 1.75 * 2^k +- one ulp, powers of
    two, zero, float32 subnormals, huge."""
    vals = [0.0, 1e-45, 1e-38, 1e-30, 2.0 ** -40, 1.0, 2.0, 3.0, 447.0, 448.0, 449.0, 1e30, 3e38]
    for k in range(-12, 13, 3):
        c = 448.0 * 2.0 ** k
        vals += [c, float(torch.nextafter(torch.tensor(c), torch.tensor(0.0))),
                 float(torch.nextafter(torch.tensor(c), torch.tensor(1e39))), 2.0 ** (k + 8)]
    return torch.tensor(vals, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("headroom", [0, 1, 2, 3])
def test_descale_is_the_smallest_power_of_two_that_covers_amax_with_headroom(headroom):
    amax = _awkward_amaxes()
    d = Q.descale_for_amax_reference(amax, headroom)
    e = torch.log2(d.double())
    assert torch.equal(e, e.round()), "not a power of two"
    bound = 448.0 * d.double()
    need = amax.double() * 2.0 ** headroom
    inside = (e > -Q.MAX_EXP) & (e < Q.MAX_EXP)  # away from the clamp
    assert (bound[inside] >= need[inside]).all()
    assert (bound[inside] / 2 < need[inside]).all()  # the smallest: half of it would not cover
    assert torch.isfinite(1.0 / d).all() and (d > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per", ["head", "tensor"])
def test_reference_round_trip_is_within_e4m3_bounds_and_saturates_beyond_448(dtype, per):
    x = _x((2, 70, 4, 24), dtype, seed=3)
    amax = Q.head_amax_reference(x, per)
    d = Q.descale_for_amax_reference(amax, 1)
    q = Q.quantize_reference(x, d)
    back = q.float() * d[:, None, :, None]
    xf = x.float()
    bound = 2.0 ** -4 * xf.abs() + 2.0 ** -10 * d[:, None, :, None]  # half an ulp: normals, subnormals
    assert ((back - xf).abs() <= bound).all()
    # headroom 2^1: the largest value lands in (112, 224] of e4m3's 448
    top = q.float().abs().amax(dim=(1, 3))
    if per == "head":
        assert ((top > 112) & (top <= 224)).all(), top
    # a descale 8x too small: what lies beyond 448 saturates instead of turning NaN
    q_small = Q.quantize_reference(x, d / 8)
    assert not torch.isnan(q_small.float()).any() and q_small.float().abs().max() == 448.0


# ------------------------------------------------------------------------------ kernels (interpreter)


@pytest.mark.parametrize("headroom", [0, 3])
@pytest.mark.parametrize("grow", [False, True])
def test_descale_kernel_matches_the_reference_bit_for_bit(interp, headroom, grow):
    amax = _awkward_amaxes()
    n = amax.numel()
    # each head's amax split over 3 chunks (the true one in the middle chunk)
    part = torch.stack([amax * 0.5, amax, amax * 0.25], dim=1)
    old = Q.descale_for_amax_reference(amax.flip(0), 1) if grow else None
    got = interp.descales_from_partials(part, heads=1, per="head", headroom_log2=headroom, old=old)
    want = Q.descale_for_amax_reference(amax, headroom)
    if grow:
        want = torch.maximum(want, old)
    assert torch.equal(got, want)
    # per tensor: groups of `heads` rows share their largest amax
    got_t = interp.descales_from_partials(part[: n - n % 4], heads=4, per="tensor", headroom_log2=headroom)
    grp = amax[: n - n % 4].view(-1, 4).amax(dim=1, keepdim=True).expand(-1, 4).reshape(-1)
    assert torch.equal(got_t, Q.descale_for_amax_reference(grp, headroom))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amax_kernel_matches_the_reference(interp, shape, dtype):
    x = _x(shape, dtype, seed=sum(shape))
    part = interp.head_amax_partials(x)
    assert part.shape == (shape[0] * shape[2], -(-shape[1] // Q._block_l(shape[1])))
    torch.testing.assert_close(part.amax(dim=1).view(shape[0], shape[2]), Q.head_amax_reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per", ["head", "tensor"])
def test_quantize_kernel_matches_the_reference_bit_for_bit(interp, shape, dtype, per):
    x = _x(shape, dtype, seed=sum(shape) + 1)
    x8, d = interp.quantize(x, per, headroom_log2=1, dtype=torch.float32)
    want_d = Q.descale_for_amax_reference(Q.head_amax_reference(x, per), 1)
    assert torch.equal(d, want_d)
    assert torch.equal(x8, Q.quantize_reference(x, want_d, torch.float32))
    # saturating: a descale 16x too small, into a strided slot of a larger buffer
    buf = torch.full((shape[0], shape[1] + 5, shape[2], shape[3]), 7.0)
    interp.quantize_into(x, buf[:, 3:3 + shape[1]], want_d / 16)
    assert torch.equal(buf[:, 3:3 + shape[1]], Q.quantize_reference(x, want_d / 16, torch.float32))
    assert (buf[:, :3] == 7.0).all() and (buf[:, 3 + shape[1]:] == 7.0).all()


def test_soft_e4m3_rounding_matches_torchs_cast_on_every_value_and_midpoint(interp):
    # every finite e4m3 value, the midpoints between neighbours (ties go to even), and a quarter of the way
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
    v = codes[torch.isfinite(codes)].unique().sort().values  # -448 .. 448
    mids = (v[1:] + v[:-1]) / 2
    quart = v[:-1] + (v[1:] - v[:-1]) / 4
    tiny = torch.tensor([2.0 ** -10, 2.0 ** -11, 3 * 2.0 ** -11, 1e-30, 0.0, -0.0])
    vals = torch.cat([v, mids, quart, tiny, -tiny, torch.tensor([448.5, 460.0, 1e6, -1e6])])
    x = vals.view(1, -1, 1, 1)
    one = torch.ones(1, 1)
    got = torch.empty_like(x)
    interp.quantize_into(x, got, one)
    assert torch.equal(got, x.clamp(-448, 448).to(E4M3).float())


def test_quantize_into_rewrites_old_rows_only_where_the_scale_changed(interp):
    b, l, h, d = 2, 90, 3, 8
    x = _x((b, l, h, d), seed=5, spread=False)
    old = torch.ones(b, h)
    new = old.clone()
    new[0, 1] = 4.0  # one head's scale grew
    start = 50
    base = torch.full((b, l, h, d), -3.0)  # what the old rows hold (stand-in: any value)
    got = interp.quantize_into(x, base.clone(), new, old=old, always_from=start)
    want = Q.quantize_into_reference(x, base.clone(), new, old=old, always_from=start)
    assert torch.equal(got, want)
    fresh = Q.quantize_reference(x, new, torch.float32)
    assert torch.equal(got[:, start:], fresh[:, start:])  # the new rows: always
    assert torch.equal(got[0, :start, 1], fresh[0, :start, 1])  # the grown head: rewritten
    keep = torch.ones(b, h, dtype=torch.bool)
    keep[0, 1] = False
    assert (got[:, :start][keep[:, None, :, None].expand(b, start, h, d)] == -3.0).all()  # the rest: untouched


def test_the_float8_reference_select_keeps_bytes():
    x = _x((1, 20, 2, 4), seed=9, spread=False)
    out = Q.quantize_reference(x, torch.ones(1, 2))
    before = out.clone()
    new = torch.tensor([[1.0, 2.0]])
    Q.quantize_into_reference(x, out, new, old=torch.ones(1, 2), always_from=20)
    assert torch.equal(out[:, :, 0].view(torch.uint8), before[:, :, 0].view(torch.uint8))
    assert torch.equal(out[:, :, 1].float(), Q.quantize_reference(x, new)[:, :, 1].float())


def test_the_torch_path_runs_on_the_cpu_and_refuses_bad_layouts():
    assert Q.backend_for(torch.zeros(1)) in ("torch", "triton-interpret")
    with pytest.raises(ValueError, match="B, L, H, D"):
        Q.quantize(torch.ones(3, 4))
    with pytest.raises(ValueError, match="contiguous"):
        Q.quantize(torch.ones(1, 4, 2, 6)[..., ::2])
    with pytest.raises(ValueError, match="granularity"):
        Q.quantize(torch.ones(1, 4, 2, 3), "token")


# ------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 4680, 12, 128), (2, 77, 3, 64), (1, 1, 1, 16)])
@pytest.mark.parametrize("per", ["head", "tensor"])
def test_compiled_kernels_match_the_reference_with_a_real_e4m3_cast(shape, per):
    if not torch.cuda.is_available() or not HAVE_TRITON:
        pytest.skip("needs CUDA and triton")
    assert Q.backend_for(torch.zeros(1, device="cuda")) == "triton"
    x = _x(shape, torch.bfloat16, seed=1).cuda()
    x8, d = Q.quantize(x, per, headroom_log2=2)
    assert x8.dtype == E4M3 and d.shape == (shape[0], shape[2])
    want_d = Q.descale_for_amax_reference(Q.head_amax_reference(x, per), 2)
    assert torch.equal(d, want_d)
    want = Q.quantize_reference(x, want_d)
    assert torch.equal(x8.view(torch.uint8), want.view(torch.uint8))
    # saturating, and the soft rounding path compiled, into wider outputs
    y = torch.empty(shape, dtype=torch.float32, device="cuda")
    Q.quantize_into(x, y, want_d / 64)
    assert torch.equal(y, Q.quantize_reference(x, want_d / 64, torch.float32))
    # re-scaling only the heads whose scale changed
    old = want_d.clone()
    new = want_d.clone()
    new.view(-1)[0] *= 4
    got = Q.quantize_into(x, x8.clone(), new, old=old, always_from=shape[1] // 2)
    ref = Q.quantize_into_reference(x, x8.clone(), new, old=old, always_from=shape[1] // 2)
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
